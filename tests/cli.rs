//! The `bitnet` program, run as a user would.
#![cfg(not(target_arch = "wasm32"))]

use std::process::Command;

/// Runs `bitnet info` with small sizes and returns its stdout, asserting success.
fn run_info(extra: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .args(["info", "--in", "100", "--out", "33", "--tokens", "3"])
        .args(extra)
        .output()
        .expect("the bitnet binary runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "bitnet info failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    stdout
}

/// Works with or without a GPU: the CPU forward always runs; a GPU, when found, must agree.
/// With `WGPU_BACKEND` set, the caller asked for a GPU, so its absence is a failure too.
#[test]
fn info_runs_the_cpu_and_any_gpu() {
    for extra in [&[][..], &["--per-channel", "--seed", "7"]] {
        let stdout = run_info(extra);
        assert!(stdout.contains("CPU forward: ok"), "{stdout}");
        assert!(stdout.contains("memory:"), "{stdout}");
        let gpu_found = !stdout.contains("no GPU adapter was found");
        if gpu_found || std::env::var_os("WGPU_BACKEND").is_some() {
            assert!(stdout.contains("GPU and CPU agree"), "{stdout}");
        }
    }
}

#[test]
fn bad_arguments_fail() {
    let status = Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .args(["info", "--in", "not-a-number"])
        .output()
        .expect("the bitnet binary runs")
        .status;
    assert!(!status.success());
}
