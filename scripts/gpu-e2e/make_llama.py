#!/usr/bin/env python3
"""Writes a Llama-architecture model directory with seeded random bf16 weights, for the GPU
end-to-end run (scripts/gpu-e2e/e2e.sh). Models of billions of parameters cannot travel in
one device call (64 MiB), so they are made where they run: torch draws the weights on the
GPU (falling back to the CPU) and safetensors writes them, one shard per layer group.

The text such a model writes is noise, but identity (a zero-value Engram adds exactly
nothing), KV cache vs recompute, the in-host trace check and throughput mean the same on
it as on a trained model of the same shape. SmolLM2's tokenizer files (vocabulary 49152)
are copied from --tokenizer.

usage: make_llama.py --shape {1b,8b} --tokenizer DIR --out DIR [--seed N]
"""
import argparse
import json
import os
import shutil
import sys

# (hidden, layers, heads, kv_heads, intermediate, tie_embeddings): Llama-3.2-1B's and
# Llama-3.1-8B's shapes with SmolLM2's vocabulary.
SHAPES = {
    "1b": (2048, 16, 32, 8, 8192, True),
    "8b": (4096, 32, 32, 8, 14336, False),
}
VOCAB = 49152
VERSION = "make_llama v1"


def tensors(shape):
    hidden, layers, heads, kv, inter, tie = shape
    head_dim = hidden // heads
    yield "model.embed_tokens.weight", (VOCAB, hidden), "normal"
    for i in range(layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (hidden,), "ones"
        yield p + "post_attention_layernorm.weight", (hidden,), "ones"
        yield p + "self_attn.q_proj.weight", (heads * head_dim, hidden), "normal"
        yield p + "self_attn.k_proj.weight", (kv * head_dim, hidden), "normal"
        yield p + "self_attn.v_proj.weight", (kv * head_dim, hidden), "normal"
        yield p + "self_attn.o_proj.weight", (hidden, heads * head_dim), "normal"
        yield p + "mlp.gate_proj.weight", (inter, hidden), "normal"
        yield p + "mlp.up_proj.weight", (inter, hidden), "normal"
        yield p + "mlp.down_proj.weight", (hidden, inter), "normal"
    yield "model.norm.weight", (hidden,), "ones"
    if not tie:
        yield "lm_head.weight", (VOCAB, hidden), "normal"


def config(shape, base):
    hidden, layers, heads, kv, inter, tie = shape
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": hidden // heads,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": None,
        "tie_word_embeddings": tie,
        "torch_dtype": "bfloat16",
        "vocab_size": VOCAB,
        "bos_token_id": base.get("bos_token_id", 1),
        "eos_token_id": base.get("eos_token_id", 2),
        "pad_token_id": base.get("pad_token_id", 2),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    stamp = os.path.join(args.out, ".make_llama")
    want = f"{VERSION} {args.shape} seed {args.seed}"
    if os.path.exists(stamp) and open(stamp).read() == want:
        print(f"make_llama: {args.out} ({want}, cached)", file=sys.stderr)
        return
    import torch
    from safetensors.torch import save_file

    shape = SHAPES[args.shape]
    os.makedirs(args.out, exist_ok=True)
    base = json.load(open(os.path.join(args.tokenizer, "config.json")))
    for name in os.listdir(args.tokenizer):
        if name.startswith("tokenizer") or name in ("special_tokens_map.json", "generation_config.json"):
            shutil.copy(os.path.join(args.tokenizer, name), os.path.join(args.out, name))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    hidden = shape[0]
    # Small weights keep activations finite through every layer of a random model.
    std = 0.5 / hidden**0.5
    shard, shard_bytes, shards, index, total = {}, 0, [], {}, 0

    def flush():
        nonlocal shard, shard_bytes
        if not shard:
            return
        name = f"model-{len(shards) + 1:05d}.safetensors"
        tmp = os.path.join(args.out, name + ".part")
        save_file(shard, tmp, metadata={"format": "pt"})
        os.replace(tmp, os.path.join(args.out, name))
        for k in shard:
            index[k] = name
        shards.append(name)
        shard, shard_bytes = {}, 0

    for name, dims, fill in tensors(shape):
        if fill == "ones":
            t = torch.ones(dims, dtype=torch.bfloat16)
        else:
            t = (torch.randn(dims, generator=gen, device=dev, dtype=torch.float32) * std).to(torch.bfloat16).cpu()
        n = t.numel()
        total += n
        shard[name] = t
        shard_bytes += 2 * n
        if shard_bytes >= 4 << 30:
            flush()
    flush()
    with open(os.path.join(args.out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 2 * total}, "weight_map": index}, f)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(config(shape, base), f, indent=1)
    with open(os.path.join(args.out, "params.json"), "w") as f:
        json.dump({"shape": args.shape, "params": total, "seed": args.seed}, f)
    with open(stamp, "w") as f:
        f.write(want)
    print(f"make_llama: {args.out}: {total / 1e9:.2f} B parameters ({args.shape})", file=sys.stderr)


if __name__ == "__main__":
    main()
