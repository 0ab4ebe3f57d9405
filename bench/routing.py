"""Seconds `muon_jax.infer_routing` takes on abstract trees: GPT-2-124M (flax linen, 12 unrolled blocks, tied
head) and the trainer's Llama-8B (configs/llama_8b.yaml, layers scanned). Nothing is allocated: the params are
`jax.ShapeDtypeStruct`s.

    python -m bench.routing            # both, cold (the first call in the process), with their summaries
    python -m bench.routing --repeats 3   # and the best of the later (warm) calls

Targets (issue 26): < 10 s for GPT-2-124M and < 30 s for Llama-8B on this repository's CPU machines.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import yaml

import muon_jax


def gpt2_124m():
    """(fn, abstract params, abstract args) of GPT-2 small (d 768, 12 layers, 12 heads, vocab 50257, ctx 1024)."""
    import flax.linen as nn

    class Block(nn.Module):
        heads: int = 12

        @nn.compact
        def __call__(self, x):
            b, t, d = x.shape
            qkv = nn.Dense(3 * d, name="c_attn")(nn.LayerNorm(name="ln_1")(x))
            q, k, v = (a.reshape(b, t, self.heads, d // self.heads) for a in jnp.split(qkv, 3, axis=-1))
            att = jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(b, t, d)
            x = x + nn.Dense(d, name="c_proj")(att)
            h = nn.gelu(nn.Dense(4 * d, name="c_fc")(nn.LayerNorm(name="ln_2")(x)))
            return x + nn.Dense(d, name="mlp_proj")(h)

    class GPT2(nn.Module):
        @nn.compact
        def __call__(self, tokens):
            wte = nn.Embed(50257, 768, name="wte")
            x = wte(tokens) + nn.Embed(1024, 768, name="wpe")(jnp.arange(tokens.shape[1]))
            for i in range(12):
                x = Block(name=f"h_{i}")(x)
            return wte.attend(nn.LayerNorm(name="ln_f")(x))

    tokens = jax.ShapeDtypeStruct((8, 1024), jnp.int32)
    params = jax.eval_shape(GPT2().init, jax.random.key(0), tokens)

    def loss(p, tokens, targets):
        logits = GPT2().apply(p, tokens)
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1).mean()
    return loss, params, (tokens, tokens)


def llama_8b(path: str = "configs/llama_8b.yaml"):
    """(fn, abstract params, args) of the trainer's model for `path`, traced as the trainer does."""
    from flax import nnx
    from train.models import abstract_model, model_config_from_dict
    from train.step import make_loss_fn
    cfg = yaml.safe_load(open(path))
    graphdef, params, variables = nnx.split(abstract_model(model_config_from_dict(cfg["model"])), nnx.Param, ...)
    tokens = jax.ShapeDtypeStruct((1, cfg["seq_len"]), jnp.int32)
    batch = {"inputs": tokens, "targets": tokens, "segment_ids": tokens, "positions": tokens,
             "loss_mask": jax.ShapeDtypeStruct(tokens.shape, jnp.float32)}
    loss_fn = make_loss_fn(graphdef, 0.0)
    return (lambda p, v, b: loss_fn(p, v, b)[0]), params, (variables, batch)


def seconds(fn, params, args, repeats: int) -> tuple[list[float], muon_jax.Routing]:
    """Wall-clock seconds of each of `repeats` `infer_routing` calls, and the result. The first is the cold
    figure the targets are about; later calls reuse jax's caches of the inner jitted functions' traces."""
    times, routing = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        routing = muon_jax.infer_routing(fn, params, *args)
        times.append(time.perf_counter() - start)
    return times, routing


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.routing", description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    for name, build, target in (("GPT-2-124M (linen, 12 unrolled blocks)", gpt2_124m, 10.0),
                                ("Llama-8B (configs/llama_8b.yaml, trainer)", llama_8b, 30.0)):
        fn, params, fn_args = build()
        times, routing = seconds(fn, params, fn_args, args.repeats)
        warm = f", then {min(times[1:]):.2f} s warm" if len(times) > 1 else ""
        print(f"{name}: infer_routing {times[0]:.2f} s cold{warm} (target < {target:g} s); {routing.summary()}")


if __name__ == "__main__":
    main()
