//! A gradient-boosted tree baseline on the session aggregates (the logistic regression's
//! inputs): the seed's second non-neural model family, so `eval` can say whether trees find
//! what the regression and the GRU miss.
//!
//! Small on purpose: logistic loss, second-order (Newton) leaf values with an L2 penalty,
//! depth-3 trees on up to 32 quantile bins per input, shrinkage 0.1, and the number of trees
//! chosen on validation log loss (at most 300). Deterministic: no sampling.

use crate::logistic::sigmoid;
use serde::{Deserialize, Serialize};

/// Deepest split level of a tree.
const DEPTH: usize = 3;
/// Most trees; validation picks how many are kept.
const MAX_TREES: usize = 300;
/// Shrinkage of each tree's values.
const LEARNING_RATE: f64 = 0.1;
/// L2 penalty on leaf values.
const LAMBDA: f64 = 1.0;
/// Fewest training rows a leaf may hold.
const MIN_LEAF: usize = 50;
/// Most bins per input (cut points are its quantiles).
const BINS: usize = 32;

/// One node of a tree: a split (`x[feature] <= threshold` goes left) or a leaf.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Node {
    /// An inner node.
    Split {
        /// Input index.
        feature: usize,
        /// Rows with the input at or below it go left.
        threshold: f64,
        /// Index of the left child.
        left: usize,
        /// Index of the right child.
        right: usize,
    },
    /// A leaf, with its (shrunk) logit contribution.
    Leaf(f64),
}

/// A fitted ensemble of trees: `p = σ(base + Σ tree(x))`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GradientBoosting {
    /// Input names, for the record.
    pub names: Vec<String>,
    /// Starting logit (the training split's log odds).
    pub base: f64,
    /// The trees, each a node list rooted at 0.
    pub trees: Vec<Vec<Node>>,
}

impl GradientBoosting {
    /// Fits on `train` rows and labels, keeping the number of trees with the lowest log loss on
    /// `val`.
    pub fn fit(names: Vec<String>, train: (&[Vec<f64>], &[bool]), val: (&[Vec<f64>], &[bool])) -> GradientBoosting {
        let (x, y) = train;
        let d = names.len();
        let positives = y.iter().filter(|l| **l).count() as f64;
        let rate = ((positives + 0.5) / (y.len() as f64 + 1.0)).clamp(1e-6, 1.0 - 1e-6);
        let base = (rate / (1.0 - rate)).ln();
        let cuts: Vec<Vec<f64>> = (0..d).map(|j| quantile_cuts(x.iter().map(|r| r[j]))).collect();
        let binned: Vec<Vec<u8>> = x.iter().map(|r| (0..d).map(|j| bin(&cuts[j], r[j])).collect()).collect();
        let mut model = GradientBoosting { names, base, trees: Vec::new() };
        let mut logits = vec![base; x.len()];
        let mut val_logits = vec![base; val.0.len()];
        let (mut best_loss, mut best_len) = (log_loss(&val_logits, val.1), 0);
        for _ in 0..MAX_TREES {
            let (g, h): (Vec<f64>, Vec<f64>) = logits.iter().zip(y).map(|(&z, &l)| {
                let p = sigmoid(z);
                (p - f64::from(u8::from(l)), (p * (1.0 - p)).max(1e-9))
            }).unzip();
            let tree = grow(&binned, &cuts, &g, &h);
            for (z, r) in logits.iter_mut().zip(x) {
                *z += value(&tree, r);
            }
            for (z, r) in val_logits.iter_mut().zip(val.0) {
                *z += value(&tree, r);
            }
            model.trees.push(tree);
            let loss = log_loss(&val_logits, val.1);
            if loss < best_loss {
                (best_loss, best_len) = (loss, model.trees.len());
            }
        }
        model.trees.truncate(best_len);
        model
    }

    /// The probability for one row.
    pub fn predict(&self, x: &[f64]) -> f64 {
        sigmoid(self.base + self.trees.iter().map(|t| value(t, x)).sum::<f64>())
    }
}

/// Up to `BINS - 1` distinct cut points at the quantiles of `values`.
fn quantile_cuts(values: impl Iterator<Item = f64>) -> Vec<f64> {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    let mut cuts: Vec<f64> = (1..BINS).filter_map(|q| v.get(q * v.len() / BINS).copied()).collect();
    cuts.dedup();
    // A cut at the maximum separates nothing.
    if cuts.last() == v.last() {
        cuts.pop();
    }
    cuts
}

/// The bin of `x`: how many cut points lie below it.
fn bin(cuts: &[f64], x: f64) -> u8 {
    cuts.partition_point(|&c| c < x) as u8
}

/// One tree on gradients `g` and hessians `h`, level by level.
fn grow(binned: &[Vec<u8>], cuts: &[Vec<f64>], g: &[f64], h: &[f64]) -> Vec<Node> {
    let mut nodes = vec![Node::Leaf(0.0)];
    let mut frontier: Vec<(usize, Vec<usize>)> = vec![(0, (0..binned.len()).collect())];
    for level in 0..=DEPTH {
        let mut next = Vec::new();
        for (at, rows) in frontier {
            let (gs, hs): (f64, f64) = rows.iter().fold((0.0, 0.0), |(a, b), &i| (a + g[i], b + h[i]));
            let split = if level < DEPTH && rows.len() >= 2 * MIN_LEAF { best_split(binned, cuts.len(), g, h, &rows, (gs, hs)) } else { None };
            match split {
                None => nodes[at] = Node::Leaf(-LEARNING_RATE * gs / (hs + LAMBDA)),
                Some((feature, b)) => {
                    let (left, right): (Vec<usize>, Vec<usize>) = rows.iter().partition(|&&i| binned[i][feature] <= b);
                    let (l, r) = (nodes.len(), nodes.len() + 1);
                    nodes.extend([Node::Leaf(0.0), Node::Leaf(0.0)]);
                    nodes[at] = Node::Split { feature, threshold: cuts[feature][usize::from(b)], left: l, right: r };
                    next.extend([(l, left), (r, right)]);
                }
            }
        }
        frontier = next;
    }
    nodes
}

/// The split of `rows` with the largest gain, as (input, last bin going left); `None` when no
/// split with both sides of at least `MIN_LEAF` rows gains anything.
fn best_split(binned: &[Vec<u8>], d: usize, g: &[f64], h: &[f64], rows: &[usize], (gs, hs): (f64, f64)) -> Option<(usize, u8)> {
    let score = |g: f64, h: f64| g * g / (h + LAMBDA);
    let parent = score(gs, hs);
    let mut best: Option<(f64, usize, u8)> = None;
    for j in 0..d {
        let mut hist = [(0f64, 0f64, 0usize); BINS];
        for &i in rows {
            let e = &mut hist[usize::from(binned[i][j])];
            (e.0, e.1, e.2) = (e.0 + g[i], e.1 + h[i], e.2 + 1);
        }
        let (mut gl, mut hl, mut nl) = (0.0, 0.0, 0);
        for (b, &(gb, hb, nb)) in hist.iter().enumerate().take(BINS - 1) {
            (gl, hl, nl) = (gl + gb, hl + hb, nl + nb);
            if nl < MIN_LEAF || rows.len() - nl < MIN_LEAF {
                continue;
            }
            let gain = score(gl, hl) + score(gs - gl, hs - hl) - parent;
            if gain > 1e-9 && best.is_none_or(|(bg, _, _)| gain > bg) {
                best = Some((gain, j, b as u8));
            }
        }
    }
    best.map(|(_, j, b)| (j, b))
}

/// A tree's value for one row.
fn value(tree: &[Node], x: &[f64]) -> f64 {
    let mut at = 0;
    loop {
        match tree[at] {
            Node::Leaf(v) => return v,
            Node::Split { feature, threshold, left, right } => at = if x[feature] <= threshold { left } else { right },
        }
    }
}

fn log_loss(logits: &[f64], labels: &[bool]) -> f64 {
    logits.iter().zip(labels).map(|(&z, &l)| {
        // log(1 + e^z) − l·z, stable for either sign of z.
        z.max(0.0) + (-z.abs()).exp().ln_1p() - if l { z } else { 0.0 }
    }).sum::<f64>() / labels.len().max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trees_learn_an_interaction_a_regression_cannot() {
        // Positive exactly when both inputs are high (an AND): no line separates it, two splits do.
        let grid = |offset: usize| -> (Vec<Vec<f64>>, Vec<bool>) {
            (0..4_000).map(|i| {
                let (a, b) = (((i * 37 + offset) % 100) as f64 / 100.0, ((i * 61 + offset) % 100) as f64 / 100.0);
                (vec![a, b], a > 0.5 && b > 0.5)
            }).unzip()
        };
        let (x, y) = grid(0);
        let (vx, vy) = grid(7);
        let m = GradientBoosting::fit(vec!["a".into(), "b".into()], (&x, &y), (&vx, &vy));
        assert!(!m.trees.is_empty());
        let right = vx.iter().zip(&vy).filter(|(r, l)| (m.predict(r) > 0.5) == **l).count();
        assert!(right as f64 / vx.len() as f64 > 0.97, "{right} of {} right", vx.len());
        assert_eq!(m, GradientBoosting::fit(vec!["a".into(), "b".into()], (&x, &y), (&vx, &vy)), "deterministic");
    }
}
