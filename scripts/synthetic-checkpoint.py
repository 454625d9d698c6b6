#!/usr/bin/env python3
"""Writes a Hugging Face BitNet checkpoint folder with random weights and the shapes of
microsoft/bitnet-b1.58-2B-4T (offline packed ternary linears, BF16 embeddings), for benchmarks:
`bitnet convert --format gguf` turns it into the I2_S GGUF every engine then reads.

Python's standard library only. The tokenizer is the demo model's (4096 tokens; the rest of the
128256-token vocabulary is never produced by it, but the lm_head still computes every row).

usage: synthetic-checkpoint.py OUT_DIR [--layers N] [--seed S] [--hidden H] [--intermediate I]
                               [--heads A] [--kv-heads KV] [--vocab V] [--scale-factor F]
                               [--norm-jitter J]

The shape flags default to 2B4T's (hidden 2560, intermediate 6912, 20 heads of 128, 5 kv heads,
vocabulary 128256); the head dimension is hidden / heads. The linears' scales are drawn from
0.02 to 0.03 and multiplied by --scale-factor (default 1): with larger ones the layers' outputs
outweigh the token embedding in the residual stream, so that a greedy decode of a small model
depends on the whole computation rather than repeating its input token. The norm weights are 1,
or with --norm-jitter J drawn from [1 - J, 1 + J]: with weights of 1 the first layer's inputs are
the bf16 embeddings scaled, whose ratios often put an activation exactly halfway between two int8
codes, where engines that differ in the last bit of their RMS norm round apart.
"""

import argparse
import array
import json
import os
import random
import shutil
import struct

HIDDEN, INTER, HEADS, KV_HEADS, VOCAB = 2560, 6912, 20, 5, 128256
DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "models", "demo")

# A random byte to four 2-bit fields, each a stored ternary value 0, 1 or 2 (code + 1): its
# base-3 digits below 81, nearly uniform.
TRITS = bytes(
    sum(((r % 81) // 3**i % 3) << (2 * i) for i in range(4)) for r in range(256)
)
# A random byte to the high byte of a bf16: random sign, exponent 120..127 (magnitudes 2^-7 to
# 2, every value also exact in f16).
BF16_HIGH = bytes((r & 0x80) | (0x3C + ((r >> 4) & 3)) for r in range(256))


def random_bytes(rng, n):
    # randbytes draws one integer of n bytes: large n overflow it, so in pieces.
    piece = 1 << 24
    return b"".join(rng.randbytes(min(piece, n - at)) for at in range(0, n, piece))


def ternary(rng, out, inp):
    return random_bytes(rng, out // 4 * inp).translate(TRITS)


def bf16(rng, n):
    buf = bytearray(2 * n)
    buf[0::2] = random_bytes(rng, n)
    buf[1::2] = random_bytes(rng, n).translate(BF16_HIGH)
    return bytes(buf)


def f32(values):
    return array.array("f", values).tobytes()


def norm(rng, n, jitter):
    if jitter == 0.0:
        return f32([1.0] * n)
    return f32([1.0 + jitter * (2.0 * rng.random() - 1.0) for _ in range(n)])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=HIDDEN)
    parser.add_argument("--intermediate", type=int, default=INTER)
    parser.add_argument("--heads", type=int, default=HEADS)
    parser.add_argument("--kv-heads", type=int, default=KV_HEADS)
    parser.add_argument("--vocab", type=int, default=VOCAB)
    parser.add_argument("--scale-factor", type=float, default=1.0)
    parser.add_argument("--norm-jitter", type=float, default=0.0)
    args = parser.parse_args()
    hidden, inter, heads, kv_heads, vocab = (
        args.hidden, args.intermediate, args.heads, args.kv_heads, args.vocab
    )
    if hidden % heads or heads % kv_heads:
        parser.error("--hidden must be a multiple of --heads, and --heads of --kv-heads")
    head_dim = hidden // heads
    kv_dim = kv_heads * head_dim
    for name, rows in (("--hidden", hidden), ("--intermediate", inter), ("kv heads * head_dim", kv_dim)):
        if rows % 4:
            parser.error(f"{name} = {rows}: packed ternary rows need a multiple of 4")
    rng = random.Random(args.seed)
    tensors = [("model.embed_tokens.weight", "BF16", [vocab, hidden], bf16(rng, vocab * hidden))]
    linears = [
        ("self_attn.q_proj", heads * head_dim, hidden),
        ("self_attn.k_proj", kv_heads * head_dim, hidden),
        ("self_attn.v_proj", kv_heads * head_dim, hidden),
        ("self_attn.o_proj", hidden, heads * head_dim),
        ("mlp.gate_proj", inter, hidden),
        ("mlp.up_proj", inter, hidden),
        ("mlp.down_proj", hidden, inter),
    ]
    norms = [
        ("input_layernorm", hidden),
        ("self_attn.attn_sub_norm", hidden),
        ("post_attention_layernorm", hidden),
        ("mlp.ffn_sub_norm", inter),
    ]
    for layer in range(args.layers):
        prefix = f"model.layers.{layer}"
        for name, out, inp in linears:
            tensors.append((f"{prefix}.{name}.weight", "U8", [out // 4, inp], ternary(rng, out, inp)))
            scale = 0.02 + 0.01 * rng.random()
            if args.scale_factor != 1.0:
                scale *= args.scale_factor
            tensors.append((f"{prefix}.{name}.weight_scale", "F32", [1], f32([scale])))
        for name, n in norms:
            tensors.append((f"{prefix}.{name}.weight", "F32", [n], norm(rng, n, args.norm_jitter)))
    tensors.append(("model.norm.weight", "F32", [hidden], norm(rng, hidden, args.norm_jitter)))

    header, offset = {}, 0
    for name, dtype, shape, data in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    os.makedirs(args.out, exist_ok=False)
    with open(os.path.join(args.out, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for _, _, _, data in tensors:
            f.write(data)

    with open(os.path.join(DEMO, "config.json")) as f:
        config = json.load(f)
    config.update(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        rope_theta=500000.0,
    )
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    shutil.copy(os.path.join(DEMO, "tokenizer.json"), args.out)


if __name__ == "__main__":
    main()
