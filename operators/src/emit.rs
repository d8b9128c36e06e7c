//! Emit policies: when an output publishes a user's intent, instead of once per event.
//!
//! A decision depends only on the policy, the score and what the output remembers of the user
//! ([`EmitMemory`]: the last score it published and the level it was at), so it is the same
//! live, after a crash and in a replay, since that memory is kept with the user's state
//! ([`intentflow_state::UserState::outputs`]). The operator decides for each of its
//! [`PolicyOutput`]s as it scores ([`crate::IntentOperator::with_outputs`]) and returns what
//! each publishes ([`Published`]); the caller produces them with the states, in one transaction
//! under exactly-once.

use intentflow_schemas::IntentSchema;
pub use intentflow_state::EmitMemory;
use intentflow_state::topic_id;

/// When an output publishes an intent.
#[derive(Debug, Clone, PartialEq)]
pub enum EmitPolicy {
    /// Every scored event.
    Every,
    /// When the score moved by at least `min_change` since the score this output last published
    /// for the user (a user's first score is always published).
    Delta {
        /// Smallest change published, in probability (e.g. 0.05).
        min_change: f32,
    },
    /// Threshold crossings with hysteresis: published when the score reaches `enter` from
    /// outside, and when it falls below `leave` from inside (`leave <= enter`, so a score
    /// wavering around one cut-off does not alert on every event).
    Threshold {
        /// Score at which a user enters (e.g. 0.6).
        enter: f32,
        /// Score below which an entered user leaves (e.g. 0.5).
        leave: f32,
    },
    /// Segments by ascending cut-offs (`[0.2, 0.6]`: cold below 0.2, warm below 0.6, hot from
    /// 0.6): published when the user's segment changes, and for the user's first score.
    Segments {
        /// Ascending cut-offs; segment `i` is the number of cut-offs at or below the score.
        cuts: Vec<f32>,
        /// The segments' names, one more than the cut-offs (`["cold", "warm", "hot"]`).
        names: Vec<String>,
    },
}

/// An output with a policy, as the operator sees it: a name (the topic), a policy, and whether
/// purchase events are left out.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyOutput {
    /// The output's name: its topic. With the policy's kind it keys the output's memory in user
    /// states ([`PolicyOutput::id`]), so renaming an output or changing its kind of policy
    /// starts its memory afresh.
    pub name: String,
    /// When it publishes.
    pub policy: EmitPolicy,
    /// Whether purchase events are left out: they are neither published nor change the memory.
    pub exclude_purchases: bool,
    /// The schema its intents are written in.
    pub schema: IntentSchema,
}

impl PolicyOutput {
    /// The key of this output's memory in user states: [`topic_id`] of `<name>/<policy kind>`
    /// (a segment level must not be read as a threshold's inside or outside).
    pub fn id(&self) -> u32 {
        memory_id(&self.name, &self.policy)
    }
}

/// The key of the memory of an output named `name` with `policy` ([`PolicyOutput::id`]).
pub fn memory_id(name: &str, policy: &EmitPolicy) -> u32 {
    topic_id(&format!("{name}/{}", policy.kind()))
}

/// One intent an output publishes: the scored event, the output, and its place under the
/// output's policy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Published {
    /// Index of the scored event in [`crate::BatchOutput::scored`].
    pub scored: usize,
    /// The output, as its index among the operator's outputs.
    pub output: usize,
    /// Its level and the previously published score.
    pub emission: Emission,
}

/// A policy that cannot work.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("emit policy {policy}: {reason}")]
pub struct InvalidPolicy {
    /// The policy, as configured.
    pub policy: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// A published intent's place under its policy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Emission {
    /// The user's level after this score (see [`EmitMemory::level`]).
    pub level: u8,
    /// The score the output published before this one, if any.
    pub previous: Option<f32>,
}

impl EmitPolicy {
    /// Whether the policy needs a memory of the user (all but [`EmitPolicy::Every`], whose
    /// intents carry no previous score).
    pub fn remembers(&self) -> bool {
        !matches!(self, EmitPolicy::Every)
    }

    /// The policy's name in configurations: `every`, `delta`, `threshold`, `segments`.
    pub fn kind(&self) -> &'static str {
        match self {
            EmitPolicy::Every => "every",
            EmitPolicy::Delta { .. } => "delta",
            EmitPolicy::Threshold { .. } => "threshold",
            EmitPolicy::Segments { .. } => "segments",
        }
    }

    /// Checks the parameters: probabilities in [0, 1], `leave <= enter`, at most 254 ascending
    /// cut-offs with a distinct name for each segment.
    ///
    /// # Errors
    ///
    /// [`InvalidPolicy`] naming what is wrong.
    pub fn validate(&self) -> Result<(), InvalidPolicy> {
        let bad = |reason| Err(InvalidPolicy { policy: format!("{self:?}"), reason });
        let probability = |x: f32| (0.0..=1.0).contains(&x);
        match self {
            EmitPolicy::Every => Ok(()),
            EmitPolicy::Delta { min_change } if !(*min_change > 0.0 && *min_change <= 1.0) => bad("min_change must be in (0, 1]"),
            EmitPolicy::Threshold { enter, leave } if !probability(*enter) || !probability(*leave) => bad("enter and leave must be in [0, 1]"),
            EmitPolicy::Threshold { enter, leave } if leave > enter => bad("leave must not exceed enter"),
            EmitPolicy::Segments { cuts, .. } if cuts.is_empty() || cuts.len() > 254 => bad("1 to 254 cut-offs"),
            EmitPolicy::Segments { cuts, .. } if !cuts.iter().all(|&c| probability(c)) || !cuts.windows(2).all(|w| w[0] < w[1]) => {
                bad("cut-offs must be strictly ascending probabilities")
            }
            EmitPolicy::Segments { cuts, names } if names.len() != cuts.len() + 1 => bad("one segment name more than cut-offs"),
            EmitPolicy::Segments { names, .. } if names.iter().enumerate().any(|(i, n)| n.is_empty() || names[..i].contains(n)) => {
                bad("segment names must be distinct and not empty")
            }
            _ => Ok(()),
        }
    }

    /// Whether `score` is published, updating the user's `memory` when it is (a skipped score
    /// leaves it as it was).
    pub fn decide(&self, memory: &mut EmitMemory, score: f32) -> Option<Emission> {
        let level = match self {
            EmitPolicy::Every => 0,
            EmitPolicy::Delta { min_change } => {
                if memory.last_published.is_some_and(|last| (score - last).abs() < *min_change) {
                    return None;
                }
                0
            }
            EmitPolicy::Threshold { enter, leave } => {
                let inside = memory.level == 1;
                match (inside, score >= *enter, score < *leave) {
                    (false, true, _) => 1,
                    (true, _, true) => 0,
                    _ => return None,
                }
            }
            EmitPolicy::Segments { cuts, .. } => {
                let segment = cuts.iter().filter(|&&c| c <= score).count() as u8;
                if memory.last_published.is_some() && segment == memory.level {
                    return None;
                }
                segment
            }
        };
        let previous = memory.last_published.replace(score);
        memory.level = level;
        Some(Emission { level, previous })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scores published for one user's `scores`, with their levels.
    fn published(policy: &EmitPolicy, scores: &[f32]) -> Vec<(f32, u8)> {
        let mut memory = EmitMemory::default();
        scores.iter().filter_map(|&s| policy.decide(&mut memory, s).map(|e| (s, e.level))).collect()
    }

    fn segments(cuts: &[f32]) -> EmitPolicy {
        EmitPolicy::Segments { cuts: cuts.to_vec(), names: (0..=cuts.len()).map(|i| format!("s{i}")).collect() }
    }

    const SCORES: [f32; 9] = [0.10, 0.12, 0.30, 0.55, 0.62, 0.58, 0.64, 0.45, 0.70];

    #[test]
    fn every_publishes_each_score() {
        assert_eq!(published(&EmitPolicy::Every, &SCORES).len(), SCORES.len());
    }

    #[test]
    fn delta_publishes_moves_from_the_last_published_score() {
        // 0.10 first; 0.12 is 0.02 from it; 0.30 is 0.20; 0.55 is 0.25; 0.62, 0.58, 0.64 and
        // 0.45 stay within 0.12 of 0.55; 0.70 is 0.15 from it.
        let got: Vec<f32> = published(&EmitPolicy::Delta { min_change: 0.12 }, &SCORES).into_iter().map(|(s, _)| s).collect();
        assert_eq!(got, [0.10, 0.30, 0.55, 0.70]);
    }

    #[test]
    fn threshold_alerts_on_entering_and_leaving_with_hysteresis() {
        // Enters at 0.62, stays in through 0.58 (not below 0.5), leaves at 0.45, re-enters at 0.70.
        let got = published(&EmitPolicy::Threshold { enter: 0.6, leave: 0.5 }, &SCORES);
        assert_eq!(got, [(0.62, 1), (0.45, 0), (0.70, 1)]);
        // Without hysteresis the same scores alert twice more.
        assert_eq!(published(&EmitPolicy::Threshold { enter: 0.6, leave: 0.6 }, &SCORES).len(), 5);
    }

    #[test]
    fn segments_publish_the_first_score_and_each_change() {
        let got = published(&segments(&[0.2, 0.6]), &SCORES);
        assert_eq!(got, [(0.10, 0), (0.30, 1), (0.62, 2), (0.58, 1), (0.64, 2), (0.45, 1), (0.70, 2)]);
    }

    #[test]
    fn a_published_intent_names_the_previous_published_score() {
        let mut memory = EmitMemory::default();
        let policy = EmitPolicy::Delta { min_change: 0.1 };
        assert_eq!(policy.decide(&mut memory, 0.1), Some(Emission { level: 0, previous: None }));
        assert_eq!(policy.decide(&mut memory, 0.15), None);
        assert_eq!(memory.last_published, Some(0.1), "a skipped score leaves the memory");
        assert_eq!(policy.decide(&mut memory, 0.3), Some(Emission { level: 0, previous: Some(0.1) }));
    }

    #[test]
    fn impossible_policies_are_refused() {
        for p in [
            EmitPolicy::Delta { min_change: 0.0 },
            EmitPolicy::Threshold { enter: 0.5, leave: 0.6 },
            EmitPolicy::Threshold { enter: 1.5, leave: 0.6 },
            segments(&[]),
            segments(&[0.6, 0.2]),
            EmitPolicy::Segments { cuts: vec![0.5], names: vec!["cold".into()] },
            EmitPolicy::Segments { cuts: vec![0.5], names: vec!["hot".into(), "hot".into()] },
        ] {
            assert!(p.validate().is_err(), "{p:?}");
        }
        for p in [EmitPolicy::Every, EmitPolicy::Delta { min_change: 0.05 }, EmitPolicy::Threshold { enter: 0.6, leave: 0.5 }, segments(&[0.2, 0.6])] {
            assert_eq!(p.validate(), Ok(()), "{p:?}");
        }
    }
}
