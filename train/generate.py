"""Text generation for our models: greedy or temperature + nucleus (top-p) sampling, with streaming.

    tokens = generate(model, prompt_ids, max_new_tokens=64)                        # greedy
    tokens = generate(model, prompt_ids, max_new_tokens=64, temperature=0.8, top_p=0.95, rng=jax.random.key(1))

Dense Llama / Qwen2 models decode with a KV cache: the prompt is prefilled in one call (right-padded to a
power-of-two bucket), then each new token is one jitted step over a fixed-size cache, so a cache size compiles
once and every step of every prompt that fits it reuses the same executable. DeepSeek-V3 (MLA/MoE) has no cache
here: each step recomputes the full forward over the prompt + generated tokens, right-padded to a power-of-two
bucket so it compiles once per bucket. Causal attention makes right padding invisible to the real positions.

CLI (tokens stream to stdout as they are produced):

    python -m train.generate PATH --prompt "Once upon a time" [--max-new-tokens N] [--temperature T]
                             [--top-p P] [--seed S] [--chat]

PATH is a Hugging Face checkpoint directory (config.json + safetensors + tokenizer.json) or a trainer run
directory (via `train.checkpoint.load_for_inference`). `--chat` reads user turns from stdin, one per line, keeps
the conversation history and renders it with the checkpoint's `chat_template` (tokenizer_config.json) or, without
one, `DEFAULT_CHAT_TEMPLATE`.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from train.models import Llama

# The built-in chat format (used when a checkpoint has no chat_template, and by our SFT data): every message is
# "<|role|>\n" + content + eos_token + "\n", and the generation prompt is "<|assistant|>\n". `eos_token` is
# whatever the caller passes to `render_chat` ("" when not given): training text that ends each turn with the
# tokenizer's eos string teaches the model to emit eos, which is where `generate` stops.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

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
    """Llama decode step: tokens [1, T] at positions index.. -> (token sampled after position index + last, cache)."""
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
             on_token: Callable[[int], None] | None = None) -> list[int]:
    """Continue one prompt (a list of token ids); returns the new token ids.

    Greedy when `temperature == 0`, else temperature + nucleus sampling with `rng` (a jax key; `None` means
    `jax.random.key(0)`), folded with the step number so the same key gives the same tokens. Generation stops
    after `max_new_tokens` or at a token in `eos_id` (one id or several); the eos token itself is neither
    returned nor passed to `on_token`, which is called with every other new token as soon as it is chosen.
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
    cached = isinstance(model, Llama)
    if cached:
        cache = model.init_cache(1, _bucket(len(prompt) + max_new_tokens))
    out: list[int] = []
    for step in range(max_new_tokens):
        key = jax.random.fold_in(rng, step)
        if cached:
            if step == 0:  # prefill: the whole (right-padded) prompt, sampling after its last real token
                tokens, index, last = _padded(prompt, _bucket(len(prompt))), 0, len(prompt) - 1
            else:
                tokens, index, last = _padded(out[-1:], 1), len(prompt) + step - 1, 0
            token, cache = _cached_step(graphdef, state, cache, tokens, jnp.int32(index), jnp.int32(last), key,
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


def render_chat(messages: Sequence[dict], template: str | None = None, add_generation_prompt: bool = True,
                **variables) -> str:
    """Render a conversation ([{"role": ..., "content": ...}, ...]) with a jinja2 chat template, the way
    transformers' `apply_chat_template` does (sandboxed, trim_blocks, lstrip_blocks). `template=None` uses
    DEFAULT_CHAT_TEMPLATE; `variables` (e.g. bos_token, eos_token) are passed to the template, and
    bos_token / eos_token default to ""."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    context = {"bos_token": "", "eos_token": "", **variables}
    return env.from_string(template or DEFAULT_CHAT_TEMPLATE).render(
        messages=list(messages), add_generation_prompt=add_generation_prompt, **context)


class CheckpointTokenizer:
    """A Hugging Face `tokenizer.json` (via the `tokenizers` package) with the checkpoint's special tokens."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        cfg = _read_json(path / "tokenizer_config.json")
        token = lambda t: t.get("content") if isinstance(t, dict) else t
        self.bos_token, self.eos_token = token(cfg.get("bos_token")) or "", token(cfg.get("eos_token")) or ""
        self.chat_template = cfg.get("chat_template")
        if isinstance(self.chat_template, list):  # the multi-template form: [{"name": "default", "template": ...}]
            self.chat_template = {t["name"]: t["template"] for t in self.chat_template}.get("default")
        # every id that ends generation: tokenizer eos, config.json and generation_config.json eos ids
        ids = {self.tokenizer.token_to_id(self.eos_token)} if self.eos_token else set()
        for file in ("config.json", "generation_config.json"):
            eos = _read_json(path / file).get("eos_token_id")
            ids |= set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
        self.eos_id = sorted(i for i in ids if i is not None)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def _read_json(file: Path) -> dict:
    return json.loads(file.read_text()) if file.exists() else {}


def load(path) -> tuple:
    """(model, tokenizer) from a Hugging Face checkpoint directory or a trainer run directory."""
    path = Path(path)
    if (path / "config.json").exists() and any(path.glob("*.safetensors")):
        from train.hf import load_hf_checkpoint

        if not (path / "tokenizer.json").exists():
            raise FileNotFoundError(f"{path} has no tokenizer.json (needed to encode the prompt)")
        return load_hf_checkpoint(path)[0], CheckpointTokenizer(path)
    from train.checkpoint import load_for_inference  # the trainer's run directories (config.yaml + checkpoints)

    return load_for_inference(path)


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


def chat(model, tokenizer, lines: Iterable[str], *, template: str | None = None, out=None,
         **generate_kwargs) -> list[dict]:
    """Interactive chat: each line is a user turn; the reply to the whole history streams to `out` (default
    stdout). Returns the conversation. The template's text already carries any bos, so HF tokenizers encode it
    without adding one."""
    out = sys.stdout if out is None else out
    hf = isinstance(tokenizer, CheckpointTokenizer)
    encode = (lambda s: tokenizer.encode(s, add_special_tokens=False)) if hf else tokenizer.encode
    variables = {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token} if hf else {}
    messages: list[dict] = []
    for line in lines:
        line = line.rstrip("\n")
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        prompt = encode(render_chat(messages, template, add_generation_prompt=True, **variables))
        stream = TextStream(tokenizer, out)
        reply = generate(model, prompt, eos_id=tokenizer.eos_id, on_token=stream, **generate_kwargs)
        out.write("\n")
        out.flush()
        messages.append({"role": "assistant", "content": tokenizer.decode(reply)})
    return messages


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m train.generate", description=__doc__.split("\n")[0])
    parser.add_argument("path", help="Hugging Face checkpoint directory or trainer run directory")
    parser.add_argument("--prompt", default="", help="text to continue (ignored with --chat)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chat", action="store_true", help="read user turns from stdin, keep the history")
    args = parser.parse_args(argv)
    model, tokenizer = load(args.path)
    kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                  rng=jax.random.key(args.seed))
    if args.chat:
        print("chat: one user turn per line, end with Ctrl-D", file=sys.stderr)
        chat(model, tokenizer, sys.stdin, template=getattr(tokenizer, "chat_template", None), **kwargs)
        return
    if not args.prompt:
        parser.error("--prompt is required without --chat")
    prompt = tokenizer.encode(args.prompt)
    stream = TextStream(tokenizer, sys.stdout, prefix=prompt)
    sys.stdout.write(stream.text)
    generate(model, prompt, eos_id=tokenizer.eos_id, on_token=stream, **kwargs)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
