#!/usr/bin/env python3
"""Tiny Llama-family BitNet b1.58 models made and run by transformers itself, for
tests/transformers_fixtures.rs.

Writes tests/fixtures/transformers/<name>/ for two layouts of `LlamaForCausalLM` with
`quantization_config.quant_method = "bitnet"`:

  llama-offline  transformers' BitLinear (no linear_class, as in tiiuae/Falcon3-*-1.58bit):
                 decoder linears stored as uint8 [out/4, in] ternary codes packed by
                 transformers' pack_weights, plus weight_scale = 1/mean|W| (a divisor);
                 lm_head untied and in full precision.
  llama-online   AutoBitLinear with quantization_mode "online": full-precision linears,
                 quantized on the fly (WeightQuant / ActQuant, straight-through gradients).

Each folder holds what `save_pretrained` writes (config.json, generation_config.json,
model.safetensors with bf16 weights like the real checkpoints) and expected.json: the
transformers and torch versions, and for a few prompts (token ids) the last position's logits
and 8 greedily generated ids, computed by transformers in float32 from the bf16 weights as
stored. A prompt is kept only if its greedy ids are the same in float64 and with every float
weight perturbed by a relative 1e-6, and its last logits move by at most 1e-4 of their scale
there (so no int8 activation rounding tie decides them: a runtime that sums in another order
must still give the same ids and logits).
llama-online also has gradients.safetensors: the gradients of the causal-LM loss of one token
sequence (`model(ids, labels=ids).loss`, kept in expected.json) with respect to a few tensors,
named as in model.safetensors.

Run by hand (CI has no torch), from the repository root:

    /work/venv/bin/python scripts/transformers-fixtures.py

with torch and transformers (5.x) installed; it is deterministic for given versions.
"""

import json
import sys
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.integrations import bitnet as hf_bitnet

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "transformers"
GENERATE = 8
PROMPTS_WANTED = 4
PERTURBATIONS = 3
# A prompt is dropped when float noise moves its last logits by more than this, relative to
# their largest magnitude (an int8 activation rounding tie that flips).
NOISE_REL_MAX = 1e-4
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GRADIENT_TENSORS = [
    "model.embed_tokens.weight",
    "model.layers.0.input_layernorm.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.k_proj.weight",
    "model.layers.0.self_attn.o_proj.weight",
    "model.layers.1.mlp.down_proj.weight",
    "model.layers.1.mlp.gate_proj.weight",
    "model.norm.weight",
    "lm_head.weight",
]


def llama_config(quantization_config, vocab_size, intermediate_size):
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        hidden_act="silu",
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        rope_theta=1000042.0,
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        quantization_config=quantization_config,
    )


def bf16(t):
    return t.to(torch.bfloat16).to(torch.float32)


def random_model(config, seed):
    """A float32 LlamaForCausalLM with bf16-representable random weights; norms in 0.8..1.2."""
    gen = torch.Generator().manual_seed(seed)
    plain = LlamaConfig.from_dict({k: v for k, v in config.to_dict().items() if k != "quantization_config"})
    model = LlamaForCausalLM(plain).to(torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(bf16(0.8 + 0.4 * torch.rand(p.shape, generator=gen)))
            elif "embed_tokens" in name:
                p.copy_(bf16(torch.randn(p.shape, generator=gen)))
            else:
                fan_in = p.shape[1]
                p.copy_(bf16(torch.randn(p.shape, generator=gen) * 2.0 / fan_in**0.5))
    return model


def quantize_to_bitlinear(model):
    """Replaces every decoder linear by transformers' BitLinear holding its packed ternary codes
    and weight_scale = 1/mean|W| (bf16, as stored); returns the model."""
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in LINEARS:
                if not hasattr(parent, name):
                    continue
                linear = getattr(parent, name)
                w = linear.weight.detach().to(torch.float32)
                scale = bf16(1.0 / w.abs().mean().clamp(min=1e-5))
                codes = (w * scale).round().clamp(-1, 1)
                bit = hf_bitnet.BitLinear(w.shape[1], w.shape[0], bias=False, dtype=torch.bfloat16)
                packed = hf_bitnet.pack_weights(codes.clone())
                unpacked = hf_bitnet.unpack_weights(packed, dtype=torch.float32)
                assert torch.equal(unpacked, codes), "pack_weights round trip"
                bit.weight.copy_(packed)
                bit.weight_scale.copy_(scale.to(torch.bfloat16).reshape(1))
                setattr(parent, name, bit)
    return model


def save(model, config, folder):
    folder.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        f.unlink()
    model.config = config
    model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(folder)


def load(folder, dtype=torch.float32):
    model = LlamaForCausalLM.from_pretrained(folder, dtype=dtype)
    model.eval()
    if dtype != torch.float32:
        # BitLinear keeps the dtype it was built with for its unpacked codes and int8 activations.
        for m in model.modules():
            if isinstance(m, hf_bitnet.BitLinear):
                m.dtype = dtype
    return model


@torch.no_grad()
def run(model, prompt):
    """Last-position logits of the prompt, and GENERATE greedy ids (recomputed from scratch)."""
    ids = list(prompt)
    first = None
    out = []
    for _ in range(GENERATE):
        logits = model(torch.tensor([ids]), use_cache=False).logits[0, -1]
        if first is None:
            first = logits.to(torch.float64).tolist()
        nxt = int(logits.argmax())
        out.append(nxt)
        ids.append(nxt)
    return first, out


@torch.no_grad()
def perturb(model, seed):
    gen = torch.Generator().manual_seed(seed)
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            t.mul_(1 + 1e-6 * torch.randn(t.shape, generator=gen, dtype=t.dtype))
    return model


def robust_prompts(folder, vocab, seed):
    model = load(folder)
    model64 = load(folder, torch.float64)
    perturbed = [perturb(load(folder), seed * 100 + i) for i in range(PERTURBATIONS)]
    gen = torch.Generator().manual_seed(seed)
    lengths = [1, 3, 7, 12, 5, 9, 2, 11]
    kept, dropped = [], []
    tried = 0
    while len(kept) < PROMPTS_WANTED:
        length = lengths[tried % len(lengths)] if tried < 4 * len(lengths) else 1 + tried % 12
        tried += 1
        if tried > 200:
            sys.exit(f"{folder.name}: only {len(kept)} robust prompts in 200 candidates")
        prompt = torch.randint(0, vocab, (length,), generator=gen).tolist()
        logits, ids = run(model, prompt)
        logits64, ids64 = run(model64, prompt)
        others = [run(m, prompt) for m in perturbed]
        # How far float noise moves the last logits: an int8 rounding tie that flips moves
        # them by far more than float rounding does.
        noise = max(max(abs(a - b) for a, b in zip(logits, o)) for o in [logits64] + [o[0] for o in others])
        scale = max(abs(v) for v in logits)
        if ids64 == ids and all(o[1] == ids for o in others) and noise <= NOISE_REL_MAX * scale:
            kept.append({"prompt": prompt, "generated": ids, "last_logits": logits, "noise": noise / scale})
        else:
            dropped.append(
                {
                    "prompt": prompt,
                    "generated": ids,
                    "float64": ids64,
                    "perturbed": [o[1] for o in others],
                    "noise": noise / scale,
                }
            )
    return kept, dropped, tried


def gradients(folder, ids, dtype):
    model = load(folder, dtype)
    model.train()
    model.zero_grad()
    loss = model(torch.tensor([ids]), labels=torch.tensor([ids]), use_cache=False).loss
    loss.backward()
    params = dict(model.named_parameters())
    return float(loss), {name: params[name].grad.detach().clone() for name in GRADIENT_TENSORS}


def write_expected(folder, prompts, dropped, tried, extra=None):
    expected = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "generate": GENERATE,
        "candidates_tried": tried,
        "candidates_dropped": len(dropped),
        # last_logits_noise: the largest change of a last-position logit in float64 or with the
        # weights perturbed by a relative 1e-6, over the largest |logit|.
        "prompts": [
            {
                "prompt": p["prompt"],
                "generated": p["generated"],
                "last_logits": [float(f"{v:.7g}") for v in p["last_logits"]],
                "last_logits_noise": float(f"{p['noise']:.3g}"),
            }
            for p in prompts
        ],
    }
    if extra:
        expected.update(extra)
    (folder / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")


def main():
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    report = {}

    # (a) Offline packed BitLinear, the Falcon3 layout.
    name, vocab = "llama-offline", 211
    config = llama_config({"quant_method": "bitnet", "modules_to_not_convert": ["lm_head"]}, vocab, 96)
    folder = OUT / name
    save(quantize_to_bitlinear(random_model(config, 11)), config, folder)
    prompts, dropped, tried = robust_prompts(folder, vocab, 12)
    write_expected(folder, prompts, dropped, tried)
    report[name] = (tried, dropped)

    # (b) Online AutoBitLinear: full-precision weights quantized on the fly.
    name, vocab = "llama-online", 173
    quant = {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "online"}
    config = llama_config(quant, vocab, 160)
    folder = OUT / name
    save(random_model(config, 21), config, folder)
    prompts, dropped, tried = robust_prompts(folder, vocab, 22)

    # (c) The causal-LM loss of one sequence and its gradients, straight through both quantizers.
    seq = torch.randint(0, vocab, (10,), generator=torch.Generator().manual_seed(23)).tolist()
    loss, grads = gradients(folder, seq, torch.float32)
    loss64, grads64 = gradients(folder, seq, torch.float64)
    grad_diff = {
        n: float((grads[n].double() - grads64[n]).abs().max() / grads64[n].abs().max()) for n in GRADIENT_TENSORS
    }
    save_file({n: g.contiguous() for n, g in grads.items()}, folder / "gradients.safetensors")
    write_expected(
        folder,
        prompts,
        dropped,
        tried,
        {
            "gradients": {
                "input_ids": seq,
                "loss": loss,
                "loss_float64": loss64,
                "tensors": GRADIENT_TENSORS,
                "float64_max_rel_diff": {n: float(f"{v:.3g}") for n, v in grad_diff.items()},
            }
        },
    )
    report[name] = (tried, dropped)

    total = 0
    for name, (tried, dropped) in report.items():
        print(f"{name}: {tried} candidate prompts, {len(dropped)} dropped")
        for d in dropped:
            print(f"  dropped {d}")
        for f in sorted((OUT / name).iterdir()):
            total += f.stat().st_size
            print(f"  {f.name}: {f.stat().st_size} bytes")
    print(f"loss {loss} (float64 {loss64}); gradients vs float64, max rel diff: {grad_diff}")
    print(f"total {total} bytes")


if __name__ == "__main__":
    main()
