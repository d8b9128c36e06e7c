//! The CPU serving step of every cell the model ships (GRU, LSTM, causal convolution): one fused
//! pass per row, the packed seed ensemble run as its blocks, embeddings folded into input tables,
//! rows spread over all cores.
//!
//! candle runs a recurrent step as some thirty tensors (three projections, a dozen element-wise
//! ops, copies), one matrix-vector product per row on the CPU: bound by overhead, not
//! arithmetic. [`FusedStep`] does the same step in plain `f32` loops over weights laid out for it
//! at load:
//!
//! * **Inputs folded into tables.** A row's input gates are `b + W_dense·dense + T_item[item] +
//!   T_cat[category]`, where `T_item = W_item·E_item` (one `G·H` row per hash bucket, `G` gates)
//!   is computed once at load: no embedding lookup, no `D × G·H` product per row.
//! * **The packed ensemble as its blocks.** The recurrent weights of `k` packed members are
//!   block-diagonal (80 % zeros for five members); each member's `G·h × h` block is multiplied on
//!   its own. A matrix that is not block-diagonal runs as one block.
//! * **Gates in one pass.** Per member, its gates are computed into a small scratch and the new
//!   state is written directly; the head's logit is summed as they come.
//! * **Products as column sweeps, summed in registers.** Every matrix is stored transposed and
//!   multiplied as `out += column_i · x_i` for `i` in order, a block of outputs at a time (32
//!   input gates, or 64 with AVX2; two members' recurrent gates, for members of hidden size 8)
//!   held in vector registers until all its inputs are summed (other shapes sweep their outputs
//!   through memory, summed in the same order): the loops run along the outputs, which the compiler
//!   vectorises, and every output is summed in the same order whatever the block or vector
//!   width. Where the CPU has AVX2 the rows run in a copy of the code compiled for it (chosen at
//!   run time; without FMA, so that products and sums round as in the portable code). Rust
//!   never contracts `a * b + c` into a fused multiply-add, and `exp` is a fixed polynomial
//!   ([`exp`]) rather than the platform's libm: a row's result is bit-for-bit the same on any
//!   x86-64 or ARM machine, whichever rows share its batch — the property that makes crash
//!   recovery and replays reproduce states exactly.
//!
//! [`FusedStep::step`] splits a batch into chunks of [`ROWS_PER_TASK`] rows over all cores
//! (rayon); a row's arithmetic is the same in any chunk. It equals candle's step within 1e-5
//! (tested here and through the PyTorch interop fixture) for f32 states; with f16 or int8
//! states both round, and may differ by a rounding step where candle's unrounded value fell on
//! the other side.

use crate::{Cell, Features, GruParams, StatePrecision, FEATURE_DIM};
use rayon::prelude::*;

/// Rows per parallel task: below this, a batch runs on the calling thread.
pub const ROWS_PER_TASK: usize = 256;

/// Input-gate outputs summed in registers at once without AVX2: eight 128-bit vectors.
const PORTABLE_LANES: usize = 32;

/// Input-gate outputs summed in registers at once with AVX2: eight 256-bit vectors.
const AVX2_LANES: usize = 64;

/// A block width of 0: every product swept through memory, one input at a time over all its
/// outputs (the simple form, and the tests' reference for the blocked ones).
const SWEEP: usize = 0;

/// A network of any cell (with its head) laid out for the fused CPU step.
#[derive(Debug, Clone)]
pub struct FusedStep {
    /// The cell.
    cell: Cell,
    /// Total hidden size `H = k · hm`.
    h: usize,
    /// Packed members `k` (1 when the recurrent matrix is not block-diagonal).
    members: usize,
    /// Hidden size of one member.
    hm: usize,
    /// Input gate bias (`[gate][unit]`, as PyTorch stacks them), with the recurrent bias added
    /// (except a GRU's n gate's).
    bias_in: Vec<f32>,
    /// Dense-feature weights, transposed: `FEATURE_DIM` columns of `G·H`.
    dense_cols: Vec<f32>,
    /// `W_item · E_item`: one `G·H` row per item bucket (empty without an item embedding).
    item_rows: Vec<f32>,
    /// `W_cat · E_cat`: one `G·H` row per category bucket (empty without one).
    category_rows: Vec<f32>,
    /// Recurrent blocks, per member `hm` columns of `G·hm` (`[gate][j]` within the member).
    recurrent_cols: Vec<f32>,
    /// A GRU's recurrent bias of the n gate, inside `r ⊙ (W_hn h + b_hn)`, per hidden unit
    /// (empty for the other cells).
    bias_hn: Vec<f32>,
    /// Head weights over the hidden units (packed order `[m][j]`).
    head: Vec<f32>,
    head_bias: f32,
    /// Precision each new hidden vector is rounded to, before the head reads it.
    precision: StatePrecision,
}

/// The fused step's weights (`G·H` rows in PyTorch's order: gates r, z, n for a GRU, i, f, g, o
/// for an LSTM, a convolution's taps; see [`FusedStep`]'s fields for each layout).
#[derive(Debug, Clone, Copy)]
pub struct Layout<'a> {
    /// `G·H` input-gate biases with the recurrent bias added (a GRU's n gate without it).
    pub bias_in: &'a [f32],
    /// `FEATURE_DIM` columns of `G`.
    pub dense_cols: &'a [f32],
    /// One `G` row per item bucket (empty: no item embedding).
    pub item_rows: &'a [f32],
    /// One `G` row per category bucket (empty: no category embedding).
    pub category_rows: &'a [f32],
    /// Per block, `hm` columns of `G·hm` (empty for a convolution).
    pub recurrent_cols: &'a [f32],
    /// A GRU's `H` recurrent biases of the n gate (empty for the other cells).
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

impl FusedStep {
    /// Lays out `params` for the fused step; `members` is the number of packed seed members
    /// (their recurrent blocks are used only when the matrix really is block-diagonal).
    ///
    /// # Errors
    ///
    /// When the parameters do not have the shapes of an intent network.
    pub fn new(params: &GruParams, members: usize) -> Result<FusedStep, KernelError> {
        let cpu = candle_core::Device::Cpu;
        let (cell, h, d, dense) = (params.cell(), params.hidden_dim(), params.input_dim(), params.dense_dim());
        let gates = cell.gates();
        if dense != FEATURE_DIM {
            return Err(KernelError(format!("{dense} dense inputs, this build has {FEATURE_DIM}")));
        }
        let w_ih: Vec<f32> = params.weight_ih.to_device(&cpu)?.flatten_all()?.to_vec1()?;
        // A convolution has no recurrent tensors: empty.
        let host = |t: &Option<candle_core::Tensor>| -> Result<Vec<f32>, KernelError> {
            Ok(t.as_ref().map(|t| t.to_device(&cpu)?.flatten_all()?.to_vec1()).transpose()?.unwrap_or_default())
        };
        let w_hh = host(&params.weight_hh)?;
        let b_ih: Vec<f32> = params.bias_ih.to_device(&cpu)?.to_vec1()?;
        let b_hh = host(&params.bias_hh)?;
        let head: Vec<f32> = params.head_weight.to_device(&cpu)?.flatten_all()?.to_vec1()?;
        let head_bias = params.head_bias.to_device(&cpu)?.to_vec1::<f32>()?[0];
        // A convolution has no recurrent matrix: its members need no blocks.
        let blocks = members > 1 && h % members == 0 && (!cell.is_recurrent() || block_diagonal(&w_hh, gates, h, members));
        let members = if blocks { members } else { 1 };
        let hm = h / members;
        let g3 = gates * h;
        let mut bias_in = vec![0f32; g3];
        let mut dense_cols = vec![0f32; FEATURE_DIM * g3];
        for row in 0..g3 {
            // Both biases add outside the nonlinearity, except a GRU's n gate, which keeps b_hn
            // inside r ⊙ (…).
            bias_in[row] = match cell {
                Cell::Gru if row >= 2 * h => b_ih[row],
                Cell::Gru | Cell::Lstm => b_ih[row] + b_hh[row],
                Cell::Cnn => b_ih[row],
            };
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
        let mut recurrent_cols = vec![0f32; if cell.is_recurrent() { members * hm * gates * hm } else { 0 }];
        for m in (0..members).filter(|_| cell.is_recurrent()) {
            for gate in 0..gates {
                for j in 0..hm {
                    let row = gate * h + m * hm + j;
                    for i in 0..hm {
                        recurrent_cols[m * hm * gates * hm + i * gates * hm + gate * hm + j] = w_hh[row * h + m * hm + i];
                    }
                }
            }
        }
        let bias_hn = if cell == Cell::Gru { b_hh[2 * h..].to_vec() } else { Vec::new() };
        Ok(FusedStep { cell, h, members, hm, bias_in, dense_cols, item_rows, category_rows, recurrent_cols, bias_hn, head, head_bias, precision: StatePrecision::F32 })
    }

    /// The cell.
    pub fn cell(&self) -> Cell {
        self.cell
    }

    /// Hidden size `H`.
    pub fn hidden_dim(&self) -> usize {
        self.h
    }

    /// Values per user state: `H`, or `2H` for an LSTM (`[h | c]`).
    pub fn state_dim(&self) -> usize {
        self.cell.state_dim(self.h)
    }

    /// Packed members whose blocks are stepped on their own.
    pub fn blocks(&self) -> usize {
        self.members
    }

    /// Rounds every new state to `precision` (to nearest, ties to even) before the head reads
    /// it: the state then is what storing it in that precision keeps.
    pub fn with_state_precision(mut self, precision: StatePrecision) -> FusedStep {
        self.precision = precision;
        self
    }

    /// The precision new states are rounded to.
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

    /// Steps every row: `states` (`B × S`, `S` = [`state_dim`](Self::state_dim)) is replaced
    /// by the new states and `logits` (`B`) receives the head's raw logits. Rows are spread over
    /// all cores in chunks.
    ///
    /// # Panics
    ///
    /// If the buffers do not hold `inputs.len()` rows.
    pub fn step(&self, inputs: &[Features], states: &mut [f32], logits: &mut [f32]) {
        let s = self.state_dim();
        assert_eq!(states.len(), inputs.len() * s, "state buffer");
        assert_eq!(logits.len(), inputs.len(), "logit buffer");
        if inputs.len() < 2 * ROWS_PER_TASK {
            self.rows(inputs, states, logits);
            return;
        }
        inputs
            .par_chunks(ROWS_PER_TASK)
            .zip(states.par_chunks_mut(ROWS_PER_TASK * s))
            .zip(logits.par_chunks_mut(ROWS_PER_TASK))
            .for_each(|((x, h), l)| self.rows(x, h, l));
    }

    /// Steps consecutive rows on this thread, in 256-bit vectors where the CPU has AVX2 (the
    /// same operations in the same order: the same bits, see the module docs).
    fn rows(&self, inputs: &[Features], states: &mut [f32], logits: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2, checked just above.
            unsafe { self.rows_avx2(inputs, states, logits) };
            return;
        }
        self.rows_in::<PORTABLE_LANES>(inputs, states, logits);
    }

    /// [`rows`](Self::rows) compiled for AVX2 (no FMA: products and sums stay separately
    /// rounded), with twice the lanes in registers.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn rows_avx2(&self, inputs: &[Features], states: &mut [f32], logits: &mut [f32]) {
        self.rows_in::<AVX2_LANES>(inputs, states, logits);
    }

    /// Steps consecutive rows, the products summed `W` outputs at a time in registers (`W` =
    /// [`SWEEP`]: through memory).
    #[inline(always)]
    fn rows_in<const W: usize>(&self, inputs: &[Features], states: &mut [f32], logits: &mut [f32]) {
        let g = self.cell.gates() * self.h;
        let (mut gates, mut rec, mut r) = (vec![0f32; g], vec![0f32; g], vec![0f32; self.h]);
        for ((f, state), logit) in inputs.iter().zip(states.chunks_exact_mut(self.state_dim())).zip(logits.iter_mut()) {
            *logit = match self.cell {
                Cell::Gru => self.gru_row::<W>(f, state, &mut gates, &mut rec, &mut r),
                Cell::Lstm => self.lstm_row::<W>(f, state, &mut gates, &mut rec),
                Cell::Cnn => self.cnn_row::<W>(f, state, &mut gates),
            };
        }
    }

    /// A row's input gates (or a convolution's taps) into `gates` (`G·H`, `[gate][unit]`):
    /// each output sums the bias, the dense columns in order, then the item's and the
    /// category's table rows. `W` outputs at a time are kept in registers meanwhile; the last
    /// block may overlap the one before, and an output computed twice gets the same bits
    /// twice. With fewer than `W` outputs, or `W` = [`SWEEP`], the sums run through memory.
    #[inline(always)]
    fn inputs<const W: usize>(&self, f: &Features, gates: &mut [f32]) {
        let g = gates.len();
        // Where the row's item and category rows start in their tables (none without a table).
        let rows = [(&self.item_rows, f.item), (&self.category_rows, f.category)]
            .map(|(table, bucket)| (!table.is_empty()).then(|| (bucket as usize).min(table.len() / g - 1) * g));
        if W == SWEEP || g < W {
            gates.copy_from_slice(&self.bias_in);
            for (c, x) in f.dense.iter().enumerate() {
                axpy(gates, &self.dense_cols[c * g..(c + 1) * g], *x);
            }
            for (table, row) in [&self.item_rows, &self.category_rows].into_iter().zip(rows) {
                if let Some(row) = row {
                    add(gates, &table[row..row + g]);
                }
            }
            return;
        }
        for first in (0..g).step_by(W).map(|at| at.min(g - W)) {
            gates[first..first + W].copy_from_slice(&self.input_block::<W>(f, rows, first));
        }
    }

    /// The `W` input-gate outputs from `first` of a row whose table rows start at `rows`.
    #[inline(always)]
    fn input_block<const W: usize>(&self, f: &Features, rows: [Option<usize>; 2], first: usize) -> [f32; W] {
        let g = self.bias_in.len();
        let mut acc = *lanes::<W>(&self.bias_in, first);
        for (c, x) in f.dense.iter().enumerate() {
            axpy(&mut acc, lanes::<W>(&self.dense_cols, c * g + first), *x);
        }
        for (table, row) in [&self.item_rows, &self.category_rows].into_iter().zip(rows) {
            if let Some(row) = row {
                add(&mut acc, lanes::<W>(table, row + first));
            }
        }
        acc
    }

    /// A row's input gates into `gates` and its members' recurrent products of `h` into `rec`
    /// (both `G·H`, `[gate][unit]`, `G` gates: a constant, so that the gate loop unrolls).
    #[inline(always)]
    fn products<const G: usize, const W: usize>(&self, f: &Features, h: &[f32], gates: &mut [f32], rec: &mut [f32]) {
        self.inputs::<W>(f, gates);
        match (G, self.hm, W) {
            (_, _, SWEEP) => self.recurrent::<G>(h, rec),
            // The default model's blocks (hidden size 8) in registers, two members at a time.
            (3, 8, _) => self.recurrent_pairs::<3, 8, 24>(h, rec),
            (4, 8, _) => self.recurrent_pairs::<4, 8, 32>(h, rec),
            _ => self.recurrent::<G>(h, rec),
        }
    }

    /// The members' recurrent products, any block size: per input, one sweep of each gate's
    /// units through memory.
    #[inline(always)]
    fn recurrent<const G: usize>(&self, h: &[f32], rec: &mut [f32]) {
        let (hd, hm, k3) = (self.h, self.hm, G * self.hm);
        rec.fill(0.0);
        for m in 0..self.members {
            let block = &self.recurrent_cols[m * hm * k3..(m + 1) * hm * k3];
            for (i, x) in h[m * hm..(m + 1) * hm].iter().enumerate() {
                let col = &block[i * k3..(i + 1) * k3];
                for gate in 0..G {
                    let at = gate * hd + m * hm;
                    axpy(&mut rec[at..at + hm], &col[gate * hm..(gate + 1) * hm], *x);
                }
            }
        }
    }

    /// The members' recurrent products for blocks of `HM` units (`K = G·HM` outputs each), two
    /// members' outputs in registers at once so that their sums interleave; each output is
    /// summed from zero over its member's inputs in order, as in [`recurrent`](Self::recurrent).
    #[inline(always)]
    fn recurrent_pairs<const G: usize, const HM: usize, const K: usize>(&self, h: &[f32], rec: &mut [f32]) {
        const { assert!(K == G * HM) };
        debug_assert_eq!(self.hm, HM);
        let hd = self.h;
        let column = |m: usize, i: usize| -> &[f32; K] { lanes(&self.recurrent_cols, (m * HM + i) * K) };
        let mut store = |m: usize, acc: &[f32; K]| {
            for gate in 0..G {
                rec[gate * hd + m * HM..gate * hd + (m + 1) * HM].copy_from_slice(&acc[gate * HM..(gate + 1) * HM]);
            }
        };
        let mut m = 0;
        while m + 2 <= self.members {
            let (mut a, mut b) = ([0f32; K], [0f32; K]);
            for i in 0..HM {
                axpy(&mut a, column(m, i), h[m * HM + i]);
                axpy(&mut b, column(m + 1, i), h[(m + 1) * HM + i]);
            }
            store(m, &a);
            store(m + 1, &b);
            m += 2;
        }
        if m < self.members {
            let mut a = [0f32; K];
            for i in 0..HM {
                axpy(&mut a, column(m, i), h[m * HM + i]);
            }
            store(m, &a);
        }
    }

    /// One GRU row: the products, then the gate math over all hidden units at once (plain array
    /// loops, which the compiler vectorises, `exp` included); returns the head's logit.
    #[inline(always)]
    fn gru_row<const W: usize>(&self, f: &Features, h: &mut [f32], gates: &mut [f32], rec: &mut [f32], r: &mut [f32]) -> f32 {
        let hd = self.h;
        self.products::<3, W>(f, h, gates, rec);
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
        self.head_logit(h)
    }

    /// One LSTM row on its state `[h | c]`: the products, then `c' = f·c + i·g`, `h' =
    /// o·tanh(c')` over all hidden units at once; returns the head's logit.
    #[inline(always)]
    fn lstm_row<const W: usize>(&self, f: &Features, state: &mut [f32], gates: &mut [f32], rec: &mut [f32]) -> f32 {
        let hd = self.h;
        self.products::<4, W>(f, &state[..hd], gates, rec);
        // Pre-activations, then each gate's nonlinearity over its units: plain loops that vectorise.
        for (g, r) in gates.iter_mut().zip(rec.iter()) {
            *g += *r;
        }
        let (g_i, rest) = gates.split_at_mut(hd);
        let (g_f, rest) = rest.split_at_mut(hd);
        let (g_g, g_o) = rest.split_at_mut(hd);
        // One loop per gate: a chain of iterators would not vectorise.
        for gate in [&mut *g_i, &mut *g_f, &mut *g_o] {
            for x in gate.iter_mut() {
                *x = sigmoid(*x);
            }
        }
        for x in g_g.iter_mut() {
            *x = tanh(*x);
        }
        let (h, c) = state.split_at_mut(hd);
        for ((c, i), (f, g)) in c.iter_mut().zip(g_i.iter()).zip(g_f.iter().zip(g_g.iter())) {
            *c = *f * *c + *i * *g;
        }
        for ((h, c), o) in h.iter_mut().zip(c.iter()).zip(g_o.iter()) {
            *h = *o * tanh(*c);
        }
        self.precision.round(state);
        self.head_logit(&state[..hd])
    }

    /// One convolution row on its state `[y | P_1 | … | P_{k−1}]`: the taps `u_j` of the event,
    /// then `y = relu(u_0 + P_1)`, `P_m = u_m + P_{m+1}`, `P_{k−1} = u_{k−1}`; returns the head's
    /// logit of `y`.
    #[inline(always)]
    fn cnn_row<const W: usize>(&self, f: &Features, state: &mut [f32], taps: &mut [f32]) -> f32 {
        let hd = self.h;
        self.inputs::<W>(f, taps);
        let (y, partials) = state.split_at_mut(hd);
        for ((y, u), p) in y.iter_mut().zip(&taps[..hd]).zip(partials.iter()) {
            *y = relu(*u + *p);
        }
        // In order of m, so each P_m reads the P_{m+1} of the step before.
        for m in 1..crate::gru::CNN_TAPS {
            let (left, right) = partials.split_at_mut(m * hd);
            let p = &mut left[(m - 1) * hd..];
            let u = &taps[m * hd..(m + 1) * hd];
            if m + 1 < crate::gru::CNN_TAPS {
                for ((p, u), next) in p.iter_mut().zip(u).zip(right[..hd].iter()) {
                    *p = *u + *next;
                }
            } else {
                p.copy_from_slice(u);
            }
        }
        self.precision.round(state);
        self.head_logit(&state[..hd])
    }

    /// The head's logit of new hidden units, summed in unit order: the same on every machine.
    #[inline(always)]
    fn head_logit(&self, h: &[f32]) -> f32 {
        let mut logit = self.head_bias;
        for (w, x) in self.head.iter().zip(h.iter()) {
            logit += *w * *x;
        }
        logit
    }
}

/// Whether the `h × h` blocks of the `gates·h × h` matrix `w` off the `members` diagonal
/// blocks are all zero.
fn block_diagonal(w: &[f32], gates: usize, h: usize, members: usize) -> bool {
    let hm = h / members;
    (0..gates * h).all(|row| {
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

/// The `W` values of `values` from `at`, as an array: its length known to the compiler, so
/// that a sum over it stays in registers.
#[inline(always)]
fn lanes<const W: usize>(values: &[f32], at: usize) -> &[f32; W] {
    values[at..at + W].try_into().expect("a slice of W values")
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

/// `max(x, 0)`: candle's `relu` for every number but NaN, which stays NaN here (candle gives 0;
/// the CUDA kernel does as this one).
#[inline(always)]
pub fn relu(x: f32) -> f32 {
    if x < 0.0 { 0.0 } else { x }
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

    /// A member network of `cell` with `FEATURE_DIM` dense inputs, item and category
    /// embeddings.
    fn member(cell: Cell, seed: u64, h: usize) -> GruParams {
        crate::gru::testing::network(cell, seed, FEATURE_DIM, h, (64, 8), (16, 4))
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

    /// candle's step (the reference): new states and logits.
    fn candle_step(p: &GruParams, f: &[Features], h: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let how = Projection::PerRow;
        let x = p.gru_input_of(f, &Device::Cpu).unwrap();
        let h0 = Tensor::from_slice(h, (f.len(), p.state_dim()), &Device::Cpu).unwrap();
        let h1 = p.step_states(&p.input_gates(&x, how).unwrap(), &h0, how).unwrap();
        let logits = p.logits(&h1, how).unwrap().to_vec1().unwrap();
        (h1.flatten_all().unwrap().to_vec1().unwrap(), logits)
    }

    fn assert_close(a: &[f32], b: &[f32], what: &str) {
        assert_eq!(a.len(), b.len());
        let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(worst <= 1e-5, "{what}: fused and candle differ by {worst}");
    }

    #[test]
    fn the_fused_step_equals_candles_for_a_packed_ensemble_and_a_full_matrix_of_every_cell() {
        for cell in Cell::ALL {
            let packed = GruParams::pack(&(1..=5).map(|s| member(cell, s, 8)).collect::<Vec<_>>()).unwrap();
            for (params, members, blocks) in [(&packed, 5, 5), (&member(cell, 9, 12), 1, 1), (&packed, 1, 1)] {
                equals_candle(params, members, blocks);
            }
        }
    }

    fn equals_candle(params: &GruParams, members: usize, blocks: usize) {
        {
            let fused = FusedStep::new(params, members).unwrap();
            assert_eq!((fused.blocks(), fused.cell(), fused.state_dim()), (blocks, params.cell(), params.state_dim()));
            let mut seed = 11;
            let (rows, h) = (700, params.state_dim());
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
        for cell in Cell::ALL {
            let params = GruParams::pack(&(1..=5).map(|s| member(cell, s, 8)).collect::<Vec<_>>()).unwrap();
            let fused = FusedStep::new(&params, 5).unwrap();
            let s = fused.state_dim();
            let mut seed = 3;
            let rows = 3 * ROWS_PER_TASK + 17;
            let f = features(&mut seed, rows);
            let start: Vec<f32> = values(&mut seed, rows * s);
            // The whole batch at once (spread over threads) ...
            let (mut batch_h, mut batch_l) = (start.clone(), vec![0f32; rows]);
            fused.step(&f, &mut batch_h, &mut batch_l);
            // ... and each row alone, bit for bit.
            for (i, x) in f.iter().enumerate() {
                let (mut h, mut l) = (start[i * s..(i + 1) * s].to_vec(), [0f32]);
                fused.step(std::slice::from_ref(x), &mut h, &mut l);
                assert_eq!(h.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), batch_h[i * s..(i + 1) * s].iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "{cell} row {i}");
                assert_eq!(l[0].to_bits(), batch_l[i].to_bits(), "{cell} row {i}");
            }
        }
    }

    #[test]
    fn every_block_width_gives_a_row_the_bits_of_the_sweeps_through_memory() {
        for cell in Cell::ALL {
            let pack = |n: u64| GruParams::pack(&(1..=n).map(|s| member(cell, s, 8)).collect::<Vec<_>>()).unwrap();
            // The default blocks (hidden size 8: pairs in registers), three members (a pair
            // and one alone), and a full matrix (its recurrent products through memory; its
            // 36 or 48 input gates take the overlapping blocks of 32, and are too few for 64).
            for (params, members) in [(&pack(5), 5), (&pack(3), 3), (&member(cell, 9, 12), 1)] {
                for precision in [StatePrecision::F32, StatePrecision::Int8] {
                    let fused = FusedStep::new(params, members).unwrap().with_state_precision(precision);
                    let (mut seed, rows, s) = (5, 300, fused.state_dim());
                    let mut states: Vec<Vec<f32>> = vec![values(&mut seed, rows * s); 4];
                    for step in 0..3 {
                        let f = features(&mut seed, rows);
                        let mut logits = vec![vec![0f32; rows]; 4];
                        // Every product swept through memory (the plain form, which equals
                        // candle's step above), the portable and the AVX2 block widths (both
                        // compiled portably here), and the CPU's own path.
                        fused.rows_in::<SWEEP>(&f, &mut states[0], &mut logits[0]);
                        fused.rows_in::<PORTABLE_LANES>(&f, &mut states[1], &mut logits[1]);
                        fused.rows_in::<AVX2_LANES>(&f, &mut states[2], &mut logits[2]);
                        fused.rows(&f, &mut states[3], &mut logits[3]);
                        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        for path in 1..4 {
                            let what = format!("{cell}, {members} members, {precision:?} states, step {step}, path {path}");
                            assert_eq!(bits(&states[path]), bits(&states[0]), "{what}: states");
                            assert_eq!(bits(&logits[path]), bits(&logits[0]), "{what}: logits");
                        }
                    }
                }
            }
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
