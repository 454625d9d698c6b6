#!/usr/bin/env python3
"""Rewrites a BitNet checkpoint in Hugging Face's offline packed layout (BitNetForCausalLM,
linear_class "autobitlinear", such as models/demo or its widened copy) as a Llama-family one in
tiiuae's Falcon3-1.58bit layout: LlamaForCausalLM, hidden_act "silu", no sub-norms, each
weight_scale the divisor transformers' BitLinear divides by (1 / the multiplier), lm_head left in
full precision. The packed codes, embeddings and other norms are kept as they are.

The result is another model (SiLU, no sub-norms), not the same function: it is for checking that
engines agree on the family's layout (bitnet.cpp's `llama` architecture, its q/k row order).

Python's standard library only.

usage: as-llama-family.py IN_DIR OUT_DIR
"""

import argparse
import json
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
    header, offset = {"__metadata__": {"format": "pt"}}, 0
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


def scale_value(dtype, data):
    if dtype == "F32":
        return struct.unpack("<f", data)[0]
    if dtype == "BF16":
        return struct.unpack("<f", b"\0\0" + data)[0]
    raise SystemExit(f"weight_scale dtype {dtype} is not supported")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("input")
    parser.add_argument("output")
    args = parser.parse_args()

    with open(os.path.join(args.input, "config.json")) as f:
        config = json.load(f)
    quant = config.get("quantization_config") or {}
    if quant.get("linear_class") != "autobitlinear" or config.get("hidden_act") != "relu2":
        raise SystemExit("expected an offline packed BitNetForCausalLM (autobitlinear, relu2)")
    out = {}
    for name, (dtype, shape, data) in read_safetensors(
        os.path.join(args.input, "model.safetensors")
    ).items():
        if name.endswith(("attn_sub_norm.weight", "ffn_sub_norm.weight")):
            continue
        if name.endswith("weight_scale"):
            divisor = 1.0 / scale_value(dtype, data)
            out[name] = ("F32", [1], struct.pack("<f", divisor))
        else:
            out[name] = (dtype, shape, data)
    os.makedirs(args.output, exist_ok=False)
    write_safetensors(os.path.join(args.output, "model.safetensors"), out)
    config.update(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        hidden_act="silu",
        head_dim=config["hidden_size"] // config["num_attention_heads"],
        quantization_config={"quant_method": "bitnet", "modules_to_not_convert": ["lm_head"]},
    )
    with open(os.path.join(args.output, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    for extra in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if os.path.exists(os.path.join(args.input, extra)):
            shutil.copy(os.path.join(args.input, extra), args.output)


if __name__ == "__main__":
    main()
