"""Decode speed of a DeepSeek-V3 (MLA/MoE) model: the latent KV cache against recomputing the full forward per
token (the path generation used before the cache), greedy, batch 1, on whatever backend jax picks.

    python -m bench.decode [--prompt 64] [--new 64] [--write-docs]

Both paths are warmed up once (compilation excluded), then timed over the same prompt; the tokens must agree.
"""
from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from train.decode import generate
from train.models import DeepseekV3Config, build_model

CONFIG = DeepseekV3Config(vocab_size=4096, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                          num_hidden_layers=4, num_attention_heads=8, n_shared_experts=1, n_routed_experts=8,
                          num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
                          kv_lora_rank=64, q_lora_rank=None, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32)


def tokens_per_second(model, prompt, new, cache):
    generate(model, prompt, max_new_tokens=new, cache=cache)  # compile every shape this run will meet
    start = time.perf_counter()
    out = generate(model, prompt, max_new_tokens=new, cache=cache)
    return len(out) / (time.perf_counter() - start), out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    model = build_model(CONFIG, rngs=__import__("flax").nnx.Rngs(params=0))
    prompt = np.random.default_rng(0).integers(0, CONFIG.vocab_size, args.prompt).tolist()
    rows = [f"DeepSeek-V3 tiny (d=256, 4 layers, 8 experts, kv_lora_rank=64), prompt {args.prompt}, "
            f"{args.new} new tokens, greedy, batch 1, {jax.devices()[0].platform}", "",
            "| path | tokens/s |", "|---|---|"]
    recompute, a = tokens_per_second(model, prompt, args.new, cache=False)
    cached, b = tokens_per_second(model, prompt, args.new, cache=True)
    assert a == b, "the cached and recomputed paths disagree"
    rows += [f"| recompute full forward per token | {recompute:.1f} |",
             f"| latent KV cache (c_kv + rope key) | {cached:.1f} ({cached / recompute:.1f}x) |"]
    table = "\n".join(rows)
    print(table)
    if args.write_docs:
        from bench.report import replace_section
        replace_section("docs/benchmarks.md", "bench/decode.py", table)


if __name__ == "__main__":
    main()
