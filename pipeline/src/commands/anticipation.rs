//! How well streamed scores anticipated purchases: per session (a user's `session_seq`), did
//! the score cross the model's decision threshold before the session's first purchase, and how
//! long before; and how often a session without a purchase crossed it too. `intentflow eval
//! --intents` prints it; the demo ends with it.

use intentflow_schemas::{EventType, ScoredIntent};
use std::collections::BTreeMap;

/// The anticipation of purchases by a set of sessions' scores.
#[derive(Debug, Clone, PartialEq)]
pub struct Anticipation {
    /// The decision threshold.
    pub threshold: f64,
    /// Sessions with a purchase (after at least one earlier event: a session that opens with
    /// its purchase gives nothing to anticipate).
    pub purchasing: usize,
    /// Of those, sessions whose score reached the threshold at an event before the purchase.
    pub anticipated: usize,
    /// Seconds from the first crossing to the purchase: quartiles (25 %, 50 %, 75 %).
    pub lead_seconds: Option<[f64; 3]>,
    /// Sessions without a purchase.
    pub other: usize,
    /// Of those, sessions whose score reached the threshold (false alarms).
    pub other_crossed: usize,
}

/// One session's events in order: (time in ms, purchase?, score).
type Session = Vec<(i64, bool, f32)>;

/// Groups intents into sessions (user, `session_seq`), each in event order; sessions are
/// returned in order of their first event.
fn sessions(intents: &[ScoredIntent]) -> Vec<Session> {
    let mut by: BTreeMap<(&str, u32), Session> = BTreeMap::new();
    for i in intents {
        let Ok(t) = chrono::DateTime::parse_from_rfc3339(&i.event_ts) else { continue };
        by.entry((i.user_id.as_str(), i.session_seq)).or_default().push((t.timestamp_millis(), i.event_type == EventType::Purchase, i.score));
    }
    let mut out: Vec<Session> = by.into_values().collect();
    for s in &mut out {
        s.sort_by_key(|e| e.0);
    }
    out.sort_by_key(|s| s[0].0);
    out
}

/// The anticipation of `sessions` at `threshold`.
fn measure(sessions: &[Session], threshold: f64) -> Anticipation {
    let mut a = Anticipation { threshold, purchasing: 0, anticipated: 0, lead_seconds: None, other: 0, other_crossed: 0 };
    let mut leads: Vec<f64> = Vec::new();
    for s in sessions {
        match s.iter().position(|e| e.1) {
            Some(0) => {}
            Some(p) => {
                a.purchasing += 1;
                if let Some(first) = s[..p].iter().find(|e| f64::from(e.2) >= threshold) {
                    a.anticipated += 1;
                    leads.push((s[p].0 - first.0) as f64 / 1000.0);
                }
            }
            None => {
                a.other += 1;
                a.other_crossed += usize::from(s.iter().any(|e| f64::from(e.2) >= threshold));
            }
        }
    }
    leads.sort_by(f64::total_cmp);
    let q = |p: f64| leads[((leads.len() - 1) as f64 * p).round() as usize];
    a.lead_seconds = (!leads.is_empty()).then(|| [q(0.25), q(0.5), q(0.75)]);
    a
}

/// The anticipation of every session, and of the latest `held_out` share of sessions by start
/// (those after a model's training split when it is the share the model held out).
pub fn anticipation(intents: &[ScoredIntent], threshold: f64, held_out: f64) -> (Anticipation, Anticipation) {
    let all = sessions(intents);
    let later = ((all.len() as f64) * (1.0 - held_out)).floor() as usize;
    (measure(&all, threshold), measure(&all[later.min(all.len())..], threshold))
}

/// A duration in words: seconds, minutes or hours.
fn span(seconds: f64) -> String {
    match seconds {
        s if s < 90.0 => format!("{s:.0} s"),
        s if s < 5400.0 => format!("{:.1} min", s / 60.0),
        s => format!("{:.1} h", s / 3600.0),
    }
}

impl std::fmt::Display for Anticipation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pct = |n: usize, of: usize| if of == 0 { "n/a".to_string() } else { format!("{:.1} %", 100.0 * n as f64 / of as f64) };
        write!(f, "{} of {} purchasing sessions ({}) crossed {:.3} before the purchase", self.anticipated, self.purchasing, pct(self.anticipated, self.purchasing), self.threshold)?;
        if let Some([q1, q2, q3]) = self.lead_seconds {
            write!(f, ", a median {} before it (quartiles {} – {})", span(q2), span(q1), span(q3))?;
        }
        write!(f, "; {} of {} sessions without a purchase crossed it too ({})", self.other_crossed, self.other, pct(self.other_crossed, self.other))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use intentflow_schemas::SourcePosition;

    fn intent(user: &str, seq: u32, t_s: i64, kind: EventType, score: f32) -> ScoredIntent {
        ScoredIntent {
            v: 1,
            user_id: user.into(),
            score,
            event_ts: intentflow_schemas::format_ts_ms(1_764_500_000_000 + t_s * 1000),
            event_type: kind,
            event_id: None,
            session_id: None,
            session_seq: seq,
            session_events: 1,
            model_version: "m".into(),
            source: SourcePosition { topic: "t".into(), partition: 0, offset: 0 },
            emitted_at: String::new(),
            reasons: Vec::new(),
            detail: Default::default(),
            placement: Default::default(),
        }
    }

    #[test]
    fn crossings_before_purchases_count_with_their_lead() {
        use EventType::{AddToCart as C, Purchase as P, View as V};
        let intents = [
            // Crossed 0.5 at 100 s, bought at 400 s: anticipated by 300 s.
            intent("a", 0, 0, V, 0.1),
            intent("a", 0, 100, C, 0.6),
            intent("a", 0, 400, P, 0.9),
            // Bought without crossing first (the purchase's own score does not count).
            intent("b", 0, 50, V, 0.2),
            intent("b", 0, 60, P, 0.8),
            // Opens with its purchase: nothing to anticipate.
            intent("b", 1, 1000, P, 0.9),
            // No purchase, crossed: a false alarm; and one that stayed low.
            intent("c", 0, 10, V, 0.7),
            intent("d", 0, 2000, V, 0.1),
        ];
        let (all, later) = anticipation(&intents, 0.5, 0.25);
        assert_eq!((all.purchasing, all.anticipated, all.other, all.other_crossed), (2, 1, 2, 1));
        assert_eq!(all.lead_seconds, Some([300.0; 3]));
        assert!(all.to_string().starts_with("1 of 2 purchasing sessions (50.0 %) crossed 0.500 before the purchase, a median 5.0 min before it"), "{all}");
        // The latest quarter of the 5 sessions by start: d's.
        assert_eq!((later.purchasing, later.other, later.other_crossed), (0, 1, 0));
    }
}
