//! `intentflow bench --replay`: `intentflow replay` measured in-process, from a Parquet file of
//! generated sessions (`intentflow generate`'s) into a fresh state directory and a Parquet file
//! of intents, as a backfill runs. Writing the input file is not measured; the replay is, from
//! loading the model to its last state written (`ReplaySummary::seconds`). CPU seconds, peak
//! RSS and bytes written are the process's over the replay (the intents' Parquet file
//! included); latency does not apply.

use super::{compacted_state_bytes, cpu_seconds, disk_write_bytes, peak_rss_bytes, reset_peak_rss, BenchArgs, RunResult, Stages, SELF};
use crate::config::RunConfig;
use crate::output::Output;
use crate::replay::{self, Bound, Inputs, ReplayJob, Target};
use anyhow::{Context, Result};
use intentflow_formats::generate::{generate, GeneratorConfig};
use std::path::Path;

/// One replay of `events` generated events over `args.users` users, in `work`.
pub(super) async fn run_replay(args: &BenchArgs, model_dir: &Path, work: &Path, events: u64, run: usize) -> Result<RunResult> {
    let name = format!("replay-events-{}-{}-{}", args.users, events, args.seed);
    let input = work.join(format!("{name}.parquet"));
    if !input.exists() {
        let users = usize::try_from(args.users).context("--users")?;
        let generated = generate(&GeneratorConfig { users, events: usize::try_from(events).context("--events")?.max(users), seed: args.seed, ..Default::default() });
        // Renamed once whole: a run stopped while writing leaves no truncated file to reuse.
        let partial = work.join(format!("{name}.partial.parquet"));
        let mut out = Output::file(&partial)?;
        out.write(generated).await?;
        out.finish().await?;
        std::fs::rename(&partial, &input)?;
    }
    let (state_dir, intents) = (work.join(format!("replay-state-{run}")), work.join(format!("replay-intents-{run}.parquet")));
    let _ = std::fs::remove_dir_all(&state_dir);
    let defaults = RunConfig::default();
    let job = ReplayJob {
        clients: defaults.clients(),
        inputs: Inputs::Files(vec![input]),
        from: Bound::Earliest,
        to: Bound::Latest,
        model_dir: model_dir.to_path_buf(),
        state_dir: state_dir.clone(),
        target: Target::File(intents.clone()),
        max_batch_records: replay::MAX_BATCH_RECORDS,
        max_events_in_memory: replay::MAX_EVENTS_IN_MEMORY,
        spill_dir: None,
        device: args.device,
        limits: defaults.limits(),
        reasons: args.reasons,
        outputs: Vec::new(),
        schema: defaults.output_schema,
    };
    reset_peak_rss();
    let (cpu_start, disk_start) = (cpu_seconds(SELF), disk_write_bytes(SELF));
    let summary = replay::replay(&job).await?;
    let cpu = cpu_seconds(SELF) - cpu_start;
    let disk_bytes = disk_write_bytes(SELF) - disk_start;
    let peak_rss = peak_rss_bytes(SELF);
    let state_bytes = tokio::task::block_in_place(|| compacted_state_bytes(&state_dir))?;
    std::fs::remove_dir_all(&state_dir)?;
    std::fs::remove_file(&intents)?;
    Ok(RunResult {
        mode: "replay, Parquet to Parquet".into(),
        rate: None,
        events: summary.events,
        users: args.users,
        seconds: summary.seconds,
        cpu_seconds: cpu,
        latency_us: super::latency_histogram()?,
        peak_rss,
        state_bytes,
        disk_bytes,
        batches: 0,
        stages: Stages::default(),
    })
}
