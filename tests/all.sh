#!/usr/bin/env bash
# Every test of the project, on three GPU adapters: native Vulkan (a real GPU, or Mesa's lavapipe),
# native GL (llvmpipe through EGL), and WebGPU in headless Chromium (the library's GPU tests, then
# the demo page itself), then every fuzz target briefly. Needs what .ci/run installs.
set -euo pipefail
cd "$(dirname "$0")/.."

# Mesa complains without a private runtime dir; harmless, but noisy.
if [ -z "${XDG_RUNTIME_DIR:-}" ]; then
  XDG_RUNTIME_DIR=$(mktemp -d)
  export XDG_RUNTIME_DIR
fi
chmod 700 "$XDG_RUNTIME_DIR"

# Each stage's wall time, printed at the end (also when a stage fails), so that a change sees
# what it cost: CI stops at 90 minutes, and a fresh 2-core machine must finish in 45.
stage_names=()
stage_seconds=()
current_stage=""
stage_started=0
stage() {
  if [ -n "$current_stage" ]; then
    stage_names+=("$current_stage")
    stage_seconds+=($((SECONDS - stage_started)))
  fi
  current_stage=$1
  stage_started=$SECONDS
  if [ -n "$1" ]; then echo "== $1"; fi
}
report_stages() {
  stage ""
  echo "== stage times"
  for i in "${!stage_names[@]}"; do
    printf '%6d s  %s\n' "${stage_seconds[$i]}" "${stage_names[$i]}"
  done
  printf '%6d s  in all\n' "$SECONDS"
}

# The fuzz targets' build shares nothing with the other stages (the nightly toolchain, its own
# target folder): it starts now at the lowest priority and takes only the time the other stages
# leave idle; the fuzzing stage waits for it.
fuzz_build_log=$(mktemp)
nice -n 19 cargo +nightly fuzz build --sanitizer none >"$fuzz_build_log" 2>&1 &
fuzz_build=$!
finish() {
  kill "$fuzz_build" 2>/dev/null || true
  report_stages
}
trap finish EXIT

stage "unit, doc and integration tests, native Vulkan adapter"
# Benchmarks are built, not run: they measure, they do not test.
cargo build --benches
WGPU_BACKEND=vulkan cargo test --lib --bins --tests
WGPU_BACKEND=vulkan cargo test --doc

stage "GPU tests again on a second adapter: OpenGL (llvmpipe over EGL)"
WGPU_BACKEND=gl cargo test --test gpu_vs_cpu --test bitlinear_gpu --test train_gpu --test faults

stage "GPU training, faults and BitLinear on a third native adapter: SwiftShader's Vulkan"
# Chromium's own copy of SwiftShader (Debian packages no other); the full gpu_vs_cpu suite passes
# there too but takes 4-8 minutes on two cores, so it is left to a longer run (README).
VK_ICD_FILENAMES=/usr/lib/chromium/vk_swiftshader_icd.json WGPU_BACKEND=vulkan \
  cargo test --test bitlinear_gpu --test train_gpu --test faults

stage "GPU tests in headless Chromium on WebGPU"
browser_tests() {
  CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner \
    CHROMEDRIVER=/usr/bin/chromedriver WASM_BINDGEN_TEST_TIMEOUT=900 \
    cargo test --target wasm32-unknown-unknown --test web
}
# A browser whose page stops answering ChromeDriver (webdriver.json's pageLoad timeout) ends the
# run with no test result; that, and only that, is tried once more. A failing test is not.
browser_log=$(mktemp)
if ! browser_tests 2>&1 | tee "$browser_log"; then
  if grep -q "Timed out receiving message from renderer" "$browser_log" &&
    ! grep -q "^test result: " "$browser_log"; then
    echo "== the browser stopped answering before the tests ended: once more, in a new browser"
    browser_tests
  else
    exit 1
  fi
fi

stage "the demo page in headless Chromium (Playwright), against the native program"
web/build.sh --dev
cargo build --bin bitnet
BITNET_BIN="${CARGO_TARGET_DIR:-target}/debug/bitnet" node web/tests/page.test.mjs

stage "fuzzing: the targets' build (the library without its GPU engines), begun at the start"
# No sanitizer: the readers the targets fuzz are safe Rust, so a crash is a panic, an abort or a
# runaway allocation, which libFuzzer catches without AddressSanitizer's slower build and runs.
if ! wait "$fuzz_build"; then
  cat "$fuzz_build_log"
  exit 1
fi
tail -n 1 "$fuzz_build_log"

stage "fuzzing: every target for 30 s, two at a time, from the seeds in fuzz/seeds (README.md, Fuzzing)"
# Each target runs on one core: two at once keep both busy. A target's log is printed when it
# fails, else its last lines.
fuzz_target() {
  local log
  log=$(mktemp)
  mkdir -p "fuzz/corpus/$1"
  if cargo +nightly fuzz run --sanitizer none "$1" "fuzz/corpus/$1" "fuzz/seeds/$1" \
    -- -max_total_time=30 >"$log" 2>&1; then
    echo "fuzz target $1: $(grep -E '^Done [0-9]+ runs' "$log" || tail -n 1 "$log")"
  else
    cat "$log"
    echo "fuzz target $1 FAILED"
    return 1
  fi
}
export -f fuzz_target
cargo +nightly fuzz list | xargs -P 2 -I '{}' bash -c 'fuzz_target "$1"' _ '{}'

stage ""
echo "== all tests passed"
