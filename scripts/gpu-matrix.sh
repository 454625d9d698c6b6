#!/usr/bin/env bash
# The GPU test suite (every shader against its CPU twin, the GPU training step, faults, BitLinear)
# on one adapter, as a table: a machine with a real GPU (the NVIDIA lab machine) checks that it
# gives what lavapipe, llvmpipe and WebGPU give in tests/all.sh.
#
#   scripts/gpu-matrix.sh build   here: builds the test programs (release) into gpu-matrix/ and,
#                                 where the GPU machine lacks a Vulkan loader, fetches one into .gl/
#                                 (../shared/device/prepare-gl.sh)
#   scripts/gpu-matrix.sh run     on the GPU machine (or here): runs them on the adapter wgpu picks
#                                 (WGPU_BACKEND chooses the API) and prints one row per program
#
# gpu-matrix/ and .gl/ are ignored by git: hand them to the GPU machine with the working tree. The
# `run` step unpacks .gl/ when it is there and points the loader at NVIDIA's driver when that is
# installed. It needs no cargo and no network.
set -euo pipefail
cd "$(dirname "$0")/.."

programs=(gpu_vs_cpu train_gpu faults bitlinear_gpu)

case "${1:-}" in
build)
  mkdir -p gpu-matrix
  cargo test --release --no-run "${programs[@]/#/--test=}" --message-format=json |
    python3 -c '
import json, sys, shutil
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        shutil.copy(m["executable"], "gpu-matrix/" + m["target"]["name"])
'
  strip gpu-matrix/*
  if [ -x ../shared/device/prepare-gl.sh ] && [ ! -d .gl ]; then ../shared/device/prepare-gl.sh; fi
  du -ch gpu-matrix/* | tail -1
  ;;
run)
  source scripts/nvidia-vulkan.sh
  printf '| program | passed | failed | seconds | adapter |\n| --- | --- | --- | --- | --- |\n'
  status=0
  for p in "${programs[@]}"; do
    log=$(mktemp)
    start=$(date +%s)
    # --nocapture lets each program's adapter line through.
    if ! "gpu-matrix/$p" --nocapture >"$log" 2>&1; then status=1; fi
    summary=$(grep -E '^test result:' "$log" | tail -1)
    passed=$(sed -nE 's/.* ([0-9]+) passed.*/\1/p' <<<"$summary")
    failed=$(sed -nE 's/.* ([0-9]+) failed.*/\1/p' <<<"$summary")
    adapter=$(grep -m1 -oE 'adapter: .*' "$log" | cut -c10- || true)
    printf '| %s | %s | %s | %s | %s |\n' "$p" "${passed:-?}" "${failed:-?}" \
      "$(($(date +%s) - start))" "${adapter:-?}"
    if [ "${failed:-1}" != 0 ]; then grep -E 'panicked|FAILED' "$log" | head -20; fi
    rm -f "$log"
  done
  exit $status
  ;;
*)
  sed -n '2,14p' "$0"
  exit 2
  ;;
esac
