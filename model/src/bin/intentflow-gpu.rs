//! `intentflow-gpu`: the CPU/GPU equality check and the GPU model-stage benchmark, in one run on
//! a GPU machine (built with `scripts/build-cuda`, run by `scripts/gpu-check`).
//!
//! ```text
//! intentflow-gpu --model-dir DIR [--events EVENTS.jsonl] [--quick]
//! ```
//!
//! 1. **Equality.** The trained model at `DIR` is loaded on the CPU and on CUDA. Slabs of
//!    resident states on both ([`HostStates`], [`CudaStates`]) start from the same vectors and
//!    take the same waves (batches of 1 to 65,536 rows, resets, rows in shuffled slots); after
//!    every wave the logits and every stepped vector must be equal bit for bit. The stateless
//!    [`IntentModel::step`] on CUDA must equal the CPU's too, a row stepped alone must equal the
//!    same row in a launch of 65,536, and candle's CUDA step must agree within 1e-5.
//! 2. **Benchmark.** With 10 M resident users, one step of B users (features up, the fused
//!    kernel, logits down) for B from 256 to 4 M: median time and user-steps per second; loading
//!    and reading back vectors per user; candle's GPU step and the fused CPU kernel on all this
//!    machine's cores for comparison.
//!
//! Features come from `--events` (JSONL events, featurised in order per user) or, without it,
//! from a seeded generator of plausible values. Exits 1 if any equality fails.

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use intentflow_model::cuda::{CudaStates, StepProfile};
use intentflow_model::kernel::FusedStep;
use intentflow_model::{conv_bias_taps, Cell, Device, Features, GruParams, HostStates, IntentModel, ResidentRow, ResidentStates, StatePrecision, FEATURE_DIM};
use intentflow_schemas::{Event, SessionState};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// A small deterministic generator (SplitMix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut model_dir, mut events, mut quick) = (None, None, false);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--model-dir" => model_dir = args.next().map(PathBuf::from),
            "--events" => events = args.next().map(PathBuf::from),
            "--quick" => quick = true,
            other => bail!("unknown argument {other} (usage: intentflow-gpu --model-dir DIR [--events EVENTS.jsonl] [--quick])"),
        }
    }
    let model_dir = model_dir.context("--model-dir DIR is required")?;
    let cuda = Device::new_cuda(0).context("opening CUDA device 0")?;
    let cpu_model = IntentModel::load(&model_dir, &Device::Cpu)?;
    let gpu_model = IntentModel::load(&model_dir, &cuda)?;
    let h = cpu_model.state_dim();
    let members = cpu_model.meta().training.as_ref().map_or(1, |t| t.members);
    let kernel = Arc::new(FusedStep::new(cpu_model.params(), members)?);
    println!("model {} (H = {h}, {} blocks of {}), {} CPU threads", cpu_model.version(), kernel.blocks(), kernel.member_dim(), rayon::current_num_threads());
    let pool = feature_rows(&cpu_model, events.as_deref())?;
    println!("{} feature rows ({})", pool.len(), if events.is_some() { "featurised events" } else { "generated" });

    let failures = equality(&cpu_model, &gpu_model, &kernel, &cuda, &pool)?;
    benchmark(&cpu_model, &gpu_model, &kernel, &cuda, &pool, quick)?;
    if failures > 0 {
        bail!("{failures} equality checks failed");
    }
    println!("\nall equality checks passed");
    Ok(())
}

/// Feature rows: every event of the file featurised in order per user, or generated rows.
fn feature_rows(model: &IntentModel, events: Option<&std::path::Path>) -> Result<Vec<(Features, bool)>> {
    if let Some(path) = events {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut sessions: HashMap<intentflow_schemas::Text, SessionState> = HashMap::new();
        let mut rows = Vec::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let ev: Event = serde_json::from_str(line).with_context(|| format!("{}: bad event", path.display()))?;
            let prepared = model.features().featurize(sessions.entry(ev.user_id.clone()).or_default(), &ev);
            rows.push((prepared.features, prepared.reset_hidden));
        }
        if rows.is_empty() {
            bail!("{} holds no events", path.display());
        }
        return Ok(rows);
    }
    let spec = model.features();
    let mut rng = Rng(7);
    Ok((0..1 << 16)
        .map(|_| {
            let mut dense = [0f32; FEATURE_DIM];
            for d in &mut dense {
                *d = 4.0 * rng.unit() - 2.0;
            }
            let item = rng.below(u64::from(spec.item_buckets.max(1))) as u32;
            let category = rng.below(u64::from(spec.category_buckets.max(1))) as u32;
            (Features { item, category, ..Features::dense(dense) }, rng.below(10) == 0)
        })
        .collect())
}

/// The served model's kernel and the other shapes the kernel must handle, named.
fn variants(model: &IntentModel, served: &Arc<FusedStep>) -> Result<Vec<(String, Arc<FusedStep>)>> {
    let p = model.params();
    let bare = GruParams { item_embedding: None, category_embedding: None, weight_ih: p.weight_ih.narrow(1, 0, FEATURE_DIM)?, ..p.clone() };
    let wide = GruParams::pack(&vec![p.clone(); 8])?;
    let members = model.meta().training.as_ref().map_or(1, |t| t.members);
    // The other cells, their weights made from the served ones (the kernel is checked, not the
    // weights): as many gate blocks as each needs, cycling through the served model's; for a
    // served convolution, block-diagonal recurrent weights from each member's first inputs.
    let (h, hm) = (p.hidden_dim(), p.hidden_dim() / members.max(1));
    let blocks = |t: &Tensor, n: usize| -> candle_core::Result<Tensor> {
        let have = t.dim(0)? / h;
        Tensor::cat(&(0..n).map(|i| t.narrow(0, (i % have) * h, h)).collect::<candle_core::Result<Vec<_>>>()?, 0)
    };
    let (w_hh, b_hh) = match (&p.weight_hh, &p.bias_hh) {
        (Some(w), Some(b)) => (w.clone(), b.clone()),
        _ => {
            let w_ih: Vec<Vec<f32>> = p.weight_ih.narrow(0, 0, h)?.to_vec2()?;
            let w: Vec<f32> = (0..h).flat_map(|r| (0..h).map(move |c| (r, c))).map(|(r, c)| if r / hm == c / hm { w_ih[r][c % hm] } else { 0.0 }).collect();
            (Tensor::from_vec(w, (h, h), &candle_core::Device::Cpu)?, p.bias_ih.narrow(0, 0, h)?)
        }
    };
    let mut out = vec![
        (format!("served {} model (H = {}, {} blocks)", served.cell(), served.hidden_dim(), served.blocks()), served.clone()),
        (format!("one full matrix (H = {})", p.hidden_dim()), Arc::new(FusedStep::new(p, 1)?)),
        ("no embedding tables".into(), Arc::new(FusedStep::new(&bare, members)?)),
        ("H = 320, 8 blocks of 40".into(), Arc::new(FusedStep::new(&wide, 8)?)),
    ];
    for cell in Cell::ALL.into_iter().filter(|&c| c != p.cell()) {
        let g = cell.gates();
        let bias = blocks(&p.bias_ih, g)?;
        let other = GruParams {
            weight_ih: blocks(&p.weight_ih, g)?,
            weight_hh: cell.is_recurrent().then(|| blocks(&w_hh, g)).transpose()?,
            bias_ih: if cell.is_recurrent() { bias } else { conv_bias_taps(&bias.narrow(0, 0, h)?)? },
            bias_hh: cell.is_recurrent().then(|| blocks(&b_hh, g)).transpose()?,
            ..p.clone()
        };
        let kernel = Arc::new(FusedStep::new(&other, members)?);
        out.push((format!("the {cell} cell (H = {h}, {} blocks)", kernel.blocks()), kernel));
        out.push((format!("the {cell} cell, f16 states"), Arc::new(FusedStep::new(&other, members)?.with_state_precision(StatePrecision::F16))));
        out.push((format!("the {cell} cell, int8 states"), Arc::new(FusedStep::new(&other, members)?.with_state_precision(StatePrecision::Int8))));
    }
    // States rounded in the step (`--state-precision f16|int8`): the served cell in each
    // precision it is not served in.
    for precision in [StatePrecision::F16, StatePrecision::Int8].into_iter().filter(|q| *q != served.state_precision()) {
        out.push((format!("served {} model, {precision:?} states", served.cell()), Arc::new(FusedStep::new(p, members)?.with_state_precision(precision))));
    }
    Ok(out)
}

/// `n` rows in distinct random slots of `capacity`, features from `pool`.
fn rows(rng: &mut Rng, pool: &[(Features, bool)], n: usize, capacity: usize) -> Vec<ResidentRow> {
    let mut slots: Vec<u32> = (0..capacity as u32).collect();
    for i in 0..n {
        let j = i + rng.below((capacity - i) as u64) as usize;
        slots.swap(i, j);
    }
    slots[..n]
        .iter()
        .map(|&slot| {
            let (features, reset) = pool[rng.below(pool.len() as u64) as usize];
            ResidentRow { slot, reset, features }
        })
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Runs the equality checks; returns how many failed.
fn equality(cpu_model: &IntentModel, gpu_model: &IntentModel, kernel: &Arc<FusedStep>, cuda: &Device, pool: &[(Features, bool)]) -> Result<usize> {
    println!("\n## CPU/GPU equality\n");
    let h = cpu_model.state_dim();
    let capacity = 200_000;
    let mut rng = Rng(11);
    let mut failures = 0;
    let mut check = |what: String, ok: bool, detail: String| {
        println!("{} {what}: {detail}", if ok { "ok  " } else { "FAIL" });
        if !ok {
            failures += 1;
        }
    };
    // The served model's kernel, then the other shapes the kernel takes: one full recurrent
    // matrix, no embedding tables, and a hidden vector of 320 (over 256: one row per block).
    // Every tenth row's buckets are out of range (both kernels clamp them).
    let wild: Vec<(Features, bool)> = pool
        .iter()
        .enumerate()
        .map(|(i, &(f, reset))| if i % 10 == 3 { (Features { item: f.item + 10_000, category: f.category + 10_000, ..f }, reset) } else { (f, reset) })
        .collect();
    for (name, variant) in variants(cpu_model, kernel)? {
        let vh_ = variant.state_dim();
        let cap = if vh_ > 100 { 70_000 } else { capacity };
        let mut host = HostStates::new(variant.clone(), cap);
        let mut gpu = CudaStates::new(&variant, cuda, cap)?;
        // Same starting vectors in every slot (plausible magnitudes, some exact zeros).
        let all: Vec<u32> = (0..cap as u32).collect();
        let start: Vec<f32> = (0..cap * vh_).map(|i| if i % 7 == 0 { 0.0 } else { 1.8 * rng.unit() - 0.9 }).collect();
        host.load(&all, &start)?;
        gpu.load(&all, &start)?;
        let (mut lh, mut lg, mut vh, mut vg) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for batch in [1usize, 7, 256, 4096, 65_536] {
            let (mut worst, mut mismatched) = (0f32, 0usize);
            for _ in 0..5 {
                let wave = rows(&mut rng, &wild, batch, cap);
                host.step(&wave, &mut lh)?;
                gpu.step(&wave, &mut lg)?;
                let slots: Vec<u32> = wave.iter().map(|r| r.slot).collect();
                host.read(&slots, &mut vh)?;
                gpu.read(&slots, &mut vg)?;
                worst = worst.max(max_diff(&lh, &lg)).max(max_diff(&vh, &vg));
                mismatched += bits(&lh).iter().zip(bits(&lg)).filter(|(a, b)| *a != b).count();
                mismatched += bits(&vh).iter().zip(bits(&vg)).filter(|(a, b)| *a != b).count();
            }
            check(format!("{name}: resident step, batch {batch}, 5 waves"), mismatched == 0, format!("{mismatched} values differ in their bits, largest difference {worst:e}"));
        }
        // Every slot, stepped or not, still agrees.
        host.read(&all, &mut vh)?;
        gpu.read(&all, &mut vg)?;
        check(format!("{name}: all {cap} slots after the waves"), bits(&vh) == bits(&vg), format!("largest difference {:e}", max_diff(&vh, &vg)));
    }

    let mut gpu = CudaStates::new(kernel, cuda, capacity)?;
    let start: Vec<f32> = (0..capacity * h).map(|_| 1.8 * rng.unit() - 0.9).collect();
    gpu.load(&(0..capacity as u32).collect::<Vec<_>>(), &start)?;
    let (mut lg, mut vg) = (Vec::new(), Vec::new());
    // Batch invariance on the GPU: a row alone, in a launch of 65,536, and in chunks of 1,000.
    let wave = rows(&mut rng, pool, 65_536, capacity);
    let slots: Vec<u32> = wave.iter().map(|r| r.slot).collect();
    let before = {
        gpu.read(&slots, &mut vg)?;
        vg.clone()
    };
    gpu.step(&wave, &mut lg)?;
    let whole = (lg.clone(), {
        gpu.read(&slots, &mut vg)?;
        vg.clone()
    });
    gpu.load(&slots, &before)?;
    let (mut chunked_logits, mut piece) = (Vec::new(), Vec::new());
    for chunk in wave.chunks(1_000) {
        gpu.step(chunk, &mut piece)?;
        chunked_logits.extend_from_slice(&piece);
    }
    gpu.read(&slots, &mut vg)?;
    check("a launch of 65,536 rows against launches of 1,000".into(), bits(&whole.0) == bits(&chunked_logits) && bits(&whole.1) == bits(&vg), "bit for bit".into());
    gpu.load(&slots, &before)?;
    let mut alone_ok = true;
    for (i, row) in wave.iter().enumerate().step_by(4_099) {
        gpu.step(std::slice::from_ref(row), &mut piece)?;
        alone_ok &= piece[0].to_bits() == whole.0[i].to_bits();
    }
    check("rows stepped alone against the same rows in a launch of 65,536".into(), alone_ok, "bit for bit".into());

    // The stateless step on both devices, and candle's CUDA step as the reference.
    let inputs: Vec<Features> = wave[..4096].iter().map(|r| r.features).collect();
    let hidden = before[..4096 * h].to_vec();
    let on_cpu = cpu_model.step(&inputs, &hidden)?;
    let on_gpu = gpu_model.step(&inputs, &hidden)?;
    check("IntentModel::step, CPU against CUDA, batch 4,096".into(), bits(&on_cpu.hidden) == bits(&on_gpu.hidden) && bits(&on_cpu.scores) == bits(&on_gpu.scores), format!("largest difference {:e}", max_diff(&on_cpu.hidden, &on_gpu.hidden)));
    // In f32: with rounded states, candle's unrounded value may fall a rounding step away.
    let whole = gpu_model.with_state_precision(StatePrecision::F32)?;
    let (candle, fused) = (whole.with_candle_step().step(&inputs, &hidden)?, whole.step(&inputs, &hidden)?);
    let worst = max_diff(&candle.hidden, &fused.hidden).max(max_diff(&candle.scores, &fused.scores));
    check("candle's CUDA step against the fused kernel, f32 states, batch 4,096".into(), worst <= 1e-5, format!("largest difference {worst:e} (bound 1e-5)"));
    Ok(failures)
}

/// Median of `reps` timings of `f`, in seconds, after `warm` untimed runs.
fn median(warm: usize, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..warm {
        f()?;
    }
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

fn benchmark(cpu_model: &IntentModel, gpu_model: &IntentModel, kernel: &Arc<FusedStep>, cuda: &Device, pool: &[(Features, bool)], quick: bool) -> Result<()> {
    let h = cpu_model.state_dim();
    let capacity = if quick { 1_000_000 } else { 10_000_000 };
    println!("\n## GPU model stage, {capacity} resident users (H = {h}: {} MB of states)\n", capacity * h * 4 / 1_000_000);
    let mut gpu = CudaStates::new(kernel, cuda, capacity)?;
    let mut rng = Rng(3);
    println!("Step: records packed (in chunks of 65,536 rows, overlapping the device's work), copied up, stepped, logits copied down. Phases: the same step with a wait after each phase, medians.\n");
    println!("| batch | step ms (median) | user-steps/s | ns per user-step | pack ms | upload ms | kernel ms | download ms | kernel user-steps/s |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut logits = Vec::new();
    let sizes: &[usize] = if quick { &[256, 4096, 65_536, 1 << 20] } else { &[256, 1024, 4096, 16_384, 65_536, 262_144, 1 << 20, 1 << 22] };
    for &batch in sizes {
        // Distinct slots spread over the slab: every row a different user, as in one wave.
        let stride = (capacity / batch).max(1);
        let offset = rng.below(stride as u64) as usize;
        let wave: Vec<ResidentRow> = (0..batch).map(|i| ResidentRow { slot: ((i * stride + offset) % capacity) as u32, reset: pool[i % pool.len()].1, features: pool[i % pool.len()].0 }).collect();
        let reps = if batch >= 1 << 20 { 11 } else { 51 };
        let t = median(3, reps, || Ok(gpu.step(&wave, &mut logits)?))?;
        let mut phases: Vec<StepProfile> = Vec::new();
        for _ in 0..7 {
            phases.push(gpu.profile_step(&wave, &mut logits)?);
        }
        let phase = |f: fn(&StepProfile) -> std::time::Duration| {
            let mut v: Vec<f64> = phases.iter().map(|p| f(p).as_secs_f64()).collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (pack, up, kernel_s, down) = (phase(|p| p.pack), phase(|p| p.upload), phase(|p| p.kernel), phase(|p| p.download));
        println!(
            "| {batch} | {:.3} | {:.1} M | {:.2} | {:.3} | {:.3} | {:.3} | {:.3} | {:.0} M |",
            t * 1e3,
            batch as f64 / t / 1e6,
            t * 1e9 / batch as f64,
            pack * 1e3,
            up * 1e3,
            kernel_s * 1e3,
            down * 1e3,
            batch as f64 / kernel_s / 1e6
        );
    }
    let n = (1usize << 20).min(capacity);
    let slots: Vec<u32> = (0..n as u32).map(|i| (i as usize * 7 % capacity) as u32).collect();
    let vectors = vec![0.25f32; n * h];
    let mut back = Vec::new();
    let load = median(1, 5, || Ok(gpu.load(&slots, &vectors)?))?;
    let read = median(1, 5, || Ok(gpu.read(&slots, &mut back)?))?;
    println!("\nloading {n} users' vectors: {:.2} ms ({:.1} M users/s); reading them back: {:.2} ms ({:.1} M users/s)", load * 1e3, n as f64 / load / 1e6, read * 1e3, n as f64 / read / 1e6);

    println!("\n## For comparison\n");
    println!("| step | batch | ms (median) | user-steps/s |");
    println!("|---|---:|---:|---:|");
    let candle = gpu_model.with_candle_step();
    let stateless = gpu_model.clone();
    for batch in [4096usize, 65_536] {
        let inputs: Vec<Features> = (0..batch).map(|i| pool[i % pool.len()].0).collect();
        let hidden = vec![0.1f32; batch * h];
        let t = median(3, 21, || Ok(candle.step(&inputs, &hidden).map(|_| ())?))?;
        println!("| candle on the GPU (before) | {batch} | {:.3} | {:.2} M |", t * 1e3, batch as f64 / t / 1e6);
        let t = median(3, 21, || Ok(stateless.step(&inputs, &hidden).map(|_| ())?))?;
        println!("| fused GPU kernel, states up and down | {batch} | {:.3} | {:.2} M |", t * 1e3, batch as f64 / t / 1e6);
        let t = median(3, 21, || Ok(cpu_model.step(&inputs, &hidden).map(|_| ())?))?;
        println!("| fused CPU kernel, {} threads | {batch} | {:.3} | {:.2} M |", rayon::current_num_threads(), t * 1e3, batch as f64 / t / 1e6);
    }
    Ok(())
}
