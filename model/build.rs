//! With the `cuda` feature, compiles the GPU serving step (`src/gru_step.cu`) to PTX with
//! `nvcc`; without it, does nothing.
//!
//! The PTX is built without multiply-add contraction, with IEEE division and without
//! flush-to-zero, so the GPU step gives the CPU kernel's bits. `nvcc` is taken from `NVCC`,
//! `$CUDA_ROOT/bin`, or `PATH`; the virtual architecture from `CUDA_COMPUTE_CAP` (default 75,
//! the oldest CUDA 13 supports; the driver compiles it for newer GPUs at load).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=src/gru_step.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_ROOT");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let nvcc = std::env::var_os("NVCC").map(PathBuf::from).unwrap_or_else(|| match std::env::var_os("CUDA_ROOT") {
        Some(root) => PathBuf::from(root).join("bin").join("nvcc"),
        None => PathBuf::from("nvcc"),
    });
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "75".into());
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR")).join("gru_step.ptx");
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "--fmad=false", "-prec-div=true", "-prec-sqrt=true", "-ftz=false"])
        .arg(format!("-arch=compute_{cap}"))
        .arg("-o")
        .arg(&out)
        .arg("src/gru_step.cu")
        .status()
        .unwrap_or_else(|e| panic!("running {} (set NVCC or CUDA_ROOT, or use scripts/build-cuda): {e}", nvcc.display()));
    assert!(status.success(), "{} failed to compile src/gru_step.cu", nvcc.display());
}
