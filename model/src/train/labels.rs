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
    const DAY_MS: i64 = 86_400_000;
    let mut order: Vec<usize> = (0..events.len()).collect();
    order.sort_by(|&a, &b| events[a].user_id.cmp(&events[b].user_id).then(events[a].ts.cmp(&events[b].ts)));
    let mut out: Vec<LabelledSession> = Vec::new();
    let mut state = SessionState::default();
    let mut aggregates = SessionAggregates::default();
    for (k, &i) in order.iter().enumerate() {
        let ev = &events[i];
        let first_of_user = k == 0 || events[order[k - 1]].user_id != ev.user_id;
        if first_of_user {
            state = SessionState::default();
        }
        let (raw, new_session) = spec.featurize_raw(&mut state, ev);
        if new_session {
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
            LabelHorizon::Within24h => order[k + 1..]
                .iter()
                .map(|&j| &events[j])
                .take_while(|e| e.user_id == ev.user_id && e.ts <= ev.ts + DAY_MS)
                .any(|e| e.kind == EventType::Purchase),
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
    out.sort_by_key(|s| s.start_ms);
    out
}
