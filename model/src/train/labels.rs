//! Labels and the time split: events cut into labelled sessions ([`labelled_sessions`]), what a
//! label predicts ([`LabelHorizon`]), and which sessions train, validate and test ([`SplitSpec`]).

use crate::baseline::SessionAggregates;
use crate::{FeatureSpec, Features};
use intentflow_schemas::{Event, EventType, SessionState};
use serde::{Deserialize, Serialize};

/// What a label predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LabelHorizon {
    /// The current session purchases later.
    #[default]
    Session,
    /// The user purchases within 24 hours.
    Within24h,
}

/// How sessions are split by start time.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SplitSpec {
    /// Share of sessions, just before the test split, that validate.
    pub val_fraction: f64,
    /// Share of sessions, the latest, held out for testing.
    pub test_fraction: f64,
}

impl Default for SplitSpec {
    fn default() -> Self {
        SplitSpec { val_fraction: 0.15, test_fraction: 0.30 }
    }
}

/// Which part of a split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Training sessions.
    Train,
    /// Validation sessions.
    Validation,
    /// Test sessions.
    Test,
    /// Every session.
    All,
}

impl Part {
    /// `train`, `validation`, `test` or `all`.
    pub fn as_str(self) -> &'static str {
        match self {
            Part::Train => "train",
            Part::Validation => "validation",
            Part::Test => "test",
            Part::All => "all",
        }
    }
}

impl SplitSpec {
    /// Index ranges (train, validation, test) of `n` sessions sorted by start time.
    pub fn ranges(&self, n: usize) -> [std::ops::Range<usize>; 3] {
        let n_test = ((n as f64) * self.test_fraction).round() as usize;
        let n_val = ((n as f64) * self.val_fraction).round() as usize;
        let test_start = n - n_test.min(n);
        let val_start = test_start - n_val.min(test_start);
        [0..val_start, val_start..test_start, test_start..n]
    }

    /// The sessions of `part`; `sessions` must be sorted by start time.
    pub fn part<'a, T>(&self, sessions: &'a [T], part: Part) -> &'a [T] {
        let [train, val, test] = self.ranges(sessions.len());
        match part {
            Part::Train => &sessions[train],
            Part::Validation => &sessions[val],
            Part::Test => &sessions[test],
            Part::All => sessions,
        }
    }
}

/// One session as a training sequence (raw, unnormalised features).
#[derive(Debug, Clone, PartialEq)]
pub struct LabelledSession {
    /// Time of the session's first event.
    pub start_ms: i64,
    /// Raw features per event.
    pub features: Vec<Features>,
    /// 1.0 if the label holds after this event.
    pub labels: Vec<f32>,
    /// 1.0 where the label counts (0 for the purchase event that closes the session).
    pub mask: Vec<f32>,
    /// Session aggregates so far per event, the baseline's inputs ([`AGGREGATE_NAMES`](crate::baseline::AGGREGATE_NAMES)).
    pub aggregates: Vec<Vec<f64>>,
    /// Index of each event in the input slice.
    pub events: Vec<usize>,
}

/// Cuts events into labelled sessions with features computed by `spec` (its normalisation is
/// not applied). Events are grouped by user and ordered by time; events with equal times keep
/// their input order. Sessions come sorted by start time (ties by user).
pub fn labelled_sessions(events: &[Event], spec: &FeatureSpec, horizon: LabelHorizon) -> Vec<LabelledSession> {
    let mut out: Vec<LabelledSession> = Vec::new();
    for user in by_user(events) {
        user_sessions(&user, spec, horizon, &mut out);
    }
    out.sort_by_key(|s| s.start_ms);
    out
}

/// Each user's (input index, event), users by id, each user's events in time order (equal times
/// in input order): the order sessions are cut in.
pub fn by_user(events: &[Event]) -> Vec<Vec<(usize, &Event)>> {
    let mut order: Vec<usize> = (0..events.len()).collect();
    order.sort_by(|&a, &b| events[a].user_id.cmp(&events[b].user_id).then(events[a].ts.cmp(&events[b].ts)));
    order.chunk_by(|&a, &b| events[a].user_id == events[b].user_id).map(|user| user.iter().map(|&i| (i, &events[i])).collect()).collect()
}

/// Appends the labelled sessions of one user's events to `out`, in order: `events` are the
/// user's (input index, event) in time order (equal times in input order).
pub fn user_sessions(events: &[(usize, &Event)], spec: &FeatureSpec, horizon: LabelHorizon, out: &mut Vec<LabelledSession>) {
    const DAY_MS: i64 = 86_400_000;
    let mut state = SessionState::default();
    let mut aggregates = SessionAggregates::default();
    let first = out.len();
    for (k, &(i, ev)) in events.iter().enumerate() {
        let (raw, new_session) = spec.featurize_raw(&mut state, ev);
        if new_session || out.len() == first {
            aggregates = SessionAggregates::default();
            out.push(LabelledSession {
                start_ms: ev.ts,
                features: Vec::new(),
                labels: Vec::new(),
                mask: Vec::new(),
                aggregates: Vec::new(),
                events: Vec::new(),
            });
        }
        let s = out.last_mut().expect("the first event of a user opens a session");
        let purchase = ev.kind == EventType::Purchase;
        let label = match horizon {
            LabelHorizon::Session => false,
            LabelHorizon::Within24h => events[k + 1..].iter().take_while(|(_, e)| e.ts <= ev.ts + DAY_MS).any(|(_, e)| e.kind == EventType::Purchase),
        };
        s.features.push(raw);
        s.aggregates.push(aggregates.push(ev, &state));
        s.events.push(i);
        s.labels.push(if purchase { 0.0 } else { f32::from(u8::from(label)) });
        s.mask.push(if purchase { 0.0 } else { 1.0 });
        if purchase && horizon == LabelHorizon::Session {
            let n = s.labels.len();
            s.labels[..n - 1].iter_mut().for_each(|l| *l = 1.0);
        }
    }
}
