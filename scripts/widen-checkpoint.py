#!/usr/bin/env python3
"""Writes a wider copy of a BitNet checkpoint in Hugging Face's offline packed layout (such as
models/demo) that computes the same function: the hidden size padded with zeros (the new
dimensions of the embeddings, norms' inputs and every linear are zero), heads of the same size
added with zero weights, grouped-query attention spread out to one key/value head per head (each a
copy of the key/value head it read), and the vocabulary padded with zero embedding rows. The
norms over padded vectors get their weights multiplied by sqrt(old / new) so that they scale as
before. Only the RMS norms' epsilon then weighs a little differently.

For engines whose kernels need row lengths of a multiple of 128 (bitnet.cpp's x86 I2_S): the demo
model (hidden 192) widened to hidden 256 is a trained model they compute correctly.

Python's standard library only.

usage: widen-checkpoint.py IN_DIR OUT_DIR [--hidden H] [--vocab V]
"""

import argparse
import array
import json
import math
import os
import shutil
import struct


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    header.pop("__metadata__", None)
    return {
        name: (info["dtype"], info["shape"], data[info["data_offsets"][0] : info["data_offsets"][1]])
        for name, info in header.items()
    }


def write_safetensors(path, tensors):
    header, offset = {}, 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for _, _, data in tensors.values():
            f.write(data)


def floats(data):
    return array.array("f", data)


def unpack(data, rows, cols):
    """[rows / 4, cols] packed bytes to rows lists of cols stored values (code + 1)."""
    q = rows // 4
    return [
        [(data[(r % q) * cols + c] >> (2 * (r // q))) & 3 for c in range(cols)] for r in range(rows)
    ]


def pack(values, rows, cols):
    q = rows // 4
    out = bytearray(q * cols)
    for r, row in enumerate(values):
        shift, base = 2 * (r // q), (r % q) * cols
        for c, v in enumerate(row):
            out[base + c] |= v << shift
    return bytes(out)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int)
    args = parser.parse_args()

    with open(os.path.join(args.input, "config.json")) as f:
        config = json.load(f)
    hidden, heads, kv_heads = (
        config["hidden_size"],
        config["num_attention_heads"],
        config["num_key_value_heads"],
    )
    head_dim = config.get("head_dim", hidden // heads)
    vocab = config["vocab_size"]
    new_hidden, new_vocab = args.hidden, args.vocab or vocab
    if new_hidden < hidden or new_hidden % head_dim:
        parser.error(f"--hidden must be at least {hidden} and a multiple of {head_dim}")
    if new_vocab < vocab:
        parser.error(f"--vocab must be at least {vocab}")
    new_heads = new_hidden // head_dim
    group = heads // kv_heads
    if heads * head_dim != hidden:
        parser.error("the attention width must equal the hidden size")
    if config.get("tie_word_embeddings") is False:
        parser.error("untied lm_head is not supported")

    tensors = read_safetensors(os.path.join(args.input, "model.safetensors"))
    out = {}
    zero = 1  # the stored value of a zero weight

    def linear(name, rows_map, new_rows, cols_map, new_cols):
        """rows_map[new row] = old row or None; the same for columns."""
        dtype, (q, cols), data = tensors[name]
        assert dtype == "U8", name
        rows = 4 * q
        old = unpack(data, rows, cols)
        new = [
            [zero if r is None or c is None else old[r][c] for c in cols_map]
            for r in rows_map
        ]
        out[name] = ("U8", [new_rows // 4, new_cols], pack(new, new_rows, new_cols))

    hidden_map = list(range(hidden)) + [None] * (new_hidden - hidden)
    # New head h < heads is old head h (key/value head h // group); the rest are zero.
    q_map = hidden_map
    kv_map = [
        (h // group) * head_dim + d if h < heads else None
        for h in range(new_heads)
        for d in range(head_dim)
    ]
    norm_factor = math.sqrt(hidden / new_hidden)

    for name, (dtype, shape, data) in tensors.items():
        if name == "model.embed_tokens.weight":
            assert dtype == "F32" and shape == [vocab, hidden], (dtype, shape)
            old = floats(data)
            new = array.array("f", bytes(4 * new_vocab * new_hidden))
            for t in range(vocab):
                new[t * new_hidden : t * new_hidden + hidden] = old[t * hidden : (t + 1) * hidden]
            out[name] = ("F32", [new_vocab, new_hidden], new.tobytes())
        elif name.endswith(("input_layernorm.weight", "post_attention_layernorm.weight",
                            "attn_sub_norm.weight")) or name == "model.norm.weight":
            old = floats(data)
            assert len(old) == hidden, name
            new = array.array("f", [w * norm_factor for w in old] + [0.0] * (new_hidden - hidden))
            out[name] = ("F32", [new_hidden], new.tobytes())
        elif name.endswith(("q_proj.weight", "o_proj.weight", "k_proj.weight", "v_proj.weight",
                            "gate_proj.weight", "up_proj.weight", "down_proj.weight")):
            inter = config["intermediate_size"]
            if name.endswith("q_proj.weight"):
                linear(name, q_map, new_hidden, hidden_map, new_hidden)
            elif name.endswith(("k_proj.weight", "v_proj.weight")):
                linear(name, kv_map, new_hidden, hidden_map, new_hidden)
            elif name.endswith("o_proj.weight"):
                linear(name, hidden_map, new_hidden, q_map, new_hidden)
            elif name.endswith(("gate_proj.weight", "up_proj.weight")):
                linear(name, list(range(inter)), inter, hidden_map, new_hidden)
            else:
                linear(name, hidden_map, new_hidden, list(range(inter)), inter)
        else:
            out[name] = (dtype, shape, data)  # weight scales, ffn_sub_norm

    os.makedirs(args.output, exist_ok=False)
    write_safetensors(os.path.join(args.output, "model.safetensors"), out)
    config.update(
        hidden_size=new_hidden,
        num_attention_heads=new_heads,
        num_key_value_heads=new_heads,
        vocab_size=new_vocab,
    )
    config.pop("head_dim", None)
    with open(os.path.join(args.output, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    for extra in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if os.path.exists(os.path.join(args.input, extra)):
            shutil.copy(os.path.join(args.input, extra), args.output)


if __name__ == "__main__":
    main()
