//! Records the commit the binary is built from (`INTENTFLOW_GIT_SHA`, "unknown" outside a git
//! checkout, as in a container build without `.git`), for `--version` and the
//! `intentflow_build_info` metric.

use std::path::Path;
use std::process::Command;

fn main() {
    let sha = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=INTENTFLOW_GIT_SHA={sha}");
    // A new commit moves a branch ref (or HEAD itself, detached).
    for path in ["../.git/HEAD", "../.git/refs/heads", "../.git/packed-refs"] {
        if Path::new(path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
}
