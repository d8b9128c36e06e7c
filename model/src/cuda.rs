//! The GPU serving step (`cuda` feature): hidden states resident on the device, one fused
//! kernel per step.
//!
//! [`CudaStates`] holds a slab of `capacity × S` states (hidden vectors, an LSTM's memories, a
//! convolution's partial sums) in device memory and the CPU kernel's weight layout ([`FusedStep`]: input tables with the embeddings folded in, the packed
//! ensemble's recurrent blocks). A step sends one packed record per row — the dense features,
//! the item and category buckets, the slot and a reset flag — through a pinned staging buffer,
//! runs the cell's kernel (`gru_step`, `lstm_step` or `cnn_step` in `src/gru_step.cu`: one thread
//! per hidden unit of a row, gates in registers, the state updated in place), and brings one
//! logit per row back. States cross the bus only when a user is loaded into a slot or read back
//! to be persisted.
//!
//! The kernel repeats the CPU kernel's operations in the same order, compiled without
//! multiply-add contraction, with IEEE division and without flush-to-zero: a row's new state
//! and logit are bit-for-bit the CPU's, whatever rows share the launch (checked by the
//! `intentflow-gpu` binary on a GPU machine).

use crate::kernel::FusedStep;
use crate::Cell;
use crate::resident::{check_rows, out_of_range, ResidentRow, ResidentStates, SlotCheck};
use crate::{ModelError, StatePrecision, FEATURE_DIM};
use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaSlice, CudaStream, LaunchConfig, PinnedHostSlice, PushKernelArg};
use candle_core::Device;
use rayon::prelude::*;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The kernels' PTX, built by `build.rs`.
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/gru_step.ptx"));
/// Module name under which candle's device caches the PTX.
const MODULE: &str = "intentflow_gru_step";
/// `u32` words per row of step input: dense bits, item, category, slot, flags.
const STRIDE: usize = FEATURE_DIM + 4;
/// Threads per block aimed at (whole rows of `H` threads each).
const BLOCK_THREADS: usize = 256;

fn driver(e: impl std::fmt::Display) -> ModelError {
    ModelError::CudaUnavailable(e.to_string())
}

/// The model's weights on the device, in the fused layout.
struct Weights {
    bias_in: CudaSlice<f32>,
    dense_cols: CudaSlice<f32>,
    item_rows: CudaSlice<f32>,
    category_rows: CudaSlice<f32>,
    recurrent_cols: CudaSlice<f32>,
    bias_hn: CudaSlice<f32>,
    head: CudaSlice<f32>,
    head_bias: f32,
    /// How new state values are kept (the model's `--state-precision`): 0 in f32, 1 rounded to
    /// f16, 2 rounded to int8 blocks.
    precision: u32,
    item_buckets: u32,
    category_buckets: u32,
}

/// Device buffers that grow with the largest step seen.
struct Staging {
    /// Pinned host records of the next step.
    host_in: PinnedHostSlice<u32>,
    /// Pinned host logits or gathered vectors.
    host_out: PinnedHostSlice<f32>,
    dev_in: CudaSlice<u32>,
    dev_out: CudaSlice<f32>,
}

/// A resident slab of states on a CUDA device, stepped by the fused kernel of the model's cell.
pub struct CudaStates {
    stream: Arc<CudaStream>,
    step_fn: CudaFunction,
    scatter_fn: CudaFunction,
    gather_fn: CudaFunction,
    weights: Weights,
    states: CudaSlice<f32>,
    /// Values per state (`H`; `2H` for an LSTM, `3H` for a convolution).
    h: usize,
    /// Hidden units `H`: threads per row.
    units: usize,
    hm: usize,
    cell: Cell,
    capacity: usize,
    staging: Staging,
    slots: SlotCheck,
}

impl Drop for CudaStates {
    fn drop(&mut self) {
        // The staging buffers are freed after this: no queued copy may still use them.
        let _ = self.stream.synchronize();
    }
}

impl std::fmt::Debug for CudaStates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaStates {{ h: {}, capacity: {} }}", self.h, self.capacity)
    }
}

impl CudaStates {
    /// Uploads `kernel`'s weights to `device` and allocates `capacity` zero vectors there.
    ///
    /// # Errors
    ///
    /// [`ModelError::CudaUnavailable`] when `device` is not a CUDA device or the device
    /// refuses the module or the memory; [`ModelError::Invalid`] for a hidden size the kernel
    /// does not take (over 1,024 units).
    pub fn new(kernel: &FusedStep, device: &Device, capacity: usize) -> Result<CudaStates, ModelError> {
        let dev = device.as_cuda_device().map_err(driver)?;
        let (units, hm, h, cell) = (kernel.hidden_dim(), kernel.member_dim(), kernel.state_dim(), kernel.cell());
        if units > 1024 {
            return Err(ModelError::Invalid(format!("the GPU step takes at most 1,024 hidden units, the model has {units}")));
        }
        let precision = match kernel.state_precision() {
            StatePrecision::F32 => 0u32,
            StatePrecision::F16 => 1,
            StatePrecision::Int8 => 2,
            other => return Err(ModelError::Invalid(format!("the GPU step keeps states in f32, f16 or int8; this model rounds them to {other:?}: run it on the CPU"))),
        };
        let stream = dev.cuda_stream();
        let func = |name: &str| dev.get_or_load_custom_func(name, MODULE, PTX).map(|f| f.into_cuda_function()).map_err(driver);
        let up = |v: &[f32]| -> Result<CudaSlice<f32>, ModelError> {
            // A zero-length device buffer cannot be allocated: absent tables get one unused zero.
            if v.is_empty() {
                return stream.clone_htod(&[0f32][..]).map_err(driver);
            }
            stream.clone_htod(v).map_err(driver)
        };
        let layout = kernel.layout();
        let g3 = cell.gates() * units;
        let weights = Weights {
            bias_in: up(layout.bias_in)?,
            dense_cols: up(layout.dense_cols)?,
            item_rows: up(layout.item_rows)?,
            category_rows: up(layout.category_rows)?,
            recurrent_cols: up(layout.recurrent_cols)?,
            bias_hn: up(layout.bias_hn)?,
            head: up(layout.head)?,
            head_bias: layout.head_bias,
            precision,
            item_buckets: (layout.item_rows.len() / g3) as u32,
            category_buckets: (layout.category_rows.len() / g3) as u32,
        };
        let states = stream.alloc_zeros::<f32>(capacity.max(1) * h).map_err(driver)?;
        let staging = Staging::new(&stream, 1024, h)?;
        Ok(CudaStates {
            step_fn: func(match cell {
                Cell::Gru => "gru_step",
                Cell::Lstm => "lstm_step",
                Cell::Cnn => "cnn_step",
            })?,
            scatter_fn: func("scatter_states")?,
            gather_fn: func("gather_states")?,
            stream,
            weights,
            states,
            h,
            units,
            hm,
            cell,
            capacity,
            staging,
            slots: SlotCheck::default(),
        })
    }

    /// Waits for the device to finish queued work.
    fn sync(&self) -> Result<(), ModelError> {
        self.stream.synchronize().map_err(driver)
    }

    /// A launch over `n` elements in blocks of 256 threads.
    fn flat(n: usize) -> LaunchConfig {
        LaunchConfig { grid_dim: (n.div_ceil(256) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
    }
}

impl Staging {
    fn new(stream: &Arc<CudaStream>, rows: usize, h: usize) -> Result<Staging, ModelError> {
        let ctx = stream.context();
        // SAFETY: flag 0 asks for plain page-locked memory the host may read back; it is zeroed
        // below before any use.
        let (mut host_in, mut host_out) = unsafe { (ctx.alloc_pinned_with_flags::<u32>(rows * STRIDE.max(h + 1), 0).map_err(driver)?, ctx.alloc_pinned_with_flags::<f32>(rows * h, 0).map_err(driver)?) };
        host_in.as_mut_slice().map_err(driver)?.fill(0);
        host_out.as_mut_slice().map_err(driver)?.fill(0.0);
        Ok(Staging {
            host_in,
            host_out,
            dev_in: stream.alloc_zeros::<u32>(rows * STRIDE.max(h + 1)).map_err(driver)?,
            dev_out: stream.alloc_zeros::<f32>(rows * h).map_err(driver)?,
        })
    }

    /// Makes room for `rows` rows of input words and `rows × h` output values.
    fn reserve(&mut self, stream: &Arc<CudaStream>, rows: usize, h: usize) -> Result<(), ModelError> {
        if self.host_in.len() < rows * STRIDE.max(h + 1) || self.host_out.len() < rows * h {
            // No copy may still read the buffers about to be freed.
            stream.synchronize().map_err(driver)?;
            *self = Staging::new(stream, rows.next_power_of_two(), h)?;
        }
        Ok(())
    }
}

impl ResidentStates for CudaStates {
    fn state_dim(&self) -> usize {
        self.h
    }

    fn capacity(&self) -> usize {
        self.capacity
    }

    fn load(&mut self, slots: &[u32], hidden: &[f32]) -> Result<(), ModelError> {
        let loaded = self.load_queued(slots, hidden);
        self.settled(loaded)
    }

    fn read(&mut self, slots: &[u32], out: &mut Vec<f32>) -> Result<(), ModelError> {
        let read = self.read_queued(slots, out);
        self.settled(read)
    }

    fn step(&mut self, rows: &[ResidentRow], logits: &mut Vec<f32>) -> Result<(), ModelError> {
        let stepped = self.step_queued(rows, logits);
        self.settled(stepped)
    }
}

impl CudaStates {
    /// After an error, waits for whatever was queued: no copy may still read a staging buffer
    /// that the next call rewrites or frees.
    fn settled(&self, result: Result<(), ModelError>) -> Result<(), ModelError> {
        if result.is_err() {
            let _ = self.stream.synchronize();
        }
        result
    }

    fn load_queued(&mut self, slots: &[u32], hidden: &[f32]) -> Result<(), ModelError> {
        let (n, h) = (slots.len(), self.h);
        check_rows(n, h, hidden.len())?;
        self.slots.check(slots.iter().copied(), self.capacity, false)?;
        if n == 0 {
            return Ok(());
        }
        self.staging.reserve(&self.stream, n, h)?;
        let st = &mut self.staging;
        // Slots first, then the vectors' bits, in one transfer.
        let words = st.host_in.as_mut_slice().map_err(driver)?;
        words[..n].copy_from_slice(slots);
        words[n..n + n * h].par_chunks_mut(PACK_ROWS * h).zip(hidden.par_chunks(PACK_ROWS * h)).for_each(|(w, v)| {
            for (w, v) in w.iter_mut().zip(v) {
                *w = v.to_bits();
            }
        });
        self.stream.memcpy_htod(&words[..n + n * h], &mut st.dev_in).map_err(driver)?;
        let (slots_dev, vectors_dev) = (st.dev_in.slice(..n), st.dev_in.slice(n..n + n * h));
        let (n32, h32) = (n as u32, h as u32);
        let mut launch = self.stream.launch_builder(&self.scatter_fn);
        launch.arg(&n32).arg(&h32).arg(&slots_dev).arg(&vectors_dev).arg(&mut self.states);
        // SAFETY: the arguments match `scatter_states`' signature; every slot is in range.
        unsafe { launch.launch(CudaStates::flat(n * h)) }.map_err(driver)?;
        // The staging buffer may be rewritten as soon as this returns.
        self.sync()
    }

    fn read_queued(&mut self, slots: &[u32], out: &mut Vec<f32>) -> Result<(), ModelError> {
        let (n, h) = (slots.len(), self.h);
        self.slots.check(slots.iter().copied(), self.capacity, false)?;
        if n == 0 {
            out.clear();
            return Ok(());
        }
        self.staging.reserve(&self.stream, n, h)?;
        let st = &mut self.staging;
        st.host_in.as_mut_slice().map_err(driver)?[..n].copy_from_slice(slots);
        self.stream.memcpy_htod(&st.host_in.as_slice().map_err(driver)?[..n], &mut st.dev_in).map_err(driver)?;
        let (n32, h32) = (n as u32, h as u32);
        let slots_dev = st.dev_in.slice(..n);
        let mut launch = self.stream.launch_builder(&self.gather_fn);
        launch.arg(&n32).arg(&h32).arg(&slots_dev).arg(&self.states).arg(&mut st.dev_out);
        // SAFETY: the arguments match `gather_states`' signature; every slot is in range.
        unsafe { launch.launch(CudaStates::flat(n * h)) }.map_err(driver)?;
        let host = st.host_out.as_mut_slice().map_err(driver)?;
        self.stream.memcpy_dtoh(&st.dev_out.slice(..n * h), &mut host[..n * h]).map_err(driver)?;
        // A copy into page-locked memory is asynchronous: wait for it before reading.
        self.stream.synchronize().map_err(driver)?;
        // Every value is overwritten: only a longer buffer than before is zeroed first.
        out.resize(n * h, 0.0);
        out.par_chunks_mut(PACK_ROWS * h).zip(host[..n * h].par_chunks(PACK_ROWS * h)).for_each(|(o, v)| o.copy_from_slice(v));
        Ok(())
    }

    fn step_queued(&mut self, rows: &[ResidentRow], logits: &mut Vec<f32>) -> Result<(), ModelError> {
        let n = rows.len();
        // Slots are checked against the capacity while they are packed, chunk by chunk before
        // each launch; that no slot repeats is the caller's contract (a repeated slot is no
        // memory error, its rows race), checked only in debug builds: a pass over the slots
        // costs more than the kernel.
        #[cfg(debug_assertions)]
        self.slots.check(rows.iter().map(|r| r.slot), self.capacity, true)?;
        logits.clear();
        if n == 0 {
            return Ok(());
        }
        self.staging.reserve(&self.stream, n, self.h)?;
        // Chunk by chunk: the host packs the next chunk while the device copies and steps the
        // one before (all on one stream, so each kernel waits for its own records).
        for (k, chunk) in rows.chunks(CHUNK_ROWS).enumerate() {
            let (first, count) = (k * CHUNK_ROWS, chunk.len());
            let words = self.staging.host_in.as_mut_slice().map_err(driver)?;
            let records = &mut words[first * STRIDE..(first + count) * STRIDE];
            if let Some(slot) = pack(chunk, records, self.capacity) {
                // Chunks already launched stay stepped: the step failed, its slots must be loaded again.
                return Err(out_of_range(slot, self.capacity));
            }
            let mut target = self.staging.dev_in.slice_mut(first * STRIDE..(first + count) * STRIDE);
            self.stream.memcpy_htod(&*records, &mut target).map_err(driver)?;
            self.launch_step(first, count)?;
        }
        self.download_logits(n, logits)
    }
}

/// Rows per launch of a large step: packing a chunk on the host overlaps the device's work on
/// the chunk before.
const CHUNK_ROWS: usize = 1 << 16;
/// Rows packed per parallel task.
const PACK_ROWS: usize = 8_192;

/// Writes rows as step records (`STRIDE` words each), in parallel for large chunks; returns a
/// slot of `capacity` or more if there is one (the records are then not to be sent).
fn pack(rows: &[ResidentRow], words: &mut [u32], capacity: usize) -> Option<u32> {
    let serial = |rows: &[ResidentRow], words: &mut [u32]| {
        let mut largest = 0u32;
        for (row, w) in rows.iter().zip(words.chunks_exact_mut(STRIDE)) {
            for (w, x) in w.iter_mut().zip(row.features.dense) {
                *w = x.to_bits();
            }
            w[FEATURE_DIM] = row.features.item;
            w[FEATURE_DIM + 1] = row.features.category;
            w[FEATURE_DIM + 2] = row.slot;
            w[FEATURE_DIM + 3] = u32::from(row.reset);
            largest = largest.max(row.slot);
        }
        largest
    };
    let largest = if rows.len() < 2 * PACK_ROWS {
        serial(rows, words)
    } else {
        rows.par_chunks(PACK_ROWS).zip(words.par_chunks_mut(PACK_ROWS * STRIDE)).map(|(r, w)| serial(r, w)).max().unwrap_or(0)
    };
    (largest as usize >= capacity).then_some(largest)
}

/// The error of a slot out of range.
/// Where the time of one step goes, each phase waited for before the next starts.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepProfile {
    /// Writing the rows' records on the host.
    pub pack: Duration,
    /// Copying them to the device.
    pub upload: Duration,
    /// The kernel.
    pub kernel: Duration,
    /// Copying the logits back.
    pub download: Duration,
}

impl CudaStates {
    /// Launches the step over `count` rows whose records start at row `first` of the staged
    /// input; their logits land at the same rows of the staged output.
    fn launch_step(&mut self, first: usize, count: usize) -> Result<(), ModelError> {
        let h = self.units;
        let rows_per_block = (BLOCK_THREADS / h).max(1);
        let cfg = LaunchConfig {
            grid_dim: (count.div_ceil(rows_per_block) as u32, 1, 1),
            block_dim: ((rows_per_block * h) as u32, 1, 1),
            // SHARED_PER_ROW in the kernel: features, old hidden units, the new state (up to 3H).
            shared_mem_bytes: (rows_per_block * (FEATURE_DIM + 4 * h) * 4) as u32,
        };
        let (w, st) = (&self.weights, &mut self.staging);
        let input = st.dev_in.slice(first * STRIDE..(first + count) * STRIDE);
        let mut output = st.dev_out.slice_mut(first..first + count);
        let (n32, h32, hm32, f32_) = (count as u32, h as u32, self.hm as u32, FEATURE_DIM as u32);
        let mut launch = self.stream.launch_builder(&self.step_fn);
        launch.arg(&n32).arg(&h32);
        // A convolution has no members' blocks to find; the recurrent cells do.
        if self.cell.is_recurrent() {
            launch.arg(&hm32);
        }
        launch.arg(&f32_).arg(&w.item_buckets).arg(&w.category_buckets).arg(&w.bias_in).arg(&w.dense_cols).arg(&w.item_rows).arg(&w.category_rows);
        if self.cell.is_recurrent() {
            launch.arg(&w.recurrent_cols);
        }
        // Only a GRU has a recurrent bias inside a gate.
        if self.cell == Cell::Gru {
            launch.arg(&w.bias_hn);
        }
        launch.arg(&w.head).arg(&w.head_bias).arg(&w.precision).arg(&input).arg(&mut self.states).arg(&mut output);
        // SAFETY: the arguments match the signature of the cell's kernel (`gru_step`, `lstm_step`
        // or `cnn_step`), and every slot was checked to be in range while its row was packed. (A
        // slot repeated in one step, against the contract, makes its rows race on values: no
        // access outside the slab.)
        unsafe { launch.launch(cfg) }.map_err(driver)?;
        Ok(())
    }

    /// Copies the first `n` staged logits back into `logits`, waiting for all queued work.
    fn download_logits(&mut self, n: usize, logits: &mut Vec<f32>) -> Result<(), ModelError> {
        let st = &mut self.staging;
        let host = st.host_out.as_mut_slice().map_err(driver)?;
        self.stream.memcpy_dtoh(&st.dev_out.slice(..n), &mut host[..n]).map_err(driver)?;
        // A copy into page-locked memory is asynchronous: wait for it before reading.
        self.stream.synchronize().map_err(driver)?;
        logits.clear();
        logits.extend_from_slice(&host[..n]);
        Ok(())
    }

    /// One step like [`ResidentStates::step`], in one launch with a wait after each phase,
    /// timed: what bounds the step (for the benchmark; slower than `step`).
    ///
    /// # Errors
    ///
    /// As [`ResidentStates::step`].
    pub fn profile_step(&mut self, rows: &[ResidentRow], logits: &mut Vec<f32>) -> Result<StepProfile, ModelError> {
        let n = rows.len();
        let mut profile = StepProfile::default();
        if n == 0 {
            logits.clear();
            return Ok(profile);
        }
        self.staging.reserve(&self.stream, n, self.h)?;
        let t = Instant::now();
        let words = self.staging.host_in.as_mut_slice().map_err(driver)?;
        if let Some(slot) = pack(rows, &mut words[..n * STRIDE], self.capacity) {
            return Err(out_of_range(slot, self.capacity));
        }
        profile.pack = t.elapsed();
        let t = Instant::now();
        let mut target = self.staging.dev_in.slice_mut(..n * STRIDE);
        self.stream.memcpy_htod(&words[..n * STRIDE], &mut target).map_err(driver)?;
        self.sync()?;
        profile.upload = t.elapsed();
        let t = Instant::now();
        self.launch_step(0, n)?;
        self.sync()?;
        profile.kernel = t.elapsed();
        let t = Instant::now();
        self.download_logits(n, logits)?;
        profile.download = t.elapsed();
        Ok(profile)
    }
}
