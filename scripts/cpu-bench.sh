#!/usr/bin/env bash
# The CPU engine side by side with pytritium (a Rust CPU BitNet engine on PyPI), the CPU reference
# and lavapipe, in one run, on the same I2_S GGUF files made by `bitnet convert --format gguf`:
# the demo model, and random weights with the shapes of bitnet-b1.58-2B-4T. Prints one table.
#
#   scripts/cpu-bench.sh
#
# Environment: LAYERS (2B4T layers, default 30), TOKENS (decoded tokens, default 16),
# REFERENCE_TOKENS (the reference decodes fewer, default 4), PYTHON (a Python with pytritium:
# `python3 -m venv venv && venv/bin/pip install --pre pytritium`; default python3), WORK (a
# folder for the model files, default a new temporary one), LAVAPIPE=0 skips lavapipe (slow at
# 2B4T shapes: minutes).
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
cargo build --release --bin bitnet --bench cpu_engine >&2
bitnet=$target/release/bitnet
bench=$(ls -t "$target"/release/deps/cpu_engine-* | grep -v '\.d$' | head -1)

[ -f "$work/demo.gguf" ] ||
    "$bitnet" convert --format gguf --any-row-length --input models/demo --output "$work/demo.gguf" >&2
if [ ! -f "$work/2b4t.gguf" ]; then
    python3 scripts/synthetic-checkpoint.py "$work/2b4t" --layers "$layers" >&2
    "$bitnet" convert --format gguf --input "$work/2b4t" --output "$work/2b4t.gguf" >&2
    rm -r "$work/2b4t"
fi

# One JSON line per engine: {"engine", "prompt_tokens_per_s", "decode_tokens_per_s", ...}.
generate() { # model device label
    "$bitnet" generate --model "$1" --prompt "$prompt" --max-new-tokens "$tokens" \
        --temperature 0 --device "$2" --json 2>/dev/null |
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
    pytritium "$gguf" "$ids" | sed "s/^{/{\"model\": \"$model\", /" >>"$results"
    "$bench" "$gguf" "$(echo "$ids" | tr -cd ',' | wc -c | awk '{print $1 + 1}')" "$tokens" \
        "$reference_tokens" | sed "s/^{/{\"model\": \"$model\", /" >>"$results"
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
