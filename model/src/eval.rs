//! Quality metrics for probability scores against binary labels.
//!
//! [`evaluate`] computes everything `intentflow eval` reports for one scorer: ROC-AUC, PR-AUC
//! (average precision), log loss, Brier score, precision / recall / F1 at a given threshold,
//! expected calibration error, ROC-AUC by the number of events seen so far in the session,
//! 95 % bootstrap intervals for both AUCs (resampling whole sessions, since the events of one
//! session are not independent), and the curves the report plots.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// ROC-AUC by the rank-sum (Mann–Whitney) formula with average ranks for ties.
/// `None` unless both classes are present.
pub fn roc_auc(scores: &[f32], labels: &[bool]) -> Option<f64> {
    let pos = labels.iter().filter(|l| **l).count();
    let neg = labels.len() - pos;
    if pos == 0 || neg == 0 {
        return None;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let mut rank_sum_pos = 0f64;
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && scores[order[j + 1]] == scores[order[i]] {
            j += 1;
        }
        let avg_rank = (i + j) as f64 / 2.0 + 1.0;
        rank_sum_pos += avg_rank * order[i..=j].iter().filter(|&&k| labels[k]).count() as f64;
        i = j + 1;
    }
    Some((rank_sum_pos - (pos * (pos + 1)) as f64 / 2.0) / (pos as f64 * neg as f64))
}

/// Distinct thresholds from the highest score down, with cumulative (true, false) positives
/// of everything scored at or above each.
fn descending_counts(scores: &[f32], labels: &[bool]) -> Vec<(f32, usize, usize)> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let (mut tp, mut fp) = (0, 0);
    let mut out: Vec<(f32, usize, usize)> = Vec::new();
    for (k, &i) in order.iter().enumerate() {
        if labels[i] {
            tp += 1;
        } else {
            fp += 1;
        }
        let last_of_tie = order.get(k + 1).is_none_or(|&n| scores[n] != scores[i]);
        if last_of_tie {
            out.push((scores[i], tp, fp));
        }
    }
    out
}

/// PR-AUC as average precision: Σ (Rₙ − Rₙ₋₁)·Pₙ over distinct thresholds (ties form one
/// step). `None` without positives.
pub fn pr_auc(scores: &[f32], labels: &[bool]) -> Option<f64> {
    let pos = labels.iter().filter(|l| **l).count();
    if pos == 0 {
        return None;
    }
    let mut prev_recall = 0.0;
    let mut ap = 0.0;
    for (_, tp, fp) in descending_counts(scores, labels) {
        let recall = tp as f64 / pos as f64;
        ap += (recall - prev_recall) * tp as f64 / (tp + fp) as f64;
        prev_recall = recall;
    }
    Some(ap)
}

/// Mean binary cross-entropy, with probabilities clamped to [1e-7, 1 − 1e-7].
pub fn log_loss(scores: &[f32], labels: &[bool]) -> f64 {
    if scores.is_empty() {
        return 0.0;
    }
    let total: f64 = scores
        .iter()
        .zip(labels)
        .map(|(&p, &y)| {
            let p = f64::from(p).clamp(1e-7, 1.0 - 1e-7);
            if y { -p.ln() } else { -(1.0 - p).ln() }
        })
        .sum();
    total / scores.len() as f64
}

/// Mean squared error of the probabilities.
pub fn brier(scores: &[f32], labels: &[bool]) -> f64 {
    if scores.is_empty() {
        return 0.0;
    }
    scores.iter().zip(labels).map(|(&p, &y)| (f64::from(p) - f64::from(u8::from(y))).powi(2)).sum::<f64>() / scores.len() as f64
}

/// One bin of a reliability diagram.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReliabilityBin {
    /// Lower edge of the bin.
    pub lo: f64,
    /// Upper edge of the bin.
    pub hi: f64,
    /// Events in the bin.
    pub count: usize,
    /// Mean score in the bin.
    pub mean_score: f64,
    /// Share of positives in the bin.
    pub positive_rate: f64,
}

/// Equal-width reliability bins over [0, 1]; empty bins are left out.
pub fn reliability(scores: &[f32], labels: &[bool], bins: usize) -> Vec<ReliabilityBin> {
    let mut acc = vec![(0usize, 0f64, 0f64); bins];
    for (&p, &y) in scores.iter().zip(labels) {
        let b = ((f64::from(p) * bins as f64) as usize).min(bins - 1);
        acc[b].0 += 1;
        acc[b].1 += f64::from(p);
        acc[b].2 += f64::from(u8::from(y));
    }
    acc.iter()
        .enumerate()
        .filter(|(_, a)| a.0 > 0)
        .map(|(i, &(n, s, y))| ReliabilityBin {
            lo: i as f64 / bins as f64,
            hi: (i + 1) as f64 / bins as f64,
            count: n,
            mean_score: s / n as f64,
            positive_rate: y / n as f64,
        })
        .collect()
}

/// Expected calibration error over 10 equal-width bins: Σ (nᵦ / N)·|mean score − positive rate|.
pub fn ece(scores: &[f32], labels: &[bool]) -> f64 {
    let n = scores.len().max(1) as f64;
    reliability(scores, labels, 10).iter().map(|b| b.count as f64 / n * (b.mean_score - b.positive_rate).abs()).sum()
}

/// Precision, recall and F1 when scores ≥ `threshold` are called positive.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Prf {
    /// The threshold.
    pub threshold: f64,
    /// Precision (1 when nothing is called positive).
    pub precision: f64,
    /// Recall.
    pub recall: f64,
    /// F1.
    pub f1: f64,
}

/// Precision, recall and F1 at `threshold`.
pub fn prf_at(scores: &[f32], labels: &[bool], threshold: f64) -> Prf {
    let (mut tp, mut fp, mut fneg) = (0f64, 0f64, 0f64);
    for (&p, &y) in scores.iter().zip(labels) {
        match (f64::from(p) >= threshold, y) {
            (true, true) => tp += 1.0,
            (true, false) => fp += 1.0,
            (false, true) => fneg += 1.0,
            (false, false) => {}
        }
    }
    let precision = if tp + fp > 0.0 { tp / (tp + fp) } else { 1.0 };
    let recall = if tp + fneg > 0.0 { tp / (tp + fneg) } else { 0.0 };
    let f1 = if precision + recall > 0.0 { 2.0 * precision * recall / (precision + recall) } else { 0.0 };
    Prf { threshold, precision, recall, f1 }
}

/// The threshold with the highest F1 (chosen on validation, applied to test).
pub fn best_f1_threshold(scores: &[f32], labels: &[bool]) -> f64 {
    let pos = labels.iter().filter(|l| **l).count().max(1) as f64;
    descending_counts(scores, labels)
        .into_iter()
        .map(|(t, tp, fp)| (f64::from(t), 2.0 * tp as f64 / (tp as f64 + fp as f64 + pos)))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map_or(0.5, |(t, _)| t)
}

/// A 95 % interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    /// 2.5th percentile.
    pub lo: f64,
    /// 97.5th percentile.
    pub hi: f64,
}

/// Percentile bootstrap of `metric` resampling whole groups (sessions) with replacement.
/// `groups[i]` is the group of event `i`; `None` when fewer than 2 groups or no replicate is
/// defined.
pub fn bootstrap(
    scores: &[f32],
    labels: &[bool],
    groups: &[usize],
    reps: usize,
    seed: u64,
    metric: impl Fn(&[f32], &[bool]) -> Option<f64>,
) -> Option<Interval> {
    let (mut s, mut l) = (Vec::new(), Vec::new());
    let values = replicates(groups, reps, seed, |picked| {
        s.clear();
        l.clear();
        s.extend(picked.iter().map(|&i| scores[i]));
        l.extend(picked.iter().map(|&i| labels[i]));
        metric(&s, &l)
    })?;
    Some(percentiles(values))
}

/// `metric` on `reps` resamples of whole groups with replacement (the events picked, in order);
/// `None` with fewer than 2 groups or when no replicate is defined.
fn replicates(groups: &[usize], reps: usize, seed: u64, mut metric: impl FnMut(&[usize]) -> Option<f64>) -> Option<Vec<f64>> {
    let n_groups = groups.iter().max().map_or(0, |m| m + 1);
    if n_groups < 2 {
        return None;
    }
    let mut members: Vec<Vec<usize>> = vec![Vec::new(); n_groups];
    for (i, &g) in groups.iter().enumerate() {
        members[g].push(i);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut values = Vec::with_capacity(reps);
    let mut picked = Vec::new();
    for _ in 0..reps {
        picked.clear();
        for _ in 0..n_groups {
            picked.extend_from_slice(&members[rng.random_range(0..n_groups)]);
        }
        values.extend(metric(&picked));
    }
    (!values.is_empty()).then_some(values)
}

/// The 2.5th and 97.5th percentiles of replicate values.
fn percentiles(mut values: Vec<f64>) -> Interval {
    values.sort_by(f64::total_cmp);
    let at = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
    Interval { lo: at(0.025), hi: at(0.975) }
}

/// Two scorers compared on the same events by a paired bootstrap: each replicate resamples
/// whole sessions once and scores both on them, so what the sessions share cancels out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// The first scorer.
    pub a: String,
    /// The second scorer.
    pub b: String,
    /// `roc_auc` or `pr_auc`.
    pub metric: String,
    /// The metric of `a` minus that of `b`, on all events.
    pub difference: Option<f64>,
    /// 95 % interval of the difference over the replicates.
    pub interval: Option<Interval>,
    /// Share of replicates in which `a` scores higher than `b` (ties count half): the
    /// bootstrap's probability that `a` beats `b` on this metric.
    pub probability_a_better: Option<f64>,
}

/// Compares `a` and `b` on `metric` by a paired session bootstrap ([`Comparison`]).
#[allow(clippy::too_many_arguments)]
pub fn paired_bootstrap(
    names: (&str, &str),
    (a, b): (&[f32], &[f32]),
    labels: &[bool],
    groups: &[usize],
    reps: usize,
    seed: u64,
    (metric_name, metric): (&str, fn(&[f32], &[bool]) -> Option<f64>),
) -> Comparison {
    let (mut sa, mut sb, mut l) = (Vec::new(), Vec::new(), Vec::new());
    let differences = replicates(groups, reps, seed, |picked| {
        (sa.clear(), sb.clear(), l.clear());
        sa.extend(picked.iter().map(|&i| a[i]));
        sb.extend(picked.iter().map(|&i| b[i]));
        l.extend(picked.iter().map(|&i| labels[i]));
        Some(metric(&sa, &l)? - metric(&sb, &l)?)
    });
    let probability_a_better = differences.as_ref().map(|d| {
        d.iter().map(|&x| if x > 0.0 { 1.0 } else if x == 0.0 { 0.5 } else { 0.0 }).sum::<f64>() / d.len() as f64
    });
    Comparison {
        a: names.0.into(),
        b: names.1.into(),
        metric: metric_name.into(),
        difference: metric(a, labels).zip(metric(b, labels)).map(|(x, y)| x - y),
        interval: differences.map(percentiles),
        probability_a_better,
    }
}

/// The shares of the highest scores [`lift`] reports: the top 1 %, 5 % and 10 %.
pub const LIFT_FRACTIONS: [f64; 3] = [0.01, 0.05, 0.10];

/// What a campaign aimed at the highest scores reaches: one row of a lift (gain) table.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LiftRow {
    /// Share of events targeted (the highest scores first).
    pub top: f64,
    /// Events targeted.
    pub events: usize,
    /// Share of all positive events among them (the gain).
    pub captured: f64,
    /// Positive rate among them.
    pub precision: f64,
    /// Their positive rate over the base rate.
    pub lift: f64,
}

/// The lift table at [`LIFT_FRACTIONS`]: events ranked by score, highest first. Scores tied
/// across the cut count with their group's positive rate (what a random order of the tie would
/// give on average), so a constant scorer captures exactly its share.
pub fn lift(scores: &[f32], labels: &[bool]) -> Vec<LiftRow> {
    // (events, positives) of each group of equal scores, highest first.
    let groups: Vec<(usize, usize)> = descending_counts(scores, labels)
        .iter()
        .scan((0, 0), |prev, &(_, tp, fp)| {
            let group = (tp + fp - prev.0 - prev.1, tp - prev.0);
            *prev = (tp, fp);
            Some(group)
        })
        .collect();
    let positives = labels.iter().filter(|l| **l).count().max(1) as f64;
    let base = positives / scores.len().max(1) as f64;
    LIFT_FRACTIONS
        .iter()
        .map(|&top| {
            let events = ((scores.len() as f64 * top).ceil() as usize).min(scores.len()).max(1);
            let (mut taken, mut hits) = (0usize, 0f64);
            for &(n, pos) in &groups {
                let take = n.min(events - taken);
                hits += pos as f64 * take as f64 / n as f64;
                taken += take;
                if taken == events {
                    break;
                }
            }
            let precision = hits / events as f64;
            LiftRow { top, events, captured: hits / positives, precision, lift: precision / base }
        })
        .collect()
}

/// Buckets of "events seen so far in the session" for [`Metrics::auc_by_events`].
pub const EVENT_BUCKETS: [(u32, u32, &str); 6] = [(1, 1, "1"), (2, 2, "2"), (3, 3, "3"), (4, 5, "4-5"), (6, 9, "6-9"), (10, u32::MAX, "10+")];

/// ROC-AUC of the events scored after seeing a given number of session events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BucketAuc {
    /// Bucket label, e.g. `4-5`.
    pub events: String,
    /// Labelled events in the bucket.
    pub count: usize,
    /// Positives among them.
    pub positives: usize,
    /// ROC-AUC (None without both classes).
    pub roc_auc: Option<f64>,
}

/// A point of a curve.
pub type Point = (f64, f64);

/// Everything reported for one scorer on one split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Labelled events.
    pub events: usize,
    /// Sessions they belong to.
    pub sessions: usize,
    /// Share of positive labels.
    pub base_rate: f64,
    /// ROC-AUC.
    pub roc_auc: Option<f64>,
    /// 95 % session-bootstrap interval of the ROC-AUC.
    pub roc_auc_ci: Option<Interval>,
    /// PR-AUC (average precision).
    pub pr_auc: Option<f64>,
    /// 95 % session-bootstrap interval of the PR-AUC.
    pub pr_auc_ci: Option<Interval>,
    /// Mean log loss.
    pub log_loss: f64,
    /// Brier score.
    pub brier: f64,
    /// Expected calibration error (10 bins).
    pub ece: f64,
    /// Precision / recall / F1 at the threshold chosen on validation.
    pub at_threshold: Prf,
    /// ROC-AUC by events seen so far in the session.
    pub auc_by_events: Vec<BucketAuc>,
    /// ROC curve (false positive rate, true positive rate), at most ~200 points.
    pub roc_curve: Vec<Point>,
    /// Precision–recall curve (recall, precision), at most ~200 points.
    pub pr_curve: Vec<Point>,
    /// Reliability diagram, 10 bins.
    pub reliability: Vec<ReliabilityBin>,
    /// The lift table: what the top 1 %, 5 % and 10 % of scores capture.
    #[serde(default)]
    pub lift: Vec<LiftRow>,
}

/// What one scorer produced on one split: aligned per labelled event.
#[derive(Debug, Clone, Copy)]
pub struct Scored<'a> {
    /// Probabilities.
    pub scores: &'a [f32],
    /// Labels.
    pub labels: &'a [bool],
    /// Session index of each event (0-based, dense).
    pub sessions: &'a [usize],
    /// Events seen so far in the session when the event was scored (1-based).
    pub seen: &'a [u32],
}

fn thin(points: Vec<Point>) -> Vec<Point> {
    let step = points.len().div_ceil(200).max(1);
    let last = points.last().copied();
    let mut out: Vec<Point> = points.into_iter().step_by(step).collect();
    if let Some(l) = last {
        if out.last() != Some(&l) {
            out.push(l);
        }
    }
    out
}

/// Computes [`Metrics`] with `reps` bootstrap replicates seeded by `seed`.
pub fn evaluate(s: Scored<'_>, threshold: f64, reps: usize, seed: u64) -> Metrics {
    let pos = s.labels.iter().filter(|l| **l).count();
    let neg = s.labels.len() - pos;
    let counts = descending_counts(s.scores, s.labels);
    let mut roc_curve = vec![(0.0, 0.0)];
    roc_curve.extend(counts.iter().map(|&(_, tp, fp)| (fp as f64 / neg.max(1) as f64, tp as f64 / pos.max(1) as f64)));
    let pr_curve = counts.iter().map(|&(_, tp, fp)| (tp as f64 / pos.max(1) as f64, tp as f64 / (tp + fp) as f64)).collect();
    let auc_by_events = EVENT_BUCKETS
        .iter()
        .map(|&(lo, hi, name)| {
            let idx: Vec<usize> = (0..s.seen.len()).filter(|&i| (lo..=hi).contains(&s.seen[i])).collect();
            let sc: Vec<f32> = idx.iter().map(|&i| s.scores[i]).collect();
            let lb: Vec<bool> = idx.iter().map(|&i| s.labels[i]).collect();
            BucketAuc { events: name.to_string(), count: idx.len(), positives: lb.iter().filter(|l| **l).count(), roc_auc: roc_auc(&sc, &lb) }
        })
        .collect();
    Metrics {
        events: s.labels.len(),
        sessions: s.sessions.iter().collect::<std::collections::HashSet<_>>().len(),
        base_rate: pos as f64 / s.labels.len().max(1) as f64,
        roc_auc: roc_auc(s.scores, s.labels),
        roc_auc_ci: bootstrap(s.scores, s.labels, s.sessions, reps, seed, roc_auc),
        pr_auc: pr_auc(s.scores, s.labels),
        pr_auc_ci: bootstrap(s.scores, s.labels, s.sessions, reps, seed, pr_auc),
        log_loss: log_loss(s.scores, s.labels),
        brier: brier(s.scores, s.labels),
        ece: ece(s.scores, s.labels),
        at_threshold: prf_at(s.scores, s.labels, threshold),
        auc_by_events,
        roc_curve: thin(roc_curve),
        pr_curve: thin(pr_curve),
        reliability: reliability(s.scores, s.labels, 10),
        lift: lift(s.scores, s.labels),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_of_known_rankings() {
        assert_eq!(roc_auc(&[0.1, 0.2, 0.8, 0.9], &[false, false, true, true]), Some(1.0));
        assert_eq!(roc_auc(&[0.9, 0.8, 0.2, 0.1], &[false, false, true, true]), Some(0.0));
        // Of the four positive/negative pairs three are ordered right and one is tied: 3.5 / 4.
        assert_eq!(roc_auc(&[0.3, 0.5, 0.5, 0.7], &[false, true, false, true]), Some(0.875));
        assert_eq!(roc_auc(&[0.3], &[true]), None);
    }

    #[test]
    fn average_precision_of_known_rankings() {
        assert_eq!(pr_auc(&[0.9, 0.8, 0.2, 0.1], &[true, true, false, false]), Some(1.0));
        // Ranked: +, −, +: precision 1 at recall 0.5, 2/3 at recall 1 → 0.5·1 + 0.5·2/3.
        let ap = pr_auc(&[0.9, 0.5, 0.1], &[true, false, true]).unwrap();
        assert!((ap - (0.5 + 1.0 / 3.0)).abs() < 1e-12);
        // All tied: one step at the base rate.
        assert_eq!(pr_auc(&[0.5; 4], &[true, false, false, false]), Some(0.25));
        assert_eq!(pr_auc(&[0.5], &[false]), None);
    }

    #[test]
    fn losses_calibration_and_thresholds() {
        assert!(log_loss(&[1.0, 0.0], &[true, false]) < 1e-6);
        assert!((log_loss(&[0.5, 0.5], &[true, false]) - 2f64.ln()).abs() < 1e-9);
        assert!((brier(&[0.5, 1.0], &[true, true]) - 0.125).abs() < 1e-12);
        // Perfectly calibrated bins: 10 events at 0.15 of which 1.5 … use 20 events, 3 positive.
        let scores = [0.15f32; 20];
        let labels: Vec<bool> = (0..20).map(|i| i < 3).collect();
        assert!(ece(&scores, &labels) < 1e-6);
        // Off by 0.35 everywhere.
        assert!((ece(&[0.85; 20], &labels) - 0.7).abs() < 1e-6);
        let prf = prf_at(&[0.9, 0.6, 0.4, 0.1], &[true, false, true, false], 0.5);
        assert_eq!((prf.precision, prf.recall, prf.f1), (0.5, 0.5, 0.5));
        assert_eq!(best_f1_threshold(&[0.9, 0.8, 0.3, 0.1], &[true, true, false, false]), 0.8f32 as f64);
    }

    #[test]
    fn lift_counts_the_positives_among_the_highest_scores() {
        // 200 events, 20 positive; the 10 highest scores hold 6 positives.
        let scores: Vec<f32> = (0..200).map(|i| 1.0 - i as f32 / 200.0).collect();
        let labels: Vec<bool> = (0..200).map(|i| (i < 10 && i % 5 < 3) || (i >= 100 && i < 114)).collect();
        let rows = lift(&scores, &labels);
        assert_eq!(rows.iter().map(|r| r.events).collect::<Vec<_>>(), [2, 10, 20]);
        let top5 = rows[1];
        assert_eq!((top5.captured, top5.precision), (6.0 / 20.0, 0.6));
        assert!((top5.lift - 6.0).abs() < 1e-12, "0.6 over a base rate of 0.1");
        // A constant score captures its share, whatever the input order.
        let flat = lift(&[0.5; 200], &labels);
        assert!(flat.iter().all(|r| (r.captured - r.events as f64 / 200.0).abs() < 1e-12 && (r.lift - 1.0).abs() < 1e-12), "{flat:?}");
    }

    #[test]
    fn a_paired_bootstrap_says_how_often_one_scorer_beats_another() {
        let labels: Vec<bool> = (0..400).map(|i| (i * 7) % 10 < 2).collect();
        let good: Vec<f32> = labels.iter().enumerate().map(|(i, &l)| if l { 0.6 } else { 0.4 } + ((i * 31) % 17) as f32 / 40.0).collect();
        let noise: Vec<f32> = (0..400).map(|i| ((i * 53) % 97) as f32 / 97.0).collect();
        let groups: Vec<usize> = (0..400).map(|i| i / 4).collect();
        let c = paired_bootstrap(("good", "noise"), (&good, &noise), &labels, &groups, 200, 3, ("roc_auc", roc_auc));
        assert!(c.probability_a_better.unwrap() > 0.99, "{c:?}");
        let d = c.difference.unwrap();
        let ci = c.interval.unwrap();
        assert!(d > 0.1 && ci.lo < d && d < ci.hi, "{c:?}");
        // Against itself: every replicate ties.
        let same = paired_bootstrap(("good", "good"), (&good, &good), &labels, &groups, 50, 3, ("roc_auc", roc_auc));
        assert_eq!((same.difference, same.probability_a_better), (Some(0.0), Some(0.5)));
    }

    #[test]
    fn bootstrap_interval_brackets_the_estimate_and_is_seeded() {
        let scores: Vec<f32> = (0..400).map(|i| ((i * 37) % 100) as f32 / 100.0).collect();
        let labels: Vec<bool> = scores.iter().enumerate().map(|(i, s)| *s + ((i * 13) % 7) as f32 / 10.0 > 0.8).collect();
        let groups: Vec<usize> = (0..400).map(|i| i / 4).collect();
        let auc = roc_auc(&scores, &labels).unwrap();
        let ci = bootstrap(&scores, &labels, &groups, 200, 1, roc_auc).unwrap();
        assert!(ci.lo < auc && auc < ci.hi, "{ci:?} around {auc}");
        assert!(ci.hi - ci.lo < 0.2);
        assert_eq!(Some(ci), bootstrap(&scores, &labels, &groups, 200, 1, roc_auc));
    }
}
