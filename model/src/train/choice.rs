//! Which of the cells trained is served: the cheapest, unless a dearer one validates better
//! beyond doubt ([`DEARER_CELL_CONFIDENCE`]).

use super::LabelledSession;
use crate::{eval, Cell};
use serde::{Deserialize, Serialize};

/// One cell trained by [`train`](super::train) and how it validated.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CellTrial {
    /// The cell.
    pub cell: Cell,
    /// Validation ROC-AUC of its packed model.
    pub val_roc_auc: Option<f64>,
    /// Validation PR-AUC of its packed model, the criterion.
    pub val_pr_auc: Option<f64>,
    /// For a cell not served: the paired session bootstrap's probability that it beats the
    /// served cell on validation PR-AUC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p_better_than_served: Option<f64>,
}

/// How sure the validation must be before a dearer cell is served: the paired session
/// bootstrap's probability that it beats the cheaper cell on PR-AUC.
pub const DEARER_CELL_CONFIDENCE: f64 = 0.9;

/// Which of the cells trained (in the order given, cheapest first: [`Cell::ALL`]) to serve: the
/// first, unless a later one beats the one chosen so far on validation PR-AUC with probability
/// at least [`DEARER_CELL_CONFIDENCE`] (paired session bootstrap, 500 replicates). A dearer cell
/// costs state bytes and step time on every event, so a difference the validation split cannot
/// tell from noise does not buy it.
pub(super) fn choose_cell(val_scores: &[Vec<f32>], val: &ValidationEvents, seed: u64) -> usize {
    (1..val_scores.len()).fold(0, |best, i| if val.p_better(&val_scores[i], &val_scores[best], seed) >= DEARER_CELL_CONFIDENCE { i } else { best })
}

/// The labels and sessions of the validation split's labelled events, in the order of
/// [`predict`](super::fit::predict)'s scores: what the paired bootstrap resamples.
pub(super) struct ValidationEvents {
    labels: Vec<bool>,
    groups: Vec<usize>,
}

impl ValidationEvents {
    pub(super) fn of<S: std::borrow::Borrow<LabelledSession>>(val_set: impl IntoIterator<Item = S>) -> ValidationEvents {
        let (mut labels, mut groups) = (Vec::new(), Vec::new());
        for (k, s) in val_set.into_iter().enumerate() {
            let s = s.borrow();
            for (l, _) in s.labels.iter().zip(&s.mask).filter(|(_, m)| **m > 0.0) {
                labels.push(*l > 0.5);
                groups.push(k);
            }
        }
        ValidationEvents { labels, groups }
    }

    /// The paired session bootstrap's probability that scores `a` beat scores `b` on PR-AUC.
    pub(super) fn p_better(&self, a: &[f32], b: &[f32], seed: u64) -> f64 {
        let c = eval::paired_bootstrap(("a", "b"), (a, b), &self.labels, &self.groups, 500, seed, ("pr_auc", eval::pr_auc));
        c.probability_a_better.unwrap_or(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` sessions of four labelled events each, every third session a buying one.
    fn sessions(n: usize) -> Vec<LabelledSession> {
        (0..n)
            .map(|k| {
                let label = if k % 3 == 0 { 1.0 } else { 0.0 };
                LabelledSession { start_ms: k as i64, features: Vec::new(), labels: vec![label; 4], mask: vec![1.0; 4], aggregates: Vec::new(), events: Vec::new() }
            })
            .collect()
    }

    #[test]
    fn a_dearer_cell_is_served_only_when_it_validates_better_beyond_doubt() {
        let sessions = sessions(60);
        let val = ValidationEvents::of(&sessions);
        let labels: Vec<f32> = sessions.iter().flat_map(|s| s.labels.clone()).collect();
        // A scorer that ranks every buying session first, and one that is noise.
        let perfect: Vec<f32> = labels.iter().map(|&l| 0.2 + 0.6 * l).collect();
        let noise: Vec<f32> = (0..labels.len()).map(|i| ((i * 7919) % 101) as f32 / 101.0).collect();
        assert_eq!(choose_cell(&[noise.clone(), perfect.clone()], &val, 7), 1, "clearly better: served");
        assert_eq!(choose_cell(&[perfect.clone(), noise.clone()], &val, 7), 0, "worse: not served");
        assert_eq!(choose_cell(&[perfect.clone(), perfect.clone()], &val, 7), 0, "as good: the cheaper is kept");
        // A little better on one session only: not beyond doubt.
        let mut nudged = noise.clone();
        nudged[0] += 0.5;
        assert!(val.p_better(&nudged, &noise, 7) < DEARER_CELL_CONFIDENCE);
        assert_eq!(choose_cell(&[noise, nudged], &val, 7), 0);
    }
}
