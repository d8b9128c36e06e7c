//! The `intentflow` binary under test: a running operator, and a test's own topics, group and
//! state directory.

use crate::{create_topic, intentflow_bin, read_intents, require_broker, trained_model_dir, unique};
use anyhow::{bail, Context, Result};
use intentflow_schemas::ScoredIntent;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A running `intentflow run` process.
pub struct Operator {
    child: Child,
    /// File with the operator's stderr log.
    pub log: PathBuf,
}

impl Operator {
    /// Starts `intentflow run` with the given flags; logs go to `log`.
    pub fn start(args: &[String], log: PathBuf) -> Result<Operator> {
        Operator::spawn("run", args, log)
    }

    /// Starts `intentflow <command>` with the given flags; logs go to `log`.
    pub fn spawn(command: &str, args: &[String], log: PathBuf) -> Result<Operator> {
        Operator::spawn_env(command, args, log, &[])
    }

    /// [`Operator::spawn`] with extra environment variables, such as `FAILPOINTS`.
    pub fn spawn_env(command: &str, args: &[String], log: PathBuf, env: &[(&str, &str)]) -> Result<Operator> {
        let file = std::fs::File::create(&log)?;
        let child = Command::new(intentflow_bin())
            .arg(command)
            .args(args)
            .env("INTENTFLOW_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .context("starting intentflow")?;
        Ok(Operator { child, log })
    }

    /// Sends SIGTERM and waits for the exit (up to 60 s, then kills). Returns the exit status
    /// and the whole log.
    pub fn terminate(mut self) -> Result<(ExitStatus, String)> {
        let status = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status()?;
        if !status.success() {
            bail!("kill -TERM failed");
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok((s, self.log_text()));
            }
            if Instant::now() > deadline {
                self.child.kill()?;
                bail!("intentflow did not exit within 60 s of SIGTERM; log: {}", self.log.display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits up to `limit` for the process to exit by itself; returns its status and log, or
    /// `None` if it is still running.
    pub fn wait_exit(&mut self, limit: Duration) -> Result<Option<(ExitStatus, String)>> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(s) = self.child.try_wait()? {
                return Ok(Some((s, self.log_text())));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(None)
    }

    /// Kills the process with SIGKILL (a crash: no batch is finished, nothing is committed)
    /// and reaps it.
    pub fn crash(mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// The exit status, if the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One test's own topics, consumer group and state directory on the shared broker.
pub struct Scenario {
    /// Bootstrap servers.
    pub brokers: String,
    /// Input topic.
    pub input: String,
    /// Output topic.
    pub output: String,
    /// Dead-letter topic (created by the operator).
    pub dlq: String,
    /// Consumer group.
    pub group: String,
    /// State directory of the operator.
    pub state: PathBuf,
    /// Holds the state directory and the logs.
    pub dir: tempfile::TempDir,
}

impl Scenario {
    /// Creates input and output topics with `partitions` partitions each on the test broker.
    pub fn new(name: &str, partitions: i32) -> Scenario {
        Scenario::on(&require_broker(), name, partitions)
    }

    /// [`Scenario::new`] on the cluster at `brokers`.
    pub fn on(brokers: &str, name: &str, partitions: i32) -> Scenario {
        let brokers = brokers.to_string();
        let (input, output, group) = (unique(&format!("{name}-in")), unique(&format!("{name}-out")), unique(name));
        let dlq = unique(&format!("{name}-dlq"));
        create_topic(&brokers, &input, partitions).unwrap();
        create_topic(&brokers, &output, partitions).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        Scenario { brokers, input, output, dlq, group, state, dir }
    }

    /// `intentflow run` flags for this scenario, then `extra` (metrics are off unless `extra`
    /// sets `--metrics-addr`; a scenario flag that `extra` names again, such as `--state-dir`,
    /// `--group` or `--model-dir`, takes `extra`'s value).
    pub fn run_args(&self, extra: &[&str]) -> Vec<String> {
        let (state, model) = (self.state.display().to_string(), trained_model_dir().display().to_string());
        let base = [
            ("--brokers", self.brokers.as_str()), ("--input-topic", &self.input), ("--output-topic", &self.output),
            ("--dlq-topic", &self.dlq), ("--group", &self.group), ("--state-dir", &state), ("--model-dir", &model),
        ];
        let mut extra: Vec<&str> = extra.to_vec();
        let mut args: Vec<String> = Vec::new();
        for (flag, value) in base {
            let value = match extra.iter().position(|a| *a == flag) {
                Some(i) if i + 1 < extra.len() => {
                    let v = extra.remove(i + 1);
                    extra.remove(i);
                    v.to_string()
                }
                _ => value.to_string(),
            };
            args.extend([flag.to_string(), value]);
        }
        if !extra.contains(&"--metrics-addr") {
            args.extend(["--metrics-addr".to_string(), String::new()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    /// Starts an operator with `args`, logging to `<log>.log` in the scenario directory.
    pub fn start(&self, log: &str, args: &[String]) -> Operator {
        Operator::start(args, self.dir.path().join(format!("{log}.log"))).unwrap()
    }

    /// Reads intents from the output topic until `expected` arrived or none came for `idle`.
    pub fn intents(&self, expected: usize, idle: Duration) -> Vec<ScoredIntent> {
        read_intents(&self.brokers, &self.output, expected, idle).unwrap()
    }

    /// Runs an operator with `args` (logging to `<log>.log`) until `expected` intents are on
    /// the output topic or none came for `idle`, stops it with SIGTERM and asserts a clean
    /// exit. Returns the intents read and the operator's log.
    pub fn run_until(&self, log: &str, args: &[String], expected: usize, idle: Duration) -> (Vec<ScoredIntent>, String) {
        let op = self.start(log, args);
        let intents = self.intents(expected, idle);
        let (status, text) = op.terminate().unwrap();
        assert!(status.success(), "{log}: exit {status}; log:\n{text}");
        (intents, text)
    }
}
