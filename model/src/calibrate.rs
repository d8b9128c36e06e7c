//! Calibration: maps the GRU's raw probability to one that matches observed purchase rates.
//!
//! Fitted on the validation split after training and stored in `model.json`, so that the
//! `score` the operator emits is a probability. [`Calibration::Platt`] fits `σ(a·logit(p) + b)`
//! (two parameters, robust with few positives); [`Calibration::Isotonic`] fits a monotone step
//! function by pool-adjacent-violators and interpolates linearly between its steps. Both are
//! monotone, so ranking metrics (ROC-AUC, PR-AUC) are unchanged by calibration.

use crate::logistic::{logit, sigmoid, Logistic};
use serde::{Deserialize, Serialize};

/// Which calibration `train` fits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CalibrationMethod {
    /// Raw GRU probabilities.
    None,
    /// Platt scaling.
    #[default]
    Platt,
    /// Isotonic regression.
    Isotonic,
}

/// A fitted calibration map.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "lowercase")]
pub enum Calibration {
    /// Identity.
    #[default]
    None,
    /// `σ(a·logit(p) + b)`.
    Platt {
        /// Slope on the raw logit.
        a: f64,
        /// Intercept.
        b: f64,
    },
    /// Piecewise-linear through `(x[i], y[i])`, constant outside.
    Isotonic {
        /// Raw probabilities, increasing.
        x: Vec<f64>,
        /// Calibrated probabilities, non-decreasing.
        y: Vec<f64>,
    },
}

impl Calibration {
    /// Fits `method` on raw probabilities and their labels.
    pub fn fit(method: CalibrationMethod, raw: &[f32], labels: &[bool]) -> Calibration {
        match method {
            CalibrationMethod::None => Calibration::None,
            CalibrationMethod::Platt => {
                let x: Vec<Vec<f64>> = raw.iter().map(|&p| vec![logit(f64::from(p))]).collect();
                let m = Logistic::fit(vec!["gru_logit".into()], &x, labels, 1e-3);
                // Undo the standardisation: a·logit + b.
                let a = m.weights[0] / m.std[0];
                Calibration::Platt { a, b: m.bias - a * m.mean[0] }
            }
            CalibrationMethod::Isotonic => isotonic(raw, labels),
        }
    }

    /// The calibrated probability of raw probability `p`.
    pub fn apply(&self, p: f32) -> f32 {
        match self {
            Calibration::None => p,
            Calibration::Platt { a, b } => sigmoid(a * logit(f64::from(p)) + b) as f32,
            // An empty or malformed table (a hand-edited model.json) maps nothing: raw scores.
            Calibration::Isotonic { x, y } if x.is_empty() || x.len() != y.len() => p,
            Calibration::Isotonic { x, y } => {
                let p = f64::from(p);
                let i = x.partition_point(|&v| v < p);
                let v = if i == 0 {
                    y[0]
                } else if i == x.len() {
                    y[x.len() - 1]
                } else {
                    let t = (p - x[i - 1]) / (x[i] - x[i - 1]);
                    y[i - 1] + t * (y[i] - y[i - 1])
                };
                v as f32
            }
        }
    }
}

/// Pool-adjacent-violators on scores sorted ascending; each pooled block becomes one point
/// (mean score, positive rate).
fn isotonic(raw: &[f32], labels: &[bool]) -> Calibration {
    if raw.is_empty() {
        return Calibration::None;
    }
    let mut order: Vec<usize> = (0..raw.len()).collect();
    order.sort_by(|&a, &b| raw[a].total_cmp(&raw[b]));
    // Blocks of (sum of scores, sum of labels, count).
    let mut blocks: Vec<(f64, f64, f64)> = Vec::new();
    for i in order {
        blocks.push((f64::from(raw[i]), f64::from(u8::from(labels[i])), 1.0));
        while blocks.len() > 1 {
            let (s1, y1, n1) = blocks[blocks.len() - 2];
            let (s2, y2, n2) = blocks[blocks.len() - 1];
            if y1 / n1 < y2 / n2 {
                break;
            }
            blocks.pop();
            *blocks.last_mut().expect("two blocks") = (s1 + s2, y1 + y2, n1 + n2);
        }
    }
    let (x, y) = blocks.iter().map(|(s, l, n)| (s / n, l / n)).unzip();
    Calibration::Isotonic { x, y }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scores that are systematically too high: the true rate is half the raw score.
    fn overconfident() -> (Vec<f32>, Vec<bool>) {
        let (mut raw, mut labels) = (Vec::new(), Vec::new());
        for bin in 1..10 {
            let p = bin as f32 / 10.0;
            for k in 0..400 {
                raw.push(p);
                labels.push((k as f32) < 400.0 * p / 2.0);
            }
        }
        (raw, labels)
    }

    #[test]
    fn platt_and_isotonic_pull_scores_to_observed_rates() {
        let (raw, labels) = overconfident();
        for method in [CalibrationMethod::Platt, CalibrationMethod::Isotonic] {
            let c = Calibration::fit(method, &raw, &labels);
            for p in [0.2f32, 0.5, 0.8] {
                let got = c.apply(p);
                assert!((got - p / 2.0).abs() < 0.04, "{method:?}: {p} → {got}, expected about {}", p / 2.0);
            }
            assert!(c.apply(0.3) <= c.apply(0.6), "{method:?} must stay monotone");
        }
        assert_eq!(Calibration::None.apply(0.37), 0.37);
    }

    #[test]
    fn calibration_survives_model_json_exactly() {
        // The model version hashes the serialised calibration, so a load → save cycle must
        // reproduce every bit (serde_json's `float_roundtrip`).
        for i in 1..2_000u32 {
            let c = Calibration::Platt { a: 1.0 / f64::from(i) + 0.123_456_789_012_345_67, b: -(f64::from(i).sqrt()) * 1.000_000_000_000_1 };
            let text = serde_json::to_string(&c).unwrap();
            let back: Calibration = serde_json::from_str(&text).unwrap();
            assert_eq!(back, c);
            assert_eq!(serde_json::to_string(&back).unwrap(), text);
        }
    }

    #[test]
    fn an_empty_or_ragged_isotonic_table_leaves_scores_raw() {
        for c in [Calibration::Isotonic { x: vec![], y: vec![] }, Calibration::Isotonic { x: vec![0.5], y: vec![] }] {
            assert_eq!(c.apply(0.3), 0.3);
        }
        let parsed: Calibration = serde_json::from_str(r#"{"method":"isotonic","x":[],"y":[]}"#).unwrap();
        assert_eq!(parsed.apply(0.7), 0.7);
    }

    #[test]
    fn isotonic_pools_violations() {
        let c = isotonic(&[0.1, 0.2, 0.3, 0.4], &[false, true, false, true]);
        let Calibration::Isotonic { x, y } = &c else { panic!("isotonic expected") };
        assert_eq!(y, &[0.0, 0.5, 1.0]);
        assert!((x[1] - 0.25).abs() < 1e-6, "0.2 and 0.3 pooled");
        assert!((c.apply(0.25) - 0.5).abs() < 1e-6);
    }
}
