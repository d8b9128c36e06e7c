//! The CPU serving step: one fused pass per row, the packed seed ensemble run as its blocks,
//! embeddings folded into input tables, rows spread over all cores.
//!
//! candle runs a GRU step as some thirty tensors (three projections, a dozen element-wise ops,
//! copies), one matrix-vector product per row on the CPU: bound by overhead, not arithmetic.
//! [`FusedGru`] does the same step in plain `f32` loops over weights laid out for it at load:
//!
//! * **Inputs folded into tables.** A row's input gates are `b + W_dense·dense + T_item[item] +
//!   T_cat[category]`, where `T_item = W_item·E_item` (one `3H` row per hash bucket) is computed
//!   once at load: no embedding lookup, no `D × 3H` product per row.
//! * **The packed ensemble as its blocks.** The recurrent weights of `k` packed members are
//!   block-diagonal (80 % zeros for five members); each member's `3h × h` block is multiplied on
//!   its own. A matrix that is not block-diagonal runs as one block.
//! * **Gates in one pass.** Per member, its three gates are computed into a small scratch and
//!   the new hidden units are written directly; the head's logit is summed as they come.
//! * **Products as column sweeps.** Every matrix is stored transposed and multiplied as
//!   `out += column_i · x_i` for `i` in order: the loops run along the outputs, which the compiler
//!   vectorises, and every output is summed in the same order whatever the vector width. Rust
//!   never contracts `a * b + c` into a fused multiply-add, and `exp` is a fixed polynomial
//!   ([`exp`]) rather than the platform's libm: a row's result is bit-for-bit the same on any
//!   x86-64 or ARM machine, whichever rows share its batch — the property that makes crash
//!   recovery and replays reproduce states exactly.
//!
//! [`FusedGru::step`] splits a batch into chunks of [`ROWS_PER_TASK`] rows over all cores
//! (rayon); a row's arithmetic is the same in any chunk. It equals candle's step within 1e-5
//! (tested here and through the PyTorch interop fixture) for f32 states; with f16 states both
//! round, and may differ by an f16 step where candle's unrounded value fell on the other side.

use crate::{Features, GruParams, StatePrecision, FEATURE_DIM};
use rayon::prelude::*;

/// Rows per parallel task: below this, a batch runs on the calling thread.
pub const ROWS_PER_TASK: usize = 256;

/// A GRU (with its head) laid out for the fused CPU step.
#[derive(Debug, Clone)]
pub struct FusedGru {
    /// Total hidden size `H = k · hm`.
    h: usize,
    /// Packed members `k` (1 when the recurrent matrix is not block-diagonal).
    members: usize,
    /// Hidden size of one member.
    hm: usize,
    /// Input gate bias (`[gate][unit]`, as PyTorch stacks them), with the recurrent bias of r
    /// and z added.
    bias_in: Vec<f32>,
    /// Dense-feature weights, transposed: `FEATURE_DIM` columns of `3H`.
    dense_cols: Vec<f32>,
    /// `W_item · E_item`: one `3H` row per item bucket (empty without an item embedding).
    item_rows: Vec<f32>,
    /// `W_cat · E_cat`: one `3H` row per category bucket (empty without one).
    category_rows: Vec<f32>,
    /// Recurrent blocks, per member `hm` columns of `3·hm` (`[gate][j]` within the member).
    recurrent_cols: Vec<f32>,
    /// The recurrent bias of the n gate, inside `r ⊙ (W_hn h + b_hn)`, per hidden unit.
    bias_hn: Vec<f32>,
    /// Head weights over the hidden units (packed order `[m][j]`).
    head: Vec<f32>,
    head_bias: f32,
    /// Precision each new hidden vector is rounded to, before the head reads it.
    precision: StatePrecision,
}

/// The fused step's weights (`G = 3H` gate rows in PyTorch's r, z, n order; see [`FusedGru`]'s
/// fields for each layout).
#[derive(Debug, Clone, Copy)]
pub struct Layout<'a> {
    /// `G` input-gate biases, r and z with their recurrent bias added.
    pub bias_in: &'a [f32],
    /// `FEATURE_DIM` columns of `G`.
    pub dense_cols: &'a [f32],
    /// One `G` row per item bucket (empty: no item embedding).
    pub item_rows: &'a [f32],
    /// One `G` row per category bucket (empty: no category embedding).
    pub category_rows: &'a [f32],
    /// Per block, `hm` columns of `3·hm`.
    pub recurrent_cols: &'a [f32],
    /// `H` recurrent biases of the n gate.
    pub bias_hn: &'a [f32],
    /// `H` head weights.
    pub head: &'a [f32],
    /// The head's bias.
    pub head_bias: f32,
}

/// Why the parameters cannot be laid out.
#[derive(Debug, thiserror::Error)]
#[error("fused step: {0}")]
pub struct KernelError(String);

impl From<candle_core::Error> for KernelError {
    fn from(e: candle_core::Error) -> Self {
        KernelError(e.to_string())
    }
}

impl FusedGru {
    /// Lays out `params` for the fused step; `members` is the number of packed seed members
    /// (their recurrent blocks are used only when the matrix really is block-diagonal).
    ///
    /// # Errors
    ///
    /// When the parameters do not have the shapes of an intent GRU.
    pub fn new(params: &GruParams, members: usize) -> Result<FusedGru, KernelError> {
        let cpu = candle_core::Device::Cpu;
        let (h, d, dense) = (params.hidden_dim(), params.input_dim(), params.dense_dim());
        if dense != FEATURE_DIM {
            return Err(KernelError(format!("{dense} dense inputs, this build has {FEATURE_DIM}")));
        }
        let w_ih: Vec<f32> = params.weight_ih.to_device(&cpu)?.flatten_all()?.to_vec1()?;
        let w_hh: Vec<f32> = params.weight_hh.to_device(&cpu)?.flatten_all()?.to_vec1()?;
        let b_ih: Vec<f32> = params.bias_ih.to_device(&cpu)?.to_vec1()?;
        let b_hh: Vec<f32> = params.bias_hh.to_device(&cpu)?.to_vec1()?;
        let head: Vec<f32> = params.head_weight.to_device(&cpu)?.flatten_all()?.to_vec1()?;
        let head_bias = params.head_bias.to_device(&cpu)?.to_vec1::<f32>()?[0];
        let members = if members > 1 && h % members == 0 && block_diagonal(&w_hh, h, members) { members } else { 1 };
        let hm = h / members;
        let g3 = 3 * h;
        let mut bias_in = vec![0f32; g3];
        let mut dense_cols = vec![0f32; FEATURE_DIM * g3];
        for row in 0..g3 {
            // r and z add both biases outside the nonlinearity; n keeps b_hn inside r ⊙ (…).
            bias_in[row] = if row < 2 * h { b_ih[row] + b_hh[row] } else { b_ih[row] };
            for c in 0..FEATURE_DIM {
                dense_cols[c * g3 + row] = w_ih[row * d + c];
            }
        }
        let fold = |table: &Option<candle_core::Tensor>, first_col: usize| -> Result<Vec<f32>, KernelError> {
            let Some(t) = table else { return Ok(Vec::new()) };
            let (buckets, width) = t.dims2()?;
            let e: Vec<f32> = t.to_device(&cpu)?.flatten_all()?.to_vec1()?;
            let mut rows = vec![0f32; buckets * g3];
            for b in 0..buckets {
                for row in 0..g3 {
                    // Summed in f64 in column order: the table is exact to f32 rounding.
                    let acc: f64 = (0..width).map(|c| f64::from(w_ih[row * d + first_col + c]) * f64::from(e[b * width + c])).sum();
                    rows[b * g3 + row] = acc as f32;
                }
            }
            Ok(rows)
        };
        let item_rows = fold(&params.item_embedding, dense)?;
        let category_rows = fold(&params.category_embedding, dense + params.item_shape().1)?;
        let mut recurrent_cols = vec![0f32; members * hm * 3 * hm];
        let mut bias_hn = vec![0f32; h];
        for m in 0..members {
            for gate in 0..3 {
                for j in 0..hm {
                    let row = gate * h + m * hm + j;
                    for i in 0..hm {
                        recurrent_cols[m * hm * 3 * hm + i * 3 * hm + gate * hm + j] = w_hh[row * h + m * hm + i];
                    }
                }
            }
            for j in 0..hm {
                bias_hn[m * hm + j] = b_hh[2 * h + m * hm + j];
            }
        }
        Ok(FusedGru { h, members, hm, bias_in, dense_cols, item_rows, category_rows, recurrent_cols, bias_hn, head, head_bias, precision: StatePrecision::F32 })
    }

    /// Hidden size `H`.
    pub fn hidden_dim(&self) -> usize {
        self.h
    }

    /// Packed members whose blocks are stepped on their own.
    pub fn blocks(&self) -> usize {
        self.members
    }

    /// Rounds every new hidden vector to `precision` (to nearest, ties to even) before the
    /// head reads it: the state then is what storing it in that precision keeps.
    pub fn with_state_precision(mut self, precision: StatePrecision) -> FusedGru {
        self.precision = precision;
        self
    }

    /// The precision new hidden vectors are rounded to.
    pub fn state_precision(&self) -> StatePrecision {
        self.precision
    }

    /// Hidden size of one block (`H / blocks`).
    pub fn member_dim(&self) -> usize {
        self.hm
    }

    /// The weights as laid out for the step, for a device that runs the same arithmetic.
    pub fn layout(&self) -> Layout<'_> {
        Layout {
            bias_in: &self.bias_in,
            dense_cols: &self.dense_cols,
            item_rows: &self.item_rows,
            category_rows: &self.category_rows,
            recurrent_cols: &self.recurrent_cols,
            bias_hn: &self.bias_hn,
            head: &self.head,
            head_bias: self.head_bias,
        }
    }

    /// Steps every row: `hidden` (`B × H`) is replaced by the new hidden vectors and `logits`
    /// (`B`) receives the head's raw logits. Rows are spread over all cores in chunks.
    ///
    /// # Panics
    ///
    /// If the buffers do not hold `inputs.len()` rows.
    pub fn step(&self, inputs: &[Features], hidden: &mut [f32], logits: &mut [f32]) {
        assert_eq!(hidden.len(), inputs.len() * self.h, "hidden buffer");
        assert_eq!(logits.len(), inputs.len(), "logit buffer");
        if inputs.len() < 2 * ROWS_PER_TASK {
            self.rows(inputs, hidden, logits);
            return;
        }
        inputs
            .par_chunks(ROWS_PER_TASK)
            .zip(hidden.par_chunks_mut(ROWS_PER_TASK * self.h))
            .zip(logits.par_chunks_mut(ROWS_PER_TASK))
            .for_each(|((x, h), l)| self.rows(x, h, l));
    }

    /// Steps consecutive rows on this thread.
    fn rows(&self, inputs: &[Features], hidden: &mut [f32], logits: &mut [f32]) {
        let mut gates = vec![0f32; 3 * self.h];
        let mut rec = vec![0f32; 3 * self.h];
        let mut r = vec![0f32; self.h];
        for ((f, h), logit) in inputs.iter().zip(hidden.chunks_exact_mut(self.h)).zip(logits.iter_mut()) {
            *logit = self.row(f, h, &mut gates, &mut rec, &mut r);
        }
    }

    /// One row: input gates, the members' recurrent blocks, then the gate math over all hidden
    /// units at once (plain array loops, which the compiler vectorises, `exp` included); returns
    /// the head's logit.
    fn row(&self, f: &Features, h: &mut [f32], gates: &mut [f32], rec: &mut [f32], r: &mut [f32]) -> f32 {
        let (hd, g3) = (self.h, 3 * self.h);
        gates.copy_from_slice(&self.bias_in);
        for (c, x) in f.dense.iter().enumerate() {
            axpy(gates, &self.dense_cols[c * g3..(c + 1) * g3], *x);
        }
        for (table, bucket) in [(&self.item_rows, f.item), (&self.category_rows, f.category)] {
            if !table.is_empty() {
                let b = (bucket as usize).min(table.len() / g3 - 1);
                add(gates, &table[b * g3..(b + 1) * g3]);
            }
        }
        let (hm, k3) = (self.hm, 3 * self.hm);
        rec.fill(0.0);
        for m in 0..self.members {
            let block = &self.recurrent_cols[m * hm * k3..(m + 1) * hm * k3];
            for (i, x) in h[m * hm..(m + 1) * hm].iter().enumerate() {
                let col = &block[i * k3..(i + 1) * k3];
                for gate in 0..3 {
                    let at = gate * hd + m * hm;
                    axpy(&mut rec[at..at + hm], &col[gate * hm..(gate + 1) * hm], *x);
                }
            }
        }
        let (g_r, rest) = gates.split_at(hd);
        let (g_z, g_n) = rest.split_at(hd);
        let (rec_r, rest) = rec.split_at(hd);
        let (rec_z, rec_n) = rest.split_at(hd);
        for ((r, g), c) in r.iter_mut().zip(g_r).zip(rec_r) {
            *r = sigmoid(*g + *c);
        }
        // n, then the new hidden unit: (1 − z)·n + z·h, written as n + z·(h − n) like candle.
        for (((((h, r), gz), cz), gn), (cn, bn)) in h.iter_mut().zip(r.iter()).zip(g_z).zip(rec_z).zip(g_n).zip(rec_n.iter().zip(&self.bias_hn)) {
            let z = sigmoid(*gz + *cz);
            let n = tanh(*gn + *r * (*cn + *bn));
            *h = n + z * (*h - n);
        }
        self.precision.round(h);
        // Summed in unit order: the same on every machine.
        let mut logit = self.head_bias;
        for (w, x) in self.head.iter().zip(h.iter()) {
            logit += *w * *x;
        }
        logit
    }
}

/// Whether the `h × h` blocks of the `3h × h` matrix `w` off the `members` diagonal blocks
/// are all zero.
fn block_diagonal(w: &[f32], h: usize, members: usize) -> bool {
    let hm = h / members;
    (0..3 * h).all(|row| {
        let m = (row % h) / hm;
        (0..h).all(|c| c / hm == m || w[row * h + c] == 0.0)
    })
}

/// `out += col · x`, elementwise along `out`.
#[inline(always)]
fn axpy(out: &mut [f32], col: &[f32], x: f32) {
    for (o, c) in out.iter_mut().zip(col) {
        *o += *c * x;
    }
}

/// `out += row`, elementwise.
#[inline(always)]
fn add(out: &mut [f32], row: &[f32]) {
    for (o, r) in out.iter_mut().zip(row) {
        *o += *r;
    }
}

/// `e^x` to within about 2 ulp (Cephes' `expf` polynomial), in plain `f32` operations so that
/// it gives the same bits on every machine and vectorises.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Round to nearest through the 1.5·2^23 trick: no rounding instruction needed.
    const SHIFT: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + SHIFT) - SHIFT;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 5.000_000_1e-1;
    let y = (p * r) * r + r + 1.0;
    // y · 2^n, with n in [-126, 127] after the clamp.
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// The logistic function through [`exp`].
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// `tanh` through [`exp`]: `1 − 2 / (e^{2x} + 1)`, exact at the saturated ends.
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    1.0 - 2.0 / (exp(2.0 * x) + 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gru::Projection;
    use candle_core::{Device, Tensor};

    use crate::gru::testing::values;

    /// A member network with `FEATURE_DIM` dense inputs, item and category embeddings.
    fn member(seed: u64, h: usize) -> GruParams {
        crate::gru::testing::network(seed, FEATURE_DIM, h, (64, 8), (16, 4))
    }

    fn features(seed: &mut u64, n: usize) -> Vec<Features> {
        (0..n)
            .map(|i| {
                let v = values(seed, FEATURE_DIM);
                let mut dense = [0f32; FEATURE_DIM];
                dense.iter_mut().zip(v).for_each(|(d, x)| *d = 4.0 * x);
                Features { item: (i * 7 % 64) as u32, category: (i * 3 % 16) as u32, ..Features::dense(dense) }
            })
            .collect()
    }

    /// candle's step (the reference): new hidden vectors and logits.
    fn candle_step(p: &GruParams, f: &[Features], h: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let how = Projection::PerRow;
        let x = p.gru_input_of(f, &Device::Cpu).unwrap();
        let h0 = Tensor::from_slice(h, (f.len(), p.hidden_dim()), &Device::Cpu).unwrap();
        let h1 = p.cell(&p.input_gates(&x, how).unwrap(), &h0, how).unwrap();
        let logits = p.logits(&h1, how).unwrap().to_vec1().unwrap();
        (h1.flatten_all().unwrap().to_vec1().unwrap(), logits)
    }

    fn assert_close(a: &[f32], b: &[f32], what: &str) {
        assert_eq!(a.len(), b.len());
        let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(worst <= 1e-5, "{what}: fused and candle differ by {worst}");
    }

    #[test]
    fn the_fused_step_equals_candles_for_a_packed_ensemble_and_a_full_matrix() {
        let packed = GruParams::pack(&(1..=5).map(|s| member(s, 8)).collect::<Vec<_>>()).unwrap();
        for (params, members, blocks) in [(&packed, 5, 5), (&member(9, 12), 1, 1), (&packed, 1, 1)] {
            let fused = FusedGru::new(params, members).unwrap();
            assert_eq!(fused.blocks(), blocks);
            let mut seed = 11;
            let (rows, h) = (700, params.hidden_dim());
            let mut hidden_c = vec![0f32; rows * h];
            let mut hidden_f = hidden_c.clone();
            // Three steps, so that the recurrent blocks start from non-zero states.
            for step in 0..3 {
                let f = features(&mut seed, rows);
                let (next_c, logits_c) = candle_step(params, &f, &hidden_c);
                let mut logits_f = vec![0f32; rows];
                fused.step(&f, &mut hidden_f, &mut logits_f);
                assert_close(&hidden_f, &next_c, &format!("hidden after step {step}"));
                assert_close(&logits_f, &logits_c, &format!("logits after step {step}"));
                hidden_c = next_c;
            }
        }
    }

    #[test]
    fn a_rows_result_does_not_depend_on_the_batch_it_is_in() {
        let params = GruParams::pack(&(1..=5).map(|s| member(s, 8)).collect::<Vec<_>>()).unwrap();
        let fused = FusedGru::new(&params, 5).unwrap();
        let mut seed = 3;
        let rows = 3 * ROWS_PER_TASK + 17;
        let f = features(&mut seed, rows);
        let start: Vec<f32> = values(&mut seed, rows * 40);
        // The whole batch at once (spread over threads) ...
        let (mut batch_h, mut batch_l) = (start.clone(), vec![0f32; rows]);
        fused.step(&f, &mut batch_h, &mut batch_l);
        // ... and each row alone, bit for bit.
        for (i, x) in f.iter().enumerate() {
            let (mut h, mut l) = (start[i * 40..(i + 1) * 40].to_vec(), [0f32]);
            fused.step(std::slice::from_ref(x), &mut h, &mut l);
            assert_eq!(h.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), batch_h[i * 40..(i + 1) * 40].iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "row {i}");
            assert_eq!(l[0].to_bits(), batch_l[i].to_bits(), "row {i}");
        }
    }

    #[test]
    fn exp_sigmoid_and_tanh_are_accurate_everywhere_that_matters() {
        let mut worst = (0f64, 0f64, 0f64);
        let mut x = -30.0f32;
        while x <= 30.0 {
            let e = (f64::from(exp(x)) - f64::from(x).exp()).abs() / f64::from(x).exp();
            let s = (f64::from(sigmoid(x)) - 1.0 / (1.0 + (-f64::from(x)).exp())).abs();
            let t = (f64::from(tanh(x)) - f64::from(x).tanh()).abs();
            worst = (worst.0.max(e), worst.1.max(s), worst.2.max(t));
            x += 0.001_7;
        }
        assert!(worst.0 < 4e-7 && worst.1 < 2e-7 && worst.2 < 4e-7, "relative exp, absolute sigmoid, tanh errors {worst:?}");
        assert!(sigmoid(-200.0) < 1e-30 && sigmoid(200.0) == 1.0);
        assert_eq!((tanh(-50.0), tanh(50.0), tanh(0.0)), (-1.0, 1.0, 0.0));
    }
}
