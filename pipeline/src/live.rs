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
/// Latency samples kept per second (each kind); beyond it a uniform sample of the second's
/// latencies is kept (reservoir sampling).
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
    /// Latency samples offered this second.
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
    /// The second the followed users were last trimmed to the window.
    users_trimmed: i64,
    /// State of the reservoir sampling's generator (xorshift64).
    rng: u64,
}

impl Inner {
    /// The entry of second `t`, made (and the history trimmed) if it is new. Seconds that
    /// leave the window drop their latency samples; their counts stay for the history.
    fn second(&mut self, t: i64) -> &mut Second {
        if self.seconds.back().is_none_or(|s| s.t < t) {
            self.seconds.push_back(Second { t, ..Second::default() });
            while self.seconds.front().is_some_and(|s| s.t <= t - HISTORY_SECONDS) {
                self.seconds.pop_front();
            }
            for old in self.seconds.iter_mut().take_while(|s| s.t <= t - WINDOW_SECONDS) {
                old.event_to_produce = Vec::new();
                old.consume_to_produce = Vec::new();
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
    /// The model served now (a reload replaces it).
    model_version: Mutex<String>,
    instance_id: OnceLock<String>,
}

impl Default for Live {
    fn default() -> Self {
        Live { inner: Mutex::default(), started: Instant::now(), model_version: Mutex::default(), instance_id: OnceLock::new() }
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
        self.serves(model_version);
        let _ = self.instance_id.set(instance_id.to_string());
    }

    /// The model served from now on.
    pub fn serves(&self, model_version: &str) {
        *self.model_version.lock().expect("model lock") = model_version.to_string();
    }

    /// Forgets these users (erased or expired): the rising users no longer list them.
    pub fn forget<'a>(&self, users: impl IntoIterator<Item = &'a str>) {
        let mut inner = self.inner.lock().expect("live lock");
        for user in users {
            inner.users.remove(user);
        }
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
        // Full: drop the users the window left, at most once a second (a full map of users all
        // active would otherwise be rescanned on every batch).
        if inner.users.len() >= MAX_TRACKED_USERS && inner.users_trimmed < t {
            inner.users.retain(|_, r| r.last_ms > now_ms - WINDOW_SECONDS * 1000);
            inner.users_trimmed = t;
        }
    }

    /// A commit made intents visible: their latencies in seconds (event time → produce, and
    /// consume → produce, one per intent).
    pub fn produced(&self, event_to_produce: impl ExactSizeIterator<Item = f64>, consume_to_produce: impl Iterator<Item = f64>) {
        self.produced_at(now_ms(), event_to_produce, consume_to_produce);
    }

    fn produced_at(&self, now_ms: i64, event_to_produce: impl ExactSizeIterator<Item = f64>, consume_to_produce: impl Iterator<Item = f64>) {
        let n = event_to_produce.len();
        let mut inner = self.inner.lock().expect("live lock");
        let inner = &mut *inner;
        let mut rng = if inner.rng == 0 { 0x9E37_79B9_7F4A_7C15 } else { inner.rng };
        let second = inner.second(now_ms.div_euclid(1000));
        second.intents += n as u64;
        // Algorithm R: after k offers each is kept with probability SAMPLES_PER_SECOND / k, so
        // the kept samples are a uniform sample of the second, early and late batches alike.
        for (e, c) in event_to_produce.zip(consume_to_produce) {
            second.offered += 1;
            if second.event_to_produce.len() < SAMPLES_PER_SECOND {
                second.event_to_produce.push(e as f32);
                second.consume_to_produce.push(c as f32);
                continue;
            }
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let slot = (rng % second.offered as u64) as usize;
            if slot < SAMPLES_PER_SECOND {
                second.event_to_produce[slot] = e as f32;
                second.consume_to_produce[slot] = c as f32;
            }
        }
        inner.rng = rng;
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
        // Copy out under the lock; sort and format after it, so the batch loop never waits
        // on a status request.
        let (points, bins, event_to_produce, consume_to_produce, risers, lag) = {
            let inner = self.inner.lock().expect("live lock");
            let mut counts = inner.seconds.iter().map(|s| (s.t, s.records, s.intents)).peekable();
            let points = (t - HISTORY_SECONDS + 1..=t)
                .map(|sec| {
                    while counts.next_if(|&(at, ..)| at < sec).is_some() {}
                    let (records, intents) = counts.next_if(|&(at, ..)| at == sec).map_or((0, 0), |(_, r, i)| (r, i));
                    Point { t_ms: sec * 1000, records, intents }
                })
                .collect::<Vec<_>>();
            let window = || inner.seconds.iter().filter(|s| s.t > t - WINDOW_SECONDS);
            let mut bins = [0u64; 10];
            window().for_each(|s| bins.iter_mut().zip(s.scores).for_each(|(a, b)| *a += b));
            let event_to_produce: Vec<f32> = window().flat_map(|s| s.event_to_produce.iter().copied()).collect();
            let consume_to_produce: Vec<f32> = window().flat_map(|s| s.consume_to_produce.iter().copied()).collect();
            let lag: Vec<Lag> = inner.lag.iter().map(|((topic, partition), &records)| Lag { topic: topic.clone(), partition: *partition, records }).collect();
            (points, bins, event_to_produce, consume_to_produce, top_risers(&inner.users, t), lag)
        };
        Status {
            status: health.phase(),
            model_version: self.model_version.lock().expect("model lock").clone(),
            instance_id: self.instance_id.get().cloned().unwrap_or_default(),
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            totals: health.totals(),
            throughput: Throughput { interval_seconds: 1, points },
            lag,
            latency: Latency {
                window_seconds: WINDOW_SECONDS,
                event_to_produce_seconds: Percentiles::of(event_to_produce),
                consume_to_produce_seconds: Percentiles::of(consume_to_produce),
            },
            scores: Scores { window_seconds: WINDOW_SECONDS, bins, count: bins.iter().sum() },
            risers,
        }
    }
}

/// The [`RISERS`] users whose score rose most in the window ending at second `t`, largest rise
/// first (ties by user id): one pass keeping the best few, only they copied out.
fn top_risers(users: &HashMap<String, Rise>, t: i64) -> Vec<Riser> {
    let better = |a: (&String, f32), b: (&String, f32)| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(b.0));
    let mut best: Vec<(&String, &Rise)> = Vec::with_capacity(RISERS + 1);
    for (user, r) in users.iter().filter(|(_, r)| r.since > t - WINDOW_SECONDS && r.to > r.from) {
        let rise = r.to - r.from;
        if best.len() == RISERS && better((user, rise), (best[RISERS - 1].0, best[RISERS - 1].1.to - best[RISERS - 1].1.from)).is_ge() {
            continue;
        }
        let at = best.partition_point(|&(u, b)| better((u, b.to - b.from), (user, rise)).is_lt());
        best.insert(at, (user, r));
        best.truncate(RISERS);
    }
    best.into_iter().map(|(u, r)| Riser { user: u.clone(), from: r.from, to: r.to, rise: r.to - r.from, events: r.events, last_ms: r.last_ms }).collect()
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
    fn latencies_are_sampled_uniformly_within_a_bound_and_summarised() {
        let live = Live::default();
        let health = Health::default();
        let t0 = 1_764_500_000_000;
        // One second: a first commit of fast intents, then three times as many slow ones. A
        // uniform sample keeps about three slow for each fast one, whatever came first.
        let (fast, slow) = (SAMPLES_PER_SECOND, 3 * SAMPLES_PER_SECOND);
        live.produced_at(t0, (0..fast).map(|_| 0.01), (0..fast).map(|_| 0.02));
        live.produced_at(t0 + 500, (0..slow).map(|i| 1.0 + i as f64 / slow as f64), (0..slow).map(|_| 0.02));
        let s = live.status_at(t0 + 900, &health);
        let e = &s.latency.event_to_produce_seconds;
        assert_eq!(e.count, SAMPLES_PER_SECOND, "{e:?}");
        let kept_slow = live.inner.lock().unwrap().seconds[0].event_to_produce.iter().filter(|&&x| x >= 1.0).count();
        let share = kept_slow as f64 / SAMPLES_PER_SECOND as f64;
        assert!((share - 0.75).abs() < 0.05, "slow share {share}");
        assert!(e.p50.unwrap() >= 1.0 && e.max.unwrap() < 2.0, "{e:?}");
        assert_eq!(s.latency.consume_to_produce_seconds.p99, Some(f64::from(0.02f32)));
        assert_eq!(s.throughput.points.iter().map(|p| p.intents).sum::<u64>(), (fast + slow) as u64);
        // A minute on, the samples have left the window and are dropped; the counts stay.
        live.produced_at(t0 + 61_000, [0.5].into_iter(), [0.5].into_iter());
        assert!(live.inner.lock().unwrap().seconds[0].event_to_produce.is_empty());
        let s = live.status_at(t0 + 61_000, &health);
        assert_eq!((s.latency.event_to_produce_seconds.count, s.throughput.points.iter().map(|p| p.intents).sum::<u64>()), (1, (fast + slow + 1) as u64));
        let empty = Live::default().status(&health);
        assert_eq!((empty.latency.event_to_produce_seconds.count, empty.latency.event_to_produce_seconds.p50), (0, None));
    }

    #[test]
    fn the_risers_are_the_largest_rises_in_order() {
        let live = Live::default();
        let t0 = 1_764_500_000_000;
        let users: Vec<String> = (0..100).map(|i| format!("u{i:03}")).collect();
        live.batch_at(t0, 100, users.iter().map(|u| (u.as_str(), 0.1)));
        // u000 rises 0.0, u001 0.005, …; u051 and u050 rise most, tie, and are listed by id.
        live.batch_at(t0 + 1_000, 100, users.iter().enumerate().map(|(i, u)| (u.as_str(), 0.1 + if matches!(i, 50 | 51) { 0.6 } else { i as f32 * 0.005 })));
        let risers = live.status_at(t0 + 2_000, &Health::default()).risers;
        let names: Vec<&str> = risers.iter().map(|r| r.user.as_str()).collect();
        assert_eq!(names, ["u050", "u051", "u099", "u098", "u097", "u096", "u095", "u094", "u093", "u092"]);
        assert!(risers.windows(2).all(|w| w[0].rise >= w[1].rise));
    }
}
