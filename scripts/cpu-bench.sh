#!/usr/bin/env bash
# The CPU engine side by side with pytritium (a Rust CPU BitNet engine on PyPI), the CPU reference
# and lavapipe, in one run, on the same I2_S GGUF files made by `bitnet convert --format gguf`:
# the demo model, and random weights with the shapes of bitnet-b1.58-2B-4T. Prints one table.
# Then the CPU engine against bitnet.cpp (microsoft/BitNet's llama.cpp fork) on the 2B4T-shaped
# file, the two taking turns: start-up to the first token, peak host memory, and prompt and decode
# tokens/s at 1 and 2 threads (decoding, start-up and memory also with `--head int8`, and the
# start-up and memory of the safetensors checkpoint the GGUF was made from). Prints a second table.
#
#   scripts/cpu-bench.sh
#
# Environment: LAYERS (2B4T layers, default 30), TOKENS (decoded tokens, default 16),
# REFERENCE_TOKENS (the reference decodes fewer, default 4), PYTHON (a Python with pytritium:
# `python3 -m venv venv && venv/bin/pip install --pre pytritium`; default python3), WORK (a
# folder for the model files demo.gguf, 2b4t/ and 2b4t.gguf, made there when missing; default a new
# temporary one), LAVAPIPE=0 skips lavapipe (slow at 2B4T shapes: minutes), PYTRITIUM=0 skips
# pytritium, REFERENCE=0 skips the CPU reference (`cargo bench --bench cpu_engine`), BITNET (a
# `bitnet` binary to use instead of building one), BITNET_CPP (a bitnet.cpp checkout built with
# build/bin/llama-cli and llama-bench; default ../bitnet.cpp beside this repository; BITNET_CPP=
# skips it), ROUNDS (turns per engine and figure against bitnet.cpp, default 2), PROMPT_TOKENS
# (the prompt lengths, default 128; several, as "128 512", give a prompt row each) and
# DECODE_TOKENS (default 32; decoded after the first prompt length) of the tokens/s figures
# against bitnet.cpp. Both engines' tokens/s are measured as llama-bench measures them: one
# untimed run, then the mean of three (`bitnet bench --device cpu --repetitions 3`, random
# prompt ids). bitnet.cpp's llama-bench runs prompts in batches of at most 256 tokens
# (`-ub 256`): with its default of 512 it crashes (a segmentation fault) on a 512-token prompt.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
layers=${LAYERS:-30}
tokens=${TOKENS:-16}
reference_tokens=${REFERENCE_TOKENS:-4}
python=${PYTHON:-python3}
work=${WORK:-$(mktemp -d)}
target=${CARGO_TARGET_DIR:-$root/target}
prompt="It was a dark and stormy night"

cd "$root"
bitnet_cpp=${BITNET_CPP-$root/../bitnet.cpp}
rounds=${ROUNDS:-2}
cpp_prompt=${PROMPT_TOKENS:-128}
cpp_decode=${DECODE_TOKENS:-32}
if [ "${REFERENCE:-1}" != 0 ]; then
    if [ -n "${BITNET:-}" ]; then
        cargo build --release --bench cpu_engine >&2
    else
        cargo build --release --bin bitnet --bench cpu_engine >&2
    fi
    bench=$(ls -t "$target"/release/deps/cpu_engine-* | grep -v '\.d$' | head -1)
elif [ -z "${BITNET:-}" ]; then
    cargo build --release --bin bitnet >&2
fi
bitnet=${BITNET:-$target/release/bitnet}

[ -f "$work/demo.gguf" ] ||
    "$bitnet" convert --format gguf --any-row-length --input models/demo --output "$work/demo.gguf" >&2
# The safetensors checkpoint stays beside its GGUF: its start-up is timed too.
[ -f "$work/2b4t/model.safetensors" ] ||
    python3 scripts/synthetic-checkpoint.py "$work/2b4t" --layers "$layers" >&2
[ -f "$work/2b4t.gguf" ] ||
    "$bitnet" convert --format gguf --input "$work/2b4t" --output "$work/2b4t.gguf" >&2

# One JSON line per engine: {"engine", "prompt_tokens_per_s", "decode_tokens_per_s", ...}.
generate() { # model device label (the exact head, which the reference's logits equal)
    "$bitnet" generate --model "$1" --prompt "$prompt" --max-new-tokens "$tokens" \
        --temperature 0 --device "$2" --head exact --json 2>/dev/null |
        "$python" -c 'import json, sys; d = json.load(sys.stdin); print(json.dumps({
            "engine": sys.argv[1], "prompt_tokens": len(d["prompt_ids"]),
            "prompt_tokens_per_s": d["prompt_tokens_per_s"], "decode_tokens": len(d["generated_ids"]),
            "decode_tokens_per_s": d["tokens_per_s"], "ids": d["prompt_ids"]}))' "$3"
}

pytritium() { # model prompt_ids_json
    "$python" - "$1" "$2" "$tokens" <<'EOF'
import json, sys, time
try:
    from tritium import _tritium
except ImportError:
    print(json.dumps({"engine": "pytritium", "error": "not installed"}))
    sys.exit()
path, ids, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
model = _tritium.Model.load(path)
model.generate(ids, 1)  # warm up
start = time.perf_counter()
model.generate(ids, 1)  # the prompt and the first token
first = time.perf_counter() - start
start = time.perf_counter()
model.generate(ids, n + 1)
total = time.perf_counter() - start
print(json.dumps({"engine": "pytritium", "prompt_tokens": len(ids),
                  "prompt_tokens_per_s": len(ids) / first, "decode_tokens": n,
                  "decode_tokens_per_s": n / (total - first)}))
EOF
}

results=$work/results.jsonl
: >"$results"
for model in demo 2b4t; do
    gguf=$work/$model.gguf
    cpu=$(generate "$gguf" cpu "bitnet --device cpu")
    echo "$cpu" | sed "s/^{/{\"model\": \"$model\", /" >>"$results"
    ids=$(echo "$cpu" | "$python" -c 'import json, sys; print(json.load(sys.stdin)["ids"])')
    if [ "${PYTRITIUM:-1}" != 0 ]; then
        pytritium "$gguf" "$ids" | sed "s/^{/{\"model\": \"$model\", /" >>"$results"
    fi
    if [ "${REFERENCE:-1}" != 0 ]; then
        "$bench" "$gguf" "$(echo "$ids" | tr -cd ',' | wc -c | awk '{print $1 + 1}')" "$tokens" \
            "$reference_tokens" | sed "s/^{/{\"model\": \"$model\", /" >>"$results"
    fi
    if [ "${LAVAPIPE:-1}" != 0 ]; then
        mkdir -p /tmp/xdg-bench && chmod 700 /tmp/xdg-bench
        XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp/xdg-bench} WGPU_BACKEND=vulkan \
            generate "$gguf" gpu "lavapipe (--device gpu)" |
            sed "s/^{/{\"model\": \"$model\", /" >>"$results" || true
    fi
done

"$python" - "$results" "$layers" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
print(f"| model | engine | prompt tokens/s | decode tokens/s | decode vs pytritium |")
print("| --- | --- | --- | --- | --- |")
for model in ("demo", "2b4t"):
    mine = [r for r in rows if r["model"] == model]
    peer = next((r for r in mine if r["engine"] == "pytritium" and "error" not in r), None)
    for r in mine:
        name = "demo (models/demo)" if model == "demo" else f"2B4T shapes, {sys.argv[2]} layers"
        if "error" in r:
            print(f"| {name} | {r['engine']} | {r['error']} | | |")
            continue
        ratio = f"{r['decode_tokens_per_s'] / peer['decode_tokens_per_s']:.2f}x" if peer else ""
        extra = ""
        if r.get("logits_identical") is not None and r["engine"] == "cpu engine":
            extra = " (bench; logits identical to the reference: " + str(r["logits_identical"]).lower() + ")"
        print(f"| {name} | {r['engine']}{extra} | {r['prompt_tokens_per_s']:.1f} | "
              f"{r['decode_tokens_per_s']:.2f} | {ratio} |")
EOF

# The CPU engine against bitnet.cpp on the 2B4T-shaped file, the two taking turns.
if [ -z "$bitnet_cpp" ] || [ ! -x "$bitnet_cpp/build/bin/llama-cli" ] ||
    [ ! -x "$bitnet_cpp/build/bin/llama-bench" ]; then
    echo
    echo "bitnet.cpp: not built at ${bitnet_cpp:-(BITNET_CPP empty)}, skipped"
    exit 0
fi
gguf=$work/2b4t.gguf
cores=$(nproc)
cpp=$work/bitnet-cpp.jsonl
: >"$cpp"
load_before=$(uptime)
cat "$gguf" "$work/2b4t/model.safetensors" >/dev/null # a warm page cache for all

timed() { # engine command... (one JSON line: wall seconds and peak RSS in KB)
    local engine=$1 out
    shift
    out=$(mktemp)
    local log="$work/${engine// /_}.log"
    if ! /usr/bin/time -f '%e %M' -o "$out" "$@" </dev/null >/dev/null 2>"$log"; then
        echo "$engine failed (see $log): $*" >&2
        exit 1
    fi
    read -r seconds kb <"$out"
    rm "$out"
    echo "{\"engine\": \"$engine\", \"figure\": \"start\", \"seconds\": $seconds, \"kb\": $kb}"
}
# Both engines as llama-bench measures: an untimed run, then the mean of 3 timed ones.
ours_rates() { # threads prompt_tokens decode_tokens [head] (the decode figure where more than 0)
    local head=${4:-exact}
    RAYON_NUM_THREADS=$1 "$bitnet" bench --device cpu --model "$gguf" --prompt-tokens "$2" \
        --decode-tokens "$3" --head "$head" --repetitions 3 --json 2>/dev/null |
        "$python" -c 'import json, sys; d = json.load(sys.stdin); t = int(sys.argv[1])
engine = "bitnet" if sys.argv[2] == "exact" else "bitnet --head " + sys.argv[2]
if engine == "bitnet":
    print(json.dumps({"engine": engine, "figure": "prompt", "threads": t,
                      "tokens": d["prompt_tokens"], "tokens_per_s": d["prompt_tokens_per_s"]}))
if d["decode_tokens"] > 0:
    print(json.dumps({"engine": engine, "figure": "decode", "threads": t,
                      "tokens": d["decode_tokens"], "tokens_per_s": d["decode_tokens_per_s"]}))
' "$1" "$head"
}
theirs_rate() { # figure threads -p -n
    "$bitnet_cpp/build/bin/llama-bench" -m "$gguf" -p "$3" -n "$4" -t "$2" -ub 256 -r 3 -o json \
        2>/dev/null |
        "$python" -c 'import json, sys; d = json.load(sys.stdin)[0]
print(json.dumps({"engine": "bitnet.cpp", "figure": sys.argv[1], "threads": d["n_threads"],
                  "tokens": d["n_prompt"] + d["n_gen"], "tokens_per_s": d["avg_ts"]}))' "$1"
}

for _ in $(seq "$rounds"); do
    timed bitnet "$bitnet" generate --model "$gguf" --prompt Hello --max-new-tokens 1 \
        --temperature 0 --device cpu --head exact >>"$cpp"
    timed "bitnet --head int8" "$bitnet" generate --model "$gguf" --prompt Hello \
        --max-new-tokens 1 --temperature 0 --device cpu --head int8 >>"$cpp"
    timed "bitnet safetensors" "$bitnet" generate --model "$work/2b4t" --prompt Hello \
        --max-new-tokens 1 --temperature 0 --device cpu --head exact >>"$cpp"
    # --no-warmup: loading, the prompt and one token, as ours (by default llama-cli first runs
    # the model once on an empty batch).
    timed bitnet.cpp "$bitnet_cpp/build/bin/llama-cli" -m "$gguf" -p Hello -n 1 --temp 0 \
        -t "$cores" --no-warmup >>"$cpp"
done
for threads in 1 2; do
    for _ in $(seq "$rounds"); do
        {
            decode_tokens=$cpp_decode
            for prompt_tokens in $cpp_prompt; do
                ours_rates "$threads" "$prompt_tokens" "$decode_tokens"
                theirs_rate prompt "$threads" "$prompt_tokens" 0
                decode_tokens=0
            done
            theirs_rate decode "$threads" 0 "$cpp_decode"
            ours_rates "$threads" "${cpp_prompt%% *}" "$cpp_decode" int8
        } >>"$cpp"
    done
done
load_after=$(uptime)

echo
"$python" - "$cpp" "$rounds" "$cores" <<'PYEOF'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
rounds, cores = sys.argv[2], sys.argv[3]
def pick(engine, figure, threads=None, tokens=None):
    return [r for r in rows if r["engine"] == engine and r["figure"] == figure
            and (threads is None or r["threads"] == threads)
            and (tokens is None or r["tokens"] == tokens)]
print("| figure | bitnet | bitnet.cpp | ratio (bitnet / bitnet.cpp) |")
print("| --- | --- | --- | --- |")
a, b = pick("bitnet", "start"), pick("bitnet.cpp", "start")
sa, sb = statistics.median(r["seconds"] for r in a), statistics.median(r["seconds"] for r in b)
runs = lambda rs: " / ".join(f"{r['seconds']:.2f}" for r in rs)
print(f"| start-up to the first token, s (median of {rounds}; {cores} threads; lower is better) | "
      f"{sa:.2f} ({runs(a)}) | {sb:.2f} ({runs(b)}) | {sa / sb:.2f}x |")
ma, mb = (max(r["kb"] for r in rs) * 1024 / 1e9 for rs in (a, b))
print(f"| peak host memory, GB (largest start-up `%M`, KiB; lower is better) | {ma:.2f} | {mb:.2f} | "
      f"{ma / mb:.2f}x |")
i = pick("bitnet --head int8", "start")
if i:
    si, mi = statistics.median(r["seconds"] for r in i), max(r["kb"] for r in i) * 1024 / 1e9
    print(f"| start-up to the first token, s, `--head int8` (median of {rounds}) | "
          f"{si:.2f} ({runs(i)}) | {sb:.2f} | {si / sb:.2f}x |")
    print(f"| peak host memory, GB, `--head int8` | {mi:.2f} | {mb:.2f} | {mi / mb:.2f}x |")
h = pick("bitnet safetensors", "start")
if h:
    sh, mh = statistics.median(r["seconds"] for r in h), max(r["kb"] for r in h) * 1024 / 1e9
    print(f"| start-up to the first token, s, the same model's safetensors checkpoint (median of "
          f"{rounds}) | {sh:.2f} ({runs(h)}) | {sb:.2f} (its GGUF) | {sh / sb:.2f}x |")
    print(f"| peak host memory, GB, safetensors checkpoint | {mh:.2f} | {mb:.2f} (its GGUF) | "
          f"{mh / mb:.2f}x |")
lengths = sorted({r["tokens"] for r in pick("bitnet.cpp", "prompt")})
for figure, sizes in (("prompt", lengths), ("decode", [None])):
    for size, threads in ((size, threads) for size in sizes for threads in (1, 2)):
        a, b = pick("bitnet", figure, threads, size), pick("bitnet.cpp", figure, threads, size)
        ra = statistics.median(r["tokens_per_s"] for r in a)
        rb = statistics.median(r["tokens_per_s"] for r in b)
        tokens = "/".join(sorted({str(r["tokens"]) for r in a + b}))
        print(f"| {figure} tokens/s, {tokens} tokens, {threads} thread{'s' if threads > 1 else ''} "
              f"(median of {rounds}) | {ra:.2f} | {rb:.2f} | {ra / rb:.2f}x |")
        int8 = pick("bitnet --head int8", figure, threads, size)
        if int8:
            ri = statistics.median(r["tokens_per_s"] for r in int8)
            print(f"| {figure} tokens/s, {tokens} tokens, {threads} "
                  f"thread{'s' if threads > 1 else ''}, `--head int8` (median of {rounds}) | "
                  f"{ri:.2f} | {rb:.2f} | {ri / rb:.2f}x |")
PYEOF
echo
echo "load before: $load_before"
echo "load after: $load_after"
