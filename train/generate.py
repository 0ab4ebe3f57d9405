"""`python -m train.generate PATH`: continue a prompt, or chat, with a trained model; tokens stream to stdout.

    python -m train.generate PATH --prompt "Once upon a time" [--max-new-tokens N] [--temperature T]
                             [--top-p P] [--seed S] [--chat]

PATH is a Hugging Face checkpoint directory (config.json + safetensors + tokenizer.json) or a trainer run
directory (`train.pretrained.load_pretrained`). `--chat` reads user turns from stdin, one per line, keeps the
conversation history and renders it with the checkpoint's `chat_template` (tokenizer_config.json) or, without
one, `DEFAULT_CHAT_TEMPLATE`. The decoding itself is `train.decode.generate`.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable

import jax

from train.cli import run_job
from train.data.chat import render_chat
from train.decode import TextStream, generate
from train.pretrained import load_pretrained


def chat(model, tokenizer, lines: Iterable[str], *, template: str | None = None, out=None,
         **generate_kwargs) -> list[dict]:
    """Interactive chat: each line is a user turn; the reply to the whole history streams to `out` (default
    stdout). Returns the conversation. The template's text already carries any bos, so it is encoded without
    special tokens added."""
    out = sys.stdout if out is None else out
    variables = {"bos_token": getattr(tokenizer, "bos_token", ""), "eos_token": getattr(tokenizer, "eos_token", "")}
    messages: list[dict] = []
    for line in lines:
        line = line.rstrip("\n")
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        prompt = tokenizer.encode(render_chat(messages, template, add_generation_prompt=True, **variables))
        stream = TextStream(tokenizer, out)
        reply = generate(model, prompt, eos_id=tokenizer.stop_ids, on_token=stream, **generate_kwargs)
        out.write("\n")
        out.flush()
        messages.append({"role": "assistant", "content": tokenizer.decode(reply)})
    return messages


def main(argv=None) -> int:
    """Load PATH, then continue --prompt or chat over stdin; a user error (e.g. PATH is no model) prints one line
    and exits 2."""
    parser = argparse.ArgumentParser(prog="python -m train.generate", description=__doc__.split("\n")[0])
    parser.add_argument("path", help="Hugging Face checkpoint directory or trainer run directory")
    parser.add_argument("--prompt", default="", help="text to continue (ignored with --chat)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chat", action="store_true", help="read user turns from stdin, keep the history")
    args = parser.parse_args(argv)
    if not args.chat and not args.prompt:
        parser.error("--prompt is required without --chat")

    def job():
        model, tokenizer = load_pretrained(args.path)
        kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                      rng=jax.random.key(args.seed))
        if args.chat:
            print("chat: one user turn per line, end with Ctrl-D", file=sys.stderr)
            chat(model, tokenizer, sys.stdin, template=getattr(tokenizer, "chat_template", None), **kwargs)
            return
        prompt = tokenizer.encode(args.prompt, add_special_tokens=True)  # e.g. a Llama bos
        stream = TextStream(tokenizer, sys.stdout, prefix=prompt)
        sys.stdout.write(stream.text)
        generate(model, prompt, eos_id=tokenizer.stop_ids, on_token=stream, **kwargs)
        sys.stdout.write("\n")

    return run_job(job)


if __name__ == "__main__":
    sys.exit(main())
