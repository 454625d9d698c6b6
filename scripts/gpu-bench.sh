#!/usr/bin/env bash
# This project and 0xBitNet (a wgpu BitNet runtime, ../shared/peers/oxb) side by side on one GPU,
# in one run: whole-model decoding and prompts at the shapes of bitnet-b1.58-2B-4T, the ternary
# kernels against an f32 matmul and the adapter's streaming-read rate, and 0xBitNet's BitLinear
# at the same shapes. Prints one table against the speed targets; the raw outputs stay in
# gpu-bench/out/.
#
#   scripts/gpu-bench.sh build   here: builds bitnet and the kernels bench (release), and
#                                0xBitNet's two programs where its crates can be fetched, into
#                                gpu-bench/; fetches a Vulkan loader into .gl/ for a GPU machine
#                                without one (../shared/device/prepare-gl.sh)
#   scripts/gpu-bench.sh run     on the GPU machine (or here): makes the synthetic 2B4T GGUF both
#                                engines read, runs everything, prints the table
#
# gpu-bench/ and .gl/ are ignored by git: hand them to the GPU machine with the working tree.
# `run` needs no cargo and no network: python3 (standard library only) writes the checkpoint and
# prints the table. Environment for `run`: LAYERS (default 30), PROMPT_TOKENS (512),
# DECODE_TOKENS (128), WORK (where the GGUF is made and kept, default /tmp/gpu-bench), QUICK=1
# (BENCH_QUICK for the kernels bench, and 0xBitNet's BitLinear 2 calls per submit: a smoke test
# on a software adapter such as lavapipe, in minutes).
set -euo pipefail
cd "$(dirname "$0")/.."

out=gpu-bench/out

# Copies the executables of cargo's JSON messages on stdin whose target is named $1 to $2.
copy_executable() {
  python3 -c '
import json, shutil, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == sys.argv[1]:
        shutil.copy(m["executable"], sys.argv[2])
' "$1" "$2"
}

case "${1:-}" in
build)
  mkdir -p gpu-bench
  cargo build --release --bin bitnet --message-format=json | copy_executable bitnet gpu-bench/bitnet
  cargo bench --bench kernels --no-run --message-format=json |
    copy_executable kernels gpu-bench/kernels
  # 0xBitNet has its own workspace and crates (wgpu 26); its build output stays out of
  # gpu-bench/, which travels to the GPU machine.
  rm -rf gpu-bench/oxb-src gpu-bench/oxb gpu-bench/bitlinear_bench
  oxb_target=${CARGO_TARGET_DIR:-$PWD/target}/oxb
  if [ ! -d ../shared/peers/oxb ]; then
    echo "0xBitNet NOT BUILT: ../shared/peers/oxb is missing; run will measure this project alone" >&2
  elif cp -r ../shared/peers/oxb gpu-bench/oxb-src && chmod -R u+w gpu-bench/oxb-src &&
    (cd gpu-bench/oxb-src && cargo build --release --target-dir "$oxb_target"); then
    cp "$oxb_target"/release/{oxb,bitlinear_bench} gpu-bench/
  else
    echo "0xBitNet NOT BUILT (cargo build failed above; its crates come from crates.io):" \
      "run will measure this project alone" >&2
  fi
  strip gpu-bench/bitnet gpu-bench/kernels gpu-bench/oxb gpu-bench/bitlinear_bench 2>/dev/null || true
  if [ -x ../shared/device/prepare-gl.sh ] && [ ! -d .gl ]; then ../shared/device/prepare-gl.sh; fi
  # The GPU machine takes at most 64 MiB of ignored files with the tree.
  du -ch gpu-bench .gl 2>/dev/null | tail -1
  ;;
run)
  source scripts/nvidia-vulkan.sh
  layers=${LAYERS:-30}
  prompt_tokens=${PROMPT_TOKENS:-512}
  decode_tokens=${DECODE_TOKENS:-128}
  quick=${QUICK:-0}
  work=${WORK:-/tmp/gpu-bench}
  mkdir -p "$out"
  bitnet=gpu-bench/bitnet

  # Outside gpu-bench/, which must stay small enough to carry. 0xBitNet's 32 tokens at 2B4T
  # shapes take ten minutes on lavapipe: a quick run has it decode the demo model instead.
  mkdir -p "$work"
  if [ "$quick" = 1 ]; then
    model=$work/demo.gguf
    [ -f "$model" ] || "$bitnet" convert --format gguf --any-row-length --input models/demo --output "$model" >&2
  else
    model=$work/2b4t-$layers.gguf
    if [ ! -f "$model" ]; then
      rm -rf "$work/checkpoint"
      python3 scripts/synthetic-checkpoint.py "$work/checkpoint" --layers "$layers" >&2
      "$bitnet" convert --format gguf --input "$work/checkpoint" --output "$model" >&2
      rm -r "$work/checkpoint"
    fi
  fi

  bench=("$bitnet" bench --synthetic 2b4t --layers "$layers" --prompt-tokens "$prompt_tokens"
    --decode-tokens "$decode_tokens")
  echo "bitnet bench, fused and separate decode paths" >&2
  "${bench[@]}" --decode-path fused --json >"$out/bench-fused.json"
  "${bench[@]}" --decode-path separate --json >"$out/bench-separate.json"
  echo "bitnet bench with BITNET_PROFILE=1" >&2
  BITNET_PROFILE=1 "${bench[@]}" --decode-path fused >"$out/profile.txt" 2>"$out/profile.stderr"
  echo "kernels bench" >&2
  if [ "$quick" = 1 ]; then export BENCH_QUICK=1; fi
  gpu-bench/kernels >"$out/kernels.md"

  : >"$out/oxb.txt"
  : >"$out/bitlinear.txt"
  if [ -x gpu-bench/oxb ]; then
    echo "0xBitNet: whole model, then BitLinear" >&2
    GREEDY=1 gpu-bench/oxb "$model" >"$out/oxb.txt" 2>&1 || echo "oxb failed" >>"$out/oxb.txt"
    # bitlinear_bench M K N ITERS: an M x K weight matrix (out x in), N tokens, ITERS submits.
    shapes=("2560 2560 1" "640 2560 1" "6912 2560 1" "2560 6912 1" "6912 2560 512")
    per_submit=200
    if [ "$quick" = 1 ]; then
      # Its 512-token GEMM outlasts wgpu's wait for a submission on lavapipe.
      shapes=("${shapes[@]:0:4}")
      per_submit=2
    fi
    for shape in "${shapes[@]}"; do
      read -r m k n <<<"$shape"
      iters=5
      if [ "$quick" = 1 ] || [ "$n" -gt 1 ]; then iters=1; fi
      PER_SUBMIT=$per_submit gpu-bench/bitlinear_bench "$m" "$k" "$n" "$iters" 2>&1 |
        grep 'ms/call' >>"$out/bitlinear.txt" || echo "bitlinear_bench $shape failed" >>"$out/bitlinear.txt"
    done
  else
    echo "0xBitNet not built (scripts/gpu-bench.sh build says why)" | tee "$out/oxb.txt" >&2
  fi

  python3 - "$out" "$layers" "$prompt_tokens" "$quick" "$(basename "$model")" <<'EOF'
import json, re, sys

out, layers, prompt_tokens, quick, model = sys.argv[1:]
layers, prompt_tokens = int(layers), int(prompt_tokens)
fused = json.load(open(f"{out}/bench-fused.json"))
separate = json.load(open(f"{out}/bench-separate.json"))
kernels = open(f"{out}/kernels.md").read()
oxb = open(f"{out}/oxb.txt").read()
bitlinear = open(f"{out}/bitlinear.txt").read()


def cells(label):
    """The cells of the kernels bench's table row that starts with `label`."""
    for line in kernels.splitlines():
        if line.startswith("| " + label):
            return [c.strip() for c in line.strip().strip("|").split("|")]
    return None


def number(cell):
    return float(re.match(r"[-0-9.]+", cell).group()) if cell else None


def oxb_ms(m, k, n):
    found = re.search(rf"M={m} K={k} N={n} per_submit=\d+: ([0-9.]+) ms/call", bitlinear)
    return float(found.group(1)) if found else None


def missing(m=None, k=None, n=None):
    """The 0xBitNet cell of a figure it did not give (whole model, or a BitLinear shape)."""
    if m is None:
        failed = oxb.strip() and "not built" not in oxb
        return f"failed ({out}/oxb.txt)" if failed else ""
    failed = f"bitlinear_bench {m} {k} {n} failed" in bitlinear
    return f"failed ({out}/bitlinear.txt)" if failed else ""


rows = []


# A run smaller than the full one is a smoke test: its figures meet or miss nothing.
smoke = layers != 30 or quick == "1"


def row(figure, ours, peer="", ratio="", target="", met=None):
    met = "" if met is None or smoke else "yes" if met else "no"
    rows.append((figure, ours, peer, ratio, target, met))


greedy = fused["decode_tokens_per_s"]
found = re.search(r"(\d+) tokens in ([0-9.]+)s = ([0-9.]+) tok/s", oxb)
oxb_rate = float(found.group(3)) if found else None
row(f"greedy decode, {prompt_tokens}-token context, tokens/s (fused)", f"{greedy:.1f}",
    f"{oxb_rate:.2f} (greedy, 32 tokens, {model})" if oxb_rate else missing(),
    f"{greedy / oxb_rate:.1f}x" if oxb_rate and quick != "1" else "", ">= 1000", greedy >= 1000)
row("greedy decode, tokens/s (separate)", f"{separate['decode_tokens_per_s']:.1f}")
sampled = fused.get("decode_sampled_tokens_per_s")
if sampled is not None:
    row("sampled decode (temperature 0.8, top-p 0.95), tokens/s", f"{sampled:.1f}", "", "",
        "within 10% of greedy", sampled >= 0.9 * greedy)
else:
    row("sampled decode (temperature 0.8, top-p 0.95), tokens/s", "not in this build's JSON", "", "",
        "within 10% of greedy")
row("decode with the logits read back, tokens/s", f"{fused['decode_logits_tokens_per_s']:.1f}")
prompt = fused["prompt_tokens_per_s"]
row(f"{prompt_tokens}-token prompt, tokens/s", f"{prompt:.1f}", "", "", ">= 20000", prompt >= 20000)

gemv = [("2560x2560", "q/o proj", 2560, 2560, 4.4), ("640x2560", "k/v proj", 640, 2560, 4.3),
        ("6912x2560", "gate/up proj (", 6912, 2560, 7.0), ("2560x6912", "down proj (", 2560, 6912, 7.8)]
for name, label, m, k, target in gemv:
    c = cells(label)
    matmul, both = (number(c[2]), number(c[1])) if c else (None, None)
    peer = oxb_ms(m, k, 1)
    row(f"GEMV {name}, us: matmul (with act_quant); 0xBitNet BitLinear",
        f"{matmul:.1f} ({both:.1f})" if c else "missing",
        f"{peer * 1e3:.1f}" if peer else missing(m, k, 1),
        f"{peer * 1e3 / both:.1f}x" if peer and c else "",
        f"<= {target}", matmul <= target if c else None)

c = cells("ternary GEMV")
if c:
    share = number(c[3])
    row(f"GEMV far beyond L2 {c[0][len('ternary GEMV '):]}, of the streaming read",
        f"{share:.1f}% ({c[2]} of {cells('streaming read')[2]})", "", "", ">= 80%", share >= 80)

for shape, label, peer_shape in [("512x2560->6912", "512 x 2560 -> 6912", (6912, 2560, 512)),
                                 ("512x6912->2560", "512 x 6912 -> 2560", None)]:
    c = cells(label)
    if not c:
        continue
    speedup = number(c[5])
    peer = oxb_ms(*peer_shape) if peer_shape else None
    row(f"GEMM {shape}: int8 TOPS, vs the f32 WGSL matmul", f"{c[3]}, {c[5]} (f32 {c[4]})",
        f"{peer:.2f} ms (ours {c[1]})" if peer else missing(*peer_shape) if peer_shape else "",
        f"{peer * 1e3 / number(c[1]):.1f}x" if peer else "",
        ">= 4x f32" if peer_shape else "", speedup >= 4 if peer_shape else None)

memory = fused["gpu_memory_bytes"] / 1e9
row("GPU memory, weights + KV cache, GB", f"{memory:.3f}", "", "", "<= 1.3", memory <= 1.3)

print(f"adapter: {fused['adapter']}; {layers} layers")
if smoke:
    print("smoke test: not the full 2B4T run, the targets do not apply")
print()
print("| figure | this project | 0xBitNet | ratio | target | met |")
print("| --- | --- | --- | --- | --- | --- |")
for r in rows:
    print("| " + " | ".join(r) + " |")
print()
print("ratio: how many times faster this project is; GEMV against 0xBitNet's BitLinear (int8")
print("quantization and the product) is act_quant + matmul. Raw outputs: " + out + "/")
EOF
  ;;
*)
  sed -n '2,20p' "$0"
  exit 2
  ;;
esac
