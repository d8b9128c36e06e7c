//! A small L2-regularised logistic regression fitted by Newton's method, shared by the
//! session-aggregate baseline, Platt scaling and the stacked ensemble.

use serde::{Deserialize, Serialize};

/// A fitted logistic regression over standardised inputs: `p = σ(bias + Σ wᵢ·(xᵢ − meanᵢ)/stdᵢ)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Logistic {
    /// Input names, for the record.
    pub names: Vec<String>,
    /// Per-input mean subtracted before the weights.
    pub mean: Vec<f64>,
    /// Per-input deviation divided by (never 0).
    pub std: Vec<f64>,
    /// One weight per input.
    pub weights: Vec<f64>,
    /// Intercept.
    pub bias: f64,
}

pub(crate) fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// `ln(p / (1 − p))` with `p` clamped to [1e-6, 1 − 1e-6].
pub(crate) fn logit(p: f64) -> f64 {
    let p = p.clamp(1e-6, 1.0 - 1e-6);
    (p / (1.0 - p)).ln()
}

/// Solves `a · x = b` for a small dense system by Gaussian elimination with partial pivoting.
/// A singular column leaves its unknown at 0.
fn solve(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Vec<f64> {
    let n = b.len();
    for col in 0..n {
        let pivot = (col..n).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs())).unwrap_or(col);
        a.swap(col, pivot);
        b.swap(col, pivot);
        if a[col][col].abs() < 1e-12 {
            continue;
        }
        for row in col + 1..n {
            let f = a[row][col] / a[col][col];
            for k in col..n {
                a[row][k] -= f * a[col][k];
            }
            b[row] -= f * b[col];
        }
    }
    let mut x = vec![0.0; n];
    for row in (0..n).rev() {
        if a[row][row].abs() < 1e-12 {
            continue;
        }
        let rest: f64 = (row + 1..n).map(|k| a[row][k] * x[k]).sum();
        x[row] = (b[row] - rest) / a[row][row];
    }
    x
}

impl Logistic {
    /// Fits on rows `x` (all the same width) and labels `y`, with L2 penalty `l2` on the
    /// weights (not the intercept), by 30 Newton steps on standardised inputs.
    pub fn fit(names: Vec<String>, x: &[Vec<f64>], y: &[bool], l2: f64) -> Logistic {
        let d = names.len();
        let n = x.len().max(1) as f64;
        let mut mean = vec![0.0; d];
        for row in x {
            for (m, v) in mean.iter_mut().zip(row) {
                *m += v / n;
            }
        }
        let mut std = vec![0.0; d];
        for row in x {
            for ((s, v), m) in std.iter_mut().zip(row).zip(&mean) {
                *s += (v - m).powi(2) / n;
            }
        }
        let std: Vec<f64> = std.into_iter().map(|v| if v > 1e-12 { v.sqrt() } else { 1.0 }).collect();
        let z: Vec<Vec<f64>> = x
            .iter()
            .map(|row| std::iter::once(1.0).chain(row.iter().zip(&mean).zip(&std).map(|((v, m), s)| (v - m) / s)).collect())
            .collect();
        // w[0] is the intercept.
        let mut w = vec![0.0; d + 1];
        for _ in 0..30 {
            let mut grad = vec![0.0; d + 1];
            let mut hess = vec![vec![0.0; d + 1]; d + 1];
            for (row, &label) in z.iter().zip(y) {
                let p = sigmoid(row.iter().zip(&w).map(|(a, b)| a * b).sum());
                let r = p - f64::from(u8::from(label));
                let c = (p * (1.0 - p)).max(1e-9);
                for i in 0..=d {
                    grad[i] += r * row[i];
                    for j in 0..=d {
                        hess[i][j] += c * row[i] * row[j];
                    }
                }
            }
            for i in 1..=d {
                grad[i] += l2 * w[i];
                hess[i][i] += l2;
            }
            let step = solve(hess, grad);
            let mut moved = 0f64;
            for (wi, si) in w.iter_mut().zip(&step) {
                *wi -= si;
                moved = moved.max(si.abs());
            }
            if moved < 1e-9 {
                break;
            }
        }
        Logistic { names, mean, std, weights: w[1..].to_vec(), bias: w[0] }
    }

    /// The logit for one row.
    pub fn logit(&self, x: &[f64]) -> f64 {
        self.bias + x.iter().zip(&self.mean).zip(&self.std).zip(&self.weights).map(|(((v, m), s), w)| w * (v - m) / s).sum::<f64>()
    }

    /// The probability for one row.
    pub fn predict(&self, x: &[f64]) -> f64 {
        sigmoid(self.logit(x))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovers_known_coefficients() {
        // Labels drawn from p = σ(−1 + 2·x) on a grid: the fit must find the generating line.
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for i in 0..2_000 {
            let v = (i % 200) as f64 / 50.0 - 2.0;
            let p = sigmoid(-1.0 + 2.0 * v);
            // Deterministic "sampling": the share of positives at each grid point equals p.
            let positive = ((i / 200) as f64 + 0.5) / 10.0 < p;
            x.push(vec![v]);
            y.push(positive);
        }
        let m = Logistic::fit(vec!["v".into()], &x, &y, 0.0);
        let slope = m.weights[0] / m.std[0];
        let intercept = m.bias - m.weights[0] * m.mean[0] / m.std[0];
        assert!((slope - 2.0).abs() < 0.25, "slope {slope}");
        assert!((intercept + 1.0).abs() < 0.25, "intercept {intercept}");
        assert!(m.predict(&[2.0]) > 0.9 && m.predict(&[-2.0]) < 0.1);
    }
}
