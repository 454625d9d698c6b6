#!/usr/bin/env python3
"""Writes a Hugging Face BitNet checkpoint folder with random weights and the shapes of
microsoft/bitnet-b1.58-2B-4T (offline packed ternary linears, BF16 embeddings), for benchmarks:
`bitnet convert --format gguf` turns it into the I2_S GGUF every engine then reads.

Python's standard library only. The tokenizer is the demo model's (4096 tokens; the rest of the
128256-token vocabulary is never produced by it, but the lm_head still computes every row).

usage: synthetic-checkpoint.py OUT_DIR [--layers N] [--seed S]
"""

import argparse
import array
import json
import os
import random
import shutil
import struct

HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 2560, 6912, 20, 5, 128, 128256
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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    tensors = [("model.embed_tokens.weight", "BF16", [VOCAB, HIDDEN], bf16(rng, VOCAB * HIDDEN))]
    linears = [
        ("self_attn.q_proj", HEADS * HEAD_DIM, HIDDEN),
        ("self_attn.k_proj", KV_HEADS * HEAD_DIM, HIDDEN),
        ("self_attn.v_proj", KV_HEADS * HEAD_DIM, HIDDEN),
        ("self_attn.o_proj", HIDDEN, HEADS * HEAD_DIM),
        ("mlp.gate_proj", INTER, HIDDEN),
        ("mlp.up_proj", INTER, HIDDEN),
        ("mlp.down_proj", HIDDEN, INTER),
    ]
    norms = [
        ("input_layernorm", HIDDEN),
        ("self_attn.attn_sub_norm", HIDDEN),
        ("post_attention_layernorm", HIDDEN),
        ("mlp.ffn_sub_norm", INTER),
    ]
    for layer in range(args.layers):
        prefix = f"model.layers.{layer}"
        for name, out, inp in linears:
            tensors.append((f"{prefix}.{name}.weight", "U8", [out // 4, inp], ternary(rng, out, inp)))
            scale = 0.02 + 0.01 * rng.random()
            tensors.append((f"{prefix}.{name}.weight_scale", "F32", [1], f32([scale])))
        for name, n in norms:
            tensors.append((f"{prefix}.{name}.weight", "F32", [n], f32([1.0] * n)))
    tensors.append(("model.norm.weight", "F32", [HIDDEN], f32([1.0] * HIDDEN)))

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
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=args.layers,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=4096,
        rope_theta=500000.0,
    )
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    shutil.copy(os.path.join(DEMO, "tokenizer.json"), args.out)


if __name__ == "__main__":
    main()
