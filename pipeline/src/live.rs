//! The live view behind the status page (`/` and `/status.json`): records and intents per
//! second over the last five minutes, consumer lag per partition, latency percentiles and the
//! score distribution of the last minute, and the users whose intent rose most in it.
//!
//! Updated once per batch (records, scores) and once per commit (intents, latencies) under one
//! short lock; bounded in memory whatever the rate: per second at most [`SAMPLES_PER_SECOND`]
//! latency samples, and at most [`MAX_TRACKED_USERS`] users followed for the risers.

use serde::Serialize;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

/// Seconds of throughput history shown.
pub const HISTORY_SECONDS: i64 = 300;
/// Seconds over which latencies, scores and risers are taken.
pub const WINDOW_SECONDS: i64 = 60;
/// Latency samples kept per second (each kind); beyond it every n-th is kept.
pub const SAMPLES_PER_SECOND: usize = 2048;
/// Users followed at once for the risers; new users beyond it are not followed until the
/// window drops older ones.
pub const MAX_TRACKED_USERS: usize = 200_000;
/// Risers listed.
const RISERS: usize = 10;

/// One second of the history.
#[derive(Debug, Default)]
struct Second {
    /// Epoch second.
    t: i64,
    records: u64,
    intents: u64,
    /// Scores in bins of 0.1.
    scores: [u64; 10],
    /// Latency samples in seconds: event time → produce, consume → produce.
    event_to_produce: Vec<f32>,
    consume_to_produce: Vec<f32>,
    /// Latency samples offered this second (the stride of what is kept).
    offered: usize,
}

/// A user's intent over the window.
#[derive(Debug)]
struct Rise {
    /// Its score when the window began (or its first score in the window).
    from: f32,
    /// Its latest score.
    to: f32,
    /// When `from` was taken (epoch second).
    since: i64,
    /// Its events since.
    events: u32,
    /// When it was last scored (epoch ms).
    last_ms: i64,
}

#[derive(Debug, Default)]
struct Inner {
    seconds: VecDeque<Second>,
    lag: BTreeMap<(String, i32), i64>,
    users: HashMap<String, Rise>,
}

impl Inner {
    /// The entry of second `t`, made (and the history trimmed) if it is new.
    fn second(&mut self, t: i64) -> &mut Second {
        if self.seconds.back().is_none_or(|s| s.t < t) {
            self.seconds.push_back(Second { t, ..Second::default() });
            while self.seconds.front().is_some_and(|s| s.t <= t - HISTORY_SECONDS) {
                self.seconds.pop_front();
            }
        }
        // A clock that stepped back lands in the latest second.
        self.seconds.back_mut().expect("pushed above")
    }
}

/// The live view; shared by the batch loop, the consumer's statistics callback and the HTTP
/// server.
#[derive(Debug)]
pub struct Live {
    inner: Mutex<Inner>,
    started: Instant,
    model_version: OnceLock<String>,
    instance_id: OnceLock<String>,
}

impl Default for Live {
    fn default() -> Self {
        Live { inner: Mutex::default(), started: Instant::now(), model_version: OnceLock::new(), instance_id: OnceLock::new() }
    }
}

/// Latency percentiles of one kind, in seconds (`None` without samples).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Percentiles {
    /// Samples behind them.
    pub count: usize,
    /// Median.
    pub p50: Option<f64>,
    /// 90th percentile.
    pub p90: Option<f64>,
    /// 99th percentile.
    pub p99: Option<f64>,
    /// Largest.
    pub max: Option<f64>,
}

impl Percentiles {
    fn of(mut v: Vec<f32>) -> Percentiles {
        v.sort_unstable_by(f32::total_cmp);
        let q = |p: f64| (!v.is_empty()).then(|| f64::from(v[((v.len() - 1) as f64 * p).round() as usize]));
        Percentiles { count: v.len(), p50: q(0.5), p90: q(0.9), p99: q(0.99), max: q(1.0) }
    }
}

/// `/status.json`: what the status page draws.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// The operator's phase.
    pub status: crate::telemetry::Phase,
    /// The served model.
    pub model_version: String,
    /// This instance's id.
    pub instance_id: String,
    /// Seconds since start-up.
    pub uptime_seconds: f64,
    /// Totals since start-up.
    pub totals: Totals,
    /// Records and intents per second.
    pub throughput: Throughput,
    /// Records not yet consumed, per assigned input partition.
    pub lag: Vec<Lag>,
    /// Latency percentiles over the window.
    pub latency: Latency,
    /// The window's scores in ten bins.
    pub scores: Scores,
    /// The users whose score rose most in the window.
    pub risers: Vec<Riser>,
}

/// Totals since start-up.
#[derive(Debug, Clone, Serialize)]
pub struct Totals {
    /// Records consumed.
    pub records_in: u64,
    /// Intents produced and committed.
    pub intents_out: u64,
    /// Records rejected.
    pub invalid: u64,
}

/// Per-second counts.
#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    /// Seconds per point.
    pub interval_seconds: u32,
    /// Oldest first; seconds without activity are points of zero.
    pub points: Vec<Point>,
}

/// One second of throughput.
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    /// Its start (epoch ms).
    pub t_ms: i64,
    /// Records consumed.
    pub records: u64,
    /// Intents produced.
    pub intents: u64,
}

/// One partition's lag.
#[derive(Debug, Clone, Serialize)]
pub struct Lag {
    /// Input topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Records not yet consumed.
    pub records: i64,
}

/// Both latencies.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    /// Seconds the percentiles cover.
    pub window_seconds: i64,
    /// From the event's own time to its intent produced (committed under exactly-once).
    pub event_to_produce_seconds: Percentiles,
    /// From the record handed to the operator to its intent produced.
    pub consume_to_produce_seconds: Percentiles,
}

/// Score distribution.
#[derive(Debug, Clone, Serialize)]
pub struct Scores {
    /// Seconds covered.
    pub window_seconds: i64,
    /// Counts of scores in [0, 0.1), …, [0.9, 1.0].
    pub bins: [u64; 10],
    /// Scores counted.
    pub count: u64,
}

/// A user whose intent rose.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Riser {
    /// The user.
    pub user: String,
    /// Score at the window's start (or the first in it).
    pub from: f32,
    /// Latest score.
    pub to: f32,
    /// `to - from`.
    pub rise: f32,
    /// Events in the window.
    pub events: u32,
    /// When last scored (epoch ms).
    pub last_ms: i64,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Live {
    /// Names what is served (once the model is loaded and the instance id known).
    pub fn identify(&self, model_version: &str, instance_id: &str) {
        let _ = self.model_version.set(model_version.to_string());
        let _ = self.instance_id.set(instance_id.to_string());
    }

    /// A batch consumed `records` and scored these users (user, score).
    pub fn batch<'a>(&self, records: u64, scored: impl IntoIterator<Item = (&'a str, f32)>) {
        self.batch_at(now_ms(), records, scored);
    }

    fn batch_at<'a>(&self, now_ms: i64, records: u64, scored: impl IntoIterator<Item = (&'a str, f32)>) {
        let t = now_ms.div_euclid(1000);
        let mut inner = self.inner.lock().expect("live lock");
        let inner = &mut *inner;
        let second = inner.second(t);
        second.records += records;
        let mut bins = [0u64; 10];
        for (user, score) in scored {
            bins[((score * 10.0) as usize).min(9)] += 1;
            let room = inner.users.len() < MAX_TRACKED_USERS;
            match inner.users.get_mut(user) {
                Some(r) => {
                    if r.since <= t - WINDOW_SECONDS {
                        // A new window starts from the score the user had.
                        (r.from, r.since, r.events) = (r.to, t, 0);
                    }
                    r.to = score;
                    r.events += 1;
                    r.last_ms = now_ms;
                }
                None if room => {
                    inner.users.insert(user.to_string(), Rise { from: score, to: score, since: t, events: 1, last_ms: now_ms });
                }
                None => {}
            }
        }
        let second = inner.second(t);
        second.scores.iter_mut().zip(bins).for_each(|(a, b)| *a += b);
        if inner.users.len() >= MAX_TRACKED_USERS {
            inner.users.retain(|_, r| r.last_ms > now_ms - WINDOW_SECONDS * 1000);
        }
    }

    /// A commit made intents visible: their latencies in seconds (event time → produce, and
    /// consume → produce, one per intent).
    pub fn produced(&self, event_to_produce: impl ExactSizeIterator<Item = f64>, consume_to_produce: impl Iterator<Item = f64>) {
        let n = event_to_produce.len();
        let mut inner = self.inner.lock().expect("live lock");
        let second = inner.second(now_ms().div_euclid(1000));
        second.intents += n as u64;
        // Every stride-th sample, so that a second keeps at most SAMPLES_PER_SECOND of each.
        let stride = (second.offered + n).div_ceil(SAMPLES_PER_SECOND).max(1);
        let start = second.offered;
        second.offered += n;
        for (i, (e, c)) in event_to_produce.zip(consume_to_produce).enumerate() {
            if (start + i) % stride == 0 && second.event_to_produce.len() < SAMPLES_PER_SECOND {
                second.event_to_produce.push(e as f32);
                second.consume_to_produce.push(c as f32);
            }
        }
    }

    /// The lag of an assigned input partition.
    pub fn set_lag(&self, topic: &str, partition: i32, records: i64) {
        self.inner.lock().expect("live lock").lag.insert((topic.to_string(), partition), records);
    }

    /// The partitions were revoked: their lag is their next owner's to report.
    pub fn clear_lag(&self) {
        self.inner.lock().expect("live lock").lag.clear();
    }

    /// What `/status.json` answers.
    pub fn status(&self, health: &crate::telemetry::Health) -> Status {
        self.status_at(now_ms(), health)
    }

    fn status_at(&self, now_ms: i64, health: &crate::telemetry::Health) -> Status {
        let t = now_ms.div_euclid(1000);
        let inner = self.inner.lock().expect("live lock");
        let by_second: HashMap<i64, &Second> = inner.seconds.iter().map(|s| (s.t, s)).collect();
        let points = (t - HISTORY_SECONDS + 1..=t)
            .map(|s| {
                let x = by_second.get(&s);
                Point { t_ms: s * 1000, records: x.map_or(0, |x| x.records), intents: x.map_or(0, |x| x.intents) }
            })
            .collect();
        let window: Vec<&Second> = inner.seconds.iter().filter(|s| s.t > t - WINDOW_SECONDS).collect();
        let mut bins = [0u64; 10];
        for s in &window {
            bins.iter_mut().zip(s.scores).for_each(|(a, b)| *a += b);
        }
        let samples = |f: fn(&Second) -> &Vec<f32>| Percentiles::of(window.iter().flat_map(|s| f(s).iter().copied()).collect());
        let mut risers: Vec<Riser> = inner
            .users
            .iter()
            .filter(|(_, r)| r.since > t - WINDOW_SECONDS && r.to > r.from)
            .map(|(u, r)| Riser { user: u.clone(), from: r.from, to: r.to, rise: r.to - r.from, events: r.events, last_ms: r.last_ms })
            .collect();
        risers.sort_by(|a, b| b.rise.total_cmp(&a.rise).then_with(|| a.user.cmp(&b.user)));
        risers.truncate(RISERS);
        let totals = health.totals();
        Status {
            status: health.phase(),
            model_version: self.model_version.get().cloned().unwrap_or_default(),
            instance_id: self.instance_id.get().cloned().unwrap_or_default(),
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            totals,
            throughput: Throughput { interval_seconds: 1, points },
            lag: inner.lag.iter().map(|((topic, partition), &records)| Lag { topic: topic.clone(), partition: *partition, records }).collect(),
            latency: Latency {
                window_seconds: WINDOW_SECONDS,
                event_to_produce_seconds: samples(|s| &s.event_to_produce),
                consume_to_produce_seconds: samples(|s| &s.consume_to_produce),
            },
            scores: Scores { window_seconds: WINDOW_SECONDS, bins, count: bins.iter().sum() },
            risers,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::Health;

    #[test]
    fn the_window_counts_scores_latencies_and_risers() {
        let live = Live::default();
        let health = Health::default();
        let t0 = 1_764_500_000_000;
        live.batch_at(t0, 3, [("a", 0.05), ("b", 0.5), ("c", 0.95)]);
        live.batch_at(t0 + 1_500, 2, [("a", 0.45), ("b", 0.40)]);
        live.batch_at(t0 + 2_000, 1, [("a", 0.75)]);
        let s = live.status_at(t0 + 2_500, &health);
        assert_eq!(s.scores.count, 6);
        assert_eq!(s.scores.bins, [1, 0, 0, 0, 2, 1, 0, 1, 0, 1]);
        let records: u64 = s.throughput.points.iter().map(|p| p.records).sum();
        assert_eq!((records, s.throughput.points.len()), (6, HISTORY_SECONDS as usize));
        assert_eq!(s.throughput.points.last().unwrap().records, 1);
        // a rose 0.05 → 0.75 in three events; b fell; c did not move.
        assert_eq!(s.risers.len(), 1);
        assert_eq!((s.risers[0].user.as_str(), s.risers[0].events), ("a", 3));
        assert!((s.risers[0].rise - 0.70).abs() < 1e-6);
        // A minute later a's window starts from its last score.
        live.batch_at(t0 + 70_000, 1, [("a", 0.80)]);
        let s = live.status_at(t0 + 70_000, &health);
        assert_eq!(s.scores.count, 1, "older scores left the window");
        assert!((s.risers[0].from - 0.75).abs() < 1e-6 && s.risers[0].events == 1);
    }

    #[test]
    fn latencies_are_sampled_within_a_bound_and_summarised() {
        let live = Live::default();
        let n = 3 * SAMPLES_PER_SECOND;
        live.produced((0..n).map(|i| i as f64 / n as f64), (0..n).map(|_| 0.02));
        let s = live.status(&Health::default());
        let e = &s.latency.event_to_produce_seconds;
        assert!(e.count <= SAMPLES_PER_SECOND && e.count >= SAMPLES_PER_SECOND / 2, "{e:?}");
        assert!((e.p50.unwrap() - 0.5).abs() < 0.01, "{e:?}");
        assert_eq!(s.latency.consume_to_produce_seconds.p99, Some(f64::from(0.02f32)));
        assert_eq!(s.throughput.points.iter().map(|p| p.intents).sum::<u64>(), n as u64);
        let empty = Live::default().status(&Health::default());
        assert_eq!((empty.latency.event_to_produce_seconds.count, empty.latency.event_to_produce_seconds.p50), (0, None));
    }
}
