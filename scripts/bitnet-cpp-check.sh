#!/usr/bin/env bash
# Interoperability with bitnet.cpp (microsoft/BitNet, the llama.cpp fork with I2_S kernels): one
# GGUF file written by `bitnet convert --format gguf`, decoded greedily by both `bitnet generate`
# and bitnet.cpp's llama-cli, must give the same token ids.
#
# The checkpoint is small, its decoder linears all have rows of a multiple of 128 weights (what
# bitnet.cpp's x86 I2_S kernels compute correctly) and its vocabulary (4224) is larger than its
# tokenizer's 4096 tokens, so the GGUF token list must be padded to it (llama.cpp refuses a file
# whose token list is shorter). CHECKPOINT picks it:
#   trained (default): the demo model widened to hidden 256 by scripts/widen-checkpoint.py (zero
#     padding, 8 heads of 32, intermediate 512, 4 layers): the same trained function as
#     models/demo, whose greedy choices are clear enough to be the same in both engines;
#   random: random weights by scripts/synthetic-checkpoint.py (hidden 256, intermediate 512, 4
#     heads of 64, 2 kv heads, 2 layers, scales large enough that the layers and not the token
#     embedding decide). Expect differences there: llama-cli keeps keys, values and attention
#     weights in f16, and on random weights that rounding changes the greedy choice within a few
#     tokens (a float64 computation rounded the same way gives llama-cli's tokens).
# FAMILY=llama then rewrites the checkpoint in the Llama family's layout (Falcon3-1.58bit's:
# scripts/as-llama-family.py; SiLU, no sub-norms), which `convert` writes as bitnet.cpp's `llama`
# architecture with llama.cpp's q/k row order.
# For three prompts, prints one row: whether the prompt's token ids agree (BOS included), whether
# the generated ids agree, and the first position where they differ. Then converts the demo model
# itself (hidden 192, rows bitnet.cpp's x86 I2_S kernels misread) and reports what the converter
# says, refusal or not.
#
#   scripts/bitnet-cpp-check.sh
#
# Environment: BITNET_CPP (a bitnet.cpp tree with build/bin/llama-cli, default /work/bitnet.cpp),
# BITNET_BIN (the bitnet binary, default target/release/bitnet, built with
# `cargo build --release --bin bitnet` when missing), CHECKPOINT (trained or random), VOCAB (the
# vocabulary, default 4224; 4096 needs no padding), TOKENS (generated tokens compared, default
# 16), THREADS (llama-cli threads, default 2), FAMILY (bitnet or llama), WORK (a folder for the files, default a new
# temporary one).
#
# Exit status: 0 when every prompt agrees, 1 when any differs, 2 when a step fails (a conversion,
# or bitnet.cpp refusing the file).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
bitnet_cpp=${BITNET_CPP:-/work/bitnet.cpp}
checkpoint=${CHECKPOINT:-trained}
family=${FAMILY:-bitnet}
vocab=${VOCAB:-4224}
tokens=${TOKENS:-16}
threads=${THREADS:-2}
work=${WORK:-$(mktemp -d)}
prompts=(
    "Once upon a time"
    "The quick brown fox jumps over the lazy dog."
    "It was a dark and stormy night; 42 ships sailed at dawn"
)

cd "$root"
if [ -n "${BITNET_BIN:-}" ]; then
    bitnet=$(realpath "$BITNET_BIN")
else
    bitnet=${CARGO_TARGET_DIR:-$root/target}/release/bitnet
    [ -x "$bitnet" ] || cargo build --release --bin bitnet >&2
fi
llama_cli=$bitnet_cpp/build/bin/llama-cli
for program in "$bitnet" "$llama_cli"; do
    if [ ! -x "$program" ]; then
        echo "error: $program is missing" >&2
        exit 2
    fi
done
mkdir -p "$work"
echo "files in $work" >&2

name=$checkpoint-$family-v$vocab
model=$work/$name.gguf
if [ ! -f "$model" ]; then
    rm -rf "${work:?}/$name" "${work:?}/$name-bitnet"
    case $checkpoint in
        trained)
            python3 scripts/widen-checkpoint.py models/demo "$work/$name-bitnet" --hidden 256 \
                --vocab "$vocab"
            ;;
        random)
            python3 scripts/synthetic-checkpoint.py "$work/$name-bitnet" --hidden 256 \
                --intermediate 512 --heads 4 --kv-heads 2 --vocab "$vocab" --layers 2 --seed 7 \
                --scale-factor 40
            ;;
        *)
            echo "error: CHECKPOINT is trained or random, not $checkpoint" >&2
            exit 2
            ;;
    esac
    case $family in
        bitnet) mv "$work/$name-bitnet" "$work/$name" ;;
        llama) python3 scripts/as-llama-family.py "$work/$name-bitnet" "$work/$name" ;;
        *)
            echo "error: FAMILY is bitnet or llama, not $family" >&2
            exit 2
            ;;
    esac
    if ! "$bitnet" convert --format gguf --input "$work/$name" --output "$model" \
        >"$work/$name-convert.log" 2>&1; then
        cat "$work/$name-convert.log" >&2
        echo "error: bitnet convert failed" >&2
        exit 2
    fi
fi
eos=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["eos_token_id"])' \
    "$work/$name/config.json")

# Prints "PROMPT_IDS|GENERATED_IDS" (comma-separated, the end-of-sequence id last when it stopped
# there) from `bitnet generate --json` and its stderr.
ours() {
    python3 - "$1" "$2" "$eos" <<'EOF'
import json, sys
out, err, eos = open(sys.argv[1]).read(), open(sys.argv[2]).read(), int(sys.argv[3])
j = json.loads(out.strip().splitlines()[-1])
gen = list(j["generated_ids"])
if "stopped at the end-of-sequence token" in err and (not gen or gen[-1] != eos):
    gen.append(eos)
print(",".join(map(str, j["prompt_ids"])) + "|" + ",".join(map(str, gen)))
EOF
}

# The same from llama-cli -v's log: "tokens: [ 'piece':id, ... ]" is the prompt, and every
# "eval: [ ... ]" batch after the prompt's holds one generated token (the last sampled token is
# never evaluated, so llama-cli runs one token longer); " [end of text]" marks a stop at EOS.
theirs() {
    python3 - "$1" "$eos" <<'EOF'
import re, sys
log, eos = open(sys.argv[1], errors="replace").read(), int(sys.argv[2])
ids = lambda s: [int(x) for x in re.findall(r":(-?\d+)(?=, '| \])", s)]
# Generated text shares the output with the log: a marker may follow text on its line.
lines = log.splitlines()
prompt = next(ids(l[l.index("tokens: [") :]) for l in lines if "tokens: [" in l)
evaluated = [i for l in lines if "eval: [" in l for i in ids(l[l.index("eval: [") :])]
if evaluated[: len(prompt)] != prompt:
    sys.exit("llama-cli evaluated something other than the prompt first")
gen = evaluated[len(prompt) :]
if "[end of text]" in log:
    gen.append(eos)
print(",".join(map(str, prompt)) + "|" + ",".join(map(str, gen)))
EOF
}

# Compares two id lists over their first N ids: prints "same" or "different at I".
compare() {
    python3 - "$1" "$2" "$3" <<'EOF'
import sys
n = int(sys.argv[3])
a, b = ((s.split(",") if s else [])[:n] for s in sys.argv[1:3])
diff = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
if diff is None and len(a) != len(b):
    diff = min(len(a), len(b))
print("same" if diff is None else f"different at {diff}")
EOF
}

status=0
rows=()
for i in "${!prompts[@]}"; do
    prompt=${prompts[$i]}
    "$bitnet" generate --model "$model" --prompt "$prompt" --temperature 0 \
        --max-new-tokens "$tokens" --device cpu --json >"$work/ours-$i.json" 2>"$work/ours-$i.err" || {
        cat "$work/ours-$i.err" >&2
        echo "error: bitnet generate failed" >&2
        exit 2
    }
    if ! nice "$llama_cli" -m "$model" -p "$prompt" -n "$((tokens + 1))" --temp 0 --top-k 1 \
        -t "$threads" -c 256 -v --seed 0 </dev/null >"$work/theirs-$i.log" 2>&1; then
        grep -iE "error|mismatch|wrong shape|failed" "$work/theirs-$i.log" | head -5 >&2 || true
        echo "error: llama-cli refused $model (log: $work/theirs-$i.log)" >&2
        exit 2
    fi
    our_ids=$(ours "$work/ours-$i.json" "$work/ours-$i.err")
    IFS='|' read -r our_prompt our_gen <<<"$our_ids"
    IFS='|' read -r their_prompt their_gen <<<"$their_ids"
    prompt_match=$(compare "$our_prompt" "$their_prompt" 1000000)
    gen_match=$(compare "$our_gen" "$their_gen" "$tokens")
    [ "$prompt_match" = same ] && [ "$gen_match" = same ] || status=1
    rows+=("$(printf '| %-58s | %-15s | %-15s |' "\"$prompt\"" "$prompt_match" "$gen_match")")
    {
        echo "prompt $i: bitnet     [$our_prompt] -> [$our_gen]"
        echo "prompt $i: bitnet.cpp [$their_prompt] -> [$their_gen]"
    } >&2
done

echo
echo "bitnet vs bitnet.cpp llama-cli, greedy, $tokens tokens, $checkpoint checkpoint," \
    "$family family, vocabulary $vocab ($name.gguf):"
printf '| %-58s | %-15s | %-15s |\n' prompt "prompt ids" "generated ids"
printf '|%s|%s|%s|\n' "$(printf -- '-%.0s' {1..60})" "$(printf -- '-%.0s' {1..17})" \
    "$(printf -- '-%.0s' {1..17})"
printf '%s\n' "${rows[@]}"

echo
demo_out=$work/demo.gguf
rm -f "$demo_out"
if "$bitnet" convert --format gguf --input models/demo --output "$demo_out" \
    >"$work/demo-convert.log" 2>&1; then
    echo "demo model (hidden 192): converted without complaint (rows of 192 weights, which" \
        "bitnet.cpp's x86 I2_S kernels misread):"
else
    echo "demo model (hidden 192): refused:"
fi
sed 's/^/    /' "$work/demo-convert.log"
exit "$status"
