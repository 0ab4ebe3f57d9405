"""Text generation for our models: greedy or temperature + nucleus (top-p) sampling, with streaming.

    tokens = generate(model, prompt_ids, max_new_tokens=64)                        # greedy
    tokens = generate(model, prompt_ids, max_new_tokens=64, temperature=0.8, top_p=0.95, rng=jax.random.key(1))

Models decode with a cache (Llama / Qwen2: keys and values; DeepSeek-V3: MLA's compressed latent c_kv and the
shared rope key): the prompt is prefilled in one call (right-padded to a power-of-two bucket), then each new
token is one jitted step over a fixed-size cache, so a cache size compiles once and every step of every prompt
that fits it reuses the same executable. `cache=False` instead recomputes the full forward over the prompt +
generated tokens at each step, right-padded to a power-of-two bucket so it compiles once per bucket (the
reference path, and what bench/decode.py compares against). Causal attention makes right padding invisible to
the real positions.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

MIN_BUCKET = 16


def _bucket(n: int) -> int:
    """The padded length for n tokens: the next power of two, at least MIN_BUCKET (bounds recompiles)."""
    return max(MIN_BUCKET, 1 << (n - 1).bit_length())


def sample_token(logits, rng, temperature, top_p, *, greedy: bool):
    """The next token from logits [vocab]: argmax when `greedy`, else a draw from softmax(logits / temperature)
    restricted to the nucleus: the smallest set of most likely tokens whose probability reaches `top_p` (always
    at least the most likely token, so a tiny top_p is greedy)."""
    if greedy:
        return jnp.argmax(logits).astype(jnp.int32)
    scaled = logits.astype(jnp.float32) / temperature
    ordered = jnp.sort(scaled)[::-1]
    probs = jax.nn.softmax(ordered)
    in_nucleus = jnp.cumsum(probs) - probs < top_p  # the mass strictly before a token is still short of top_p
    threshold = jnp.min(jnp.where(in_nucleus, ordered, jnp.inf))
    return jax.random.categorical(rng, jnp.where(scaled >= threshold, scaled, -jnp.inf)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("greedy",), donate_argnums=(2,))
def _cached_step(graphdef, state, cache, tokens, index, last, rng, temperature, top_p, *, greedy):
    """Cached decode step: tokens [1, T] at positions index.. -> (token sampled after position index + last, cache)."""
    logits, cache = nnx.merge(graphdef, state).decode(tokens, cache, index)
    return sample_token(logits[0, last], rng, temperature, top_p, greedy=greedy), cache


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("greedy",))
def _full_step(graphdef, state, tokens, last, rng, temperature, top_p, *, greedy):
    """Cache-free step: the full forward over tokens [1, bucket], sampling after position `last`."""
    logits = nnx.merge(graphdef, state)(tokens)
    return sample_token(logits[0, last], rng, temperature, top_p, greedy=greedy)


def _padded(ids: Sequence[int], length: int):
    return jnp.asarray([list(ids) + [0] * (length - len(ids))], jnp.int32)


def generate(model, prompt_ids: Sequence[int], *, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, rng=None, eos_id: int | Iterable[int] | None = None,
             on_token: Callable[[int], None] | None = None, cache: bool = True) -> list[int]:
    """Continue one prompt (a list of token ids); returns the new token ids.

    Greedy when `temperature == 0`, else temperature + nucleus sampling with `rng` (a jax key; `None` means
    `jax.random.key(0)`), folded with the step number so the same key gives the same tokens. Generation stops
    after `max_new_tokens` or at a token in `eos_id` (one id or several); the eos token itself is neither
    returned nor passed to `on_token`, which is called with every other new token as soon as it is chosen.
    `cache=False` recomputes the whole forward at each step (same tokens, slower).
    """
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise ValueError("generate needs a non-empty prompt (e.g. start with the tokenizer's bos/eos id)")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1; got temperature={temperature}, top_p={top_p}")
    stop = set() if eos_id is None else {int(eos_id)} if np.ndim(eos_id) == 0 else {int(e) for e in eos_id}
    rng = jax.random.key(0) if rng is None else rng
    greedy = temperature == 0
    temperature, top_p = jnp.float32(temperature if temperature > 0 else 1.0), jnp.float32(top_p)
    graphdef, state = nnx.split(model)
    cached = cache and hasattr(model, "init_cache")
    if cached:
        kv = model.init_cache(1, _bucket(len(prompt) + max_new_tokens))
    out: list[int] = []
    for step in range(max_new_tokens):
        key = jax.random.fold_in(rng, step)
        if cached:
            if step == 0:  # prefill: the whole (right-padded) prompt, sampling after its last real token
                tokens, index, last = _padded(prompt, _bucket(len(prompt))), 0, len(prompt) - 1
            else:
                tokens, index, last = _padded(out[-1:], 1), len(prompt) + step - 1, 0
            token, kv = _cached_step(graphdef, state, kv, tokens, jnp.int32(index), jnp.int32(last), key,
                                        temperature, top_p, greedy=greedy)
        else:
            ids = prompt + out
            token = _full_step(graphdef, state, _padded(ids, _bucket(len(ids))), jnp.int32(len(ids) - 1), key,
                               temperature, top_p, greedy=greedy)
        token = int(token)
        if token in stop:
            break
        out.append(token)
        if on_token is not None:
            on_token(token)
    return out


class TextStream:
    """`on_token` callback that writes the decoded text of the tokens so far as it grows. Decoding the whole
    sequence (not token by token) keeps multi-token characters and merged spaces right; a tail that decodes to
    an incomplete character (U+FFFD) waits for the next token."""

    def __init__(self, tokenizer, out, prefix: Sequence[int] = ()):
        """`prefix`: ids already shown (the prompt), decoded together with the new ones so that the first new
        token's leading space survives tokenizers that strip it at the start of a text."""
        self.tokenizer, self.out, self.ids = tokenizer, out, list(prefix)
        self.text = tokenizer.decode(self.ids) if self.ids else ""

    def __call__(self, token: int):
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.startswith(self.text) and not text.endswith("\ufffd"):
            self.out.write(text[len(self.text):])
            self.out.flush()
            self.text = text
