"""Supervised fine-tuning (full) on chat data: pretraining's loop with another data source, loss mask and init.

    python -m train.sft --config configs/sft_tiny.yaml [key=value ...] [--stop-after N]
                        [--coordinator HOST:PORT --num-processes N --process-id I | --distributed]

`train.loop.train` runs the job, so run_dir, metrics.jsonl, TensorBoard, checkpoints, exact resume, the NaN
policy, `optimizer.name` (muon | adamw) and `muon_clip` behave as in pretraining. What differs (`sft_inputs`):

* data: `sft.train_file` (chat JSONL, see train/data/chat.py; `chat_tiny` is the bundled one) rendered with the chat
  template, loss only on assistant replies and their end-of-turn token, packed with segment ids; validation on
  `sft.val_file` or a held-out `sft.val_fraction`. The validation loss is measured before the first step too
  (`initial_val_loss` in the summary), so its drop is the fine-tuning's effect on held-out replies.
* init: `sft.init_from` is a trainer run_dir (model and tokenizer from `train.pretrained.load_run_dir`,
  default chat template) or a Hugging Face checkpoint directory (config.json + safetensors + tokenizer.json, or
  Moonlight's tiktoken.model; the chat template, bos and eos from its tokenizer_config.json), whose weights are
  read in float32 each device's part straight onto the run's mesh; `model.remat` / `model.capacity_factor` /
  `model.balance_rate` given for the run apply on top of its config.json. Empty: a random init of `model` with the `data`
  tokenizer (what configs/sft_tiny.yaml does, so it runs anywhere without a pretrained model).
* the run's config.yaml records the model and tokenizer actually used (`model` and `data` are taken from the
  init source), so the SFT run_dir is itself a source for `python -m train.generate`, `load_pretrained` and
  another `sft.init_from`.
* at the end, a greedy reply to `log.sample_prompt` as a user turn, and the final model exported to
  `sft.export_hf` (default run_dir/hf): safetensors, config.json, tokenizer.json and a tokenizer_config.json
  holding the chat template used, ready for `python -m train.generate DIR --chat`.

Multi-process (`--coordinator/--num-processes/--process-id`, as `python -m train`): the init weights are read
each process its own devices' parts, and the export gathers one layer slice at a time to process 0, which writes it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import yaml

from train import data as data_lib
from train.cli import add_distributed_args, initialize_distributed, load_checked_config, run_job
from train.config import Config, ConfigError, DataConfig, bundled_config, load_config
from train.data.chat import DEFAULT_CHAT_TEMPLATE, ChatFormat, load_chat_data, make_chat_iterator, val_batches
from train.decode import generate
from train.loop import RunInputs, train
from train.models import model_config_from_hf
from train.models.hf import load_hf_checkpoint, save_hf_checkpoint
from train.pretrained import is_hf_dir, is_run_dir, load_run_dir
from train.runtime import cache_dir, make_mesh, model_config_for

log = logging.getLogger("train")
DEFAULT_CONFIG = "sft_tiny.yaml"       # bundled (train.config.bundled_config): found from any directory
EOS_TEXT = "<|endoftext|>"              # the end-of-turn text of tokenizers that have no eos string of their own
# sft keys that decide the data a run_dir was trained on: a resume must not change them
# our own model fields that a run may set on top of a Hugging Face init (model.remat=full, ...)
HF_INIT_OWN_FIELDS = ("remat", "capacity_factor", "balance_rate")
DATA_KEYS = ("init_from", "train_file", "val_file", "val_fraction", "skip_bad_lines")


@dataclasses.dataclass
class InitSource:
    """Where fine-tuning starts: the config to run (model/data of the source), the tokenizer the loop uses, the
    chat format of the training text, and the weights (none: random init), read in `init_model` straight onto the
    run's mesh."""
    cfg: Config
    tokenizer: data_lib.Tokenizer
    chat: ChatFormat
    run_dir: Path | None = None          # a trainer run_dir's newest checkpoint
    hf_dir: Path | None = None           # a Hugging Face checkpoint directory


def chat_format(tokenizer) -> ChatFormat:
    """The built-in chat format (DEFAULT_CHAT_TEMPLATE) over a `train.data` tokenizer, whose eos string ends each
    turn: its eos token's text, or <|endoftext|> for byte / GPT-2 (their eos id has no text of its own)."""
    hf = isinstance(tokenizer, data_lib.HFTokenizer)
    eos_token = tokenizer.tokenizer.id_to_token(tokenizer.eos_id) if hf else EOS_TEXT
    return ChatFormat(tokenizer.encode, tokenizer.eos_id, eos_token)


def load_init(cfg: Config) -> InitSource:
    """Resolve `sft.init_from` into the model, tokenizer and chat format (see the module docstring)."""
    source = cfg.sft.init_from
    if not source:
        tokenizer = data_lib.load_tokenizer(cfg.data, cache_dir())
        return InitSource(cfg, tokenizer, chat_format(tokenizer))
    path = Path(source).expanduser()
    if is_run_dir(path):
        src = load_config(path / "config.yaml")
        tokenizer = data_lib.load_tokenizer(src.data, cache_dir())
        model_cfg = model_config_for(src, tokenizer)
        cfg = dataclasses.replace(cfg, model=model_cfg.to_dict(), data=src.data)
        return InitSource(cfg, tokenizer, chat_format(tokenizer), run_dir=path)
    if is_hf_dir(path):  # the weights are read in init_model, each device's part straight onto the mesh
        own = {k: cfg.model[k] for k in HF_INIT_OWN_FIELDS if k in cfg.model}
        model_cfg = model_config_from_hf(json.loads((path / "config.json").read_text()), dtype="float32",
                                         param_dtype="float32", **own)  # full fine-tuning in float32
        data_cfg = DataConfig(tokenizer=str(path.resolve()))
        tokenizer = data_lib.checkpoint_tokenizer(path)
        turn_end = getattr(tokenizer, "turn_end", tokenizer.eos_token)  # Moonlight: <|im_end|> ends a reply
        turn_end_id = tokenizer.encode(turn_end)[0] if turn_end != tokenizer.eos_token else tokenizer.eos_id
        chat = ChatFormat(tokenizer.encode, turn_end_id, turn_end, tokenizer.bos_token, tokenizer.chat_template)
        return InitSource(dataclasses.replace(cfg, model=model_cfg.to_dict(), data=data_cfg), tokenizer, chat,
                          hf_dir=path)
    raise ConfigError(f"sft.init_from={source!r} is neither a trainer run_dir (config.yaml) nor a Hugging Face "
                      "checkpoint directory (config.json + *.safetensors); leave it empty for a random init")


def check_resume(cfg: Config) -> None:
    """Refuse to continue a run_dir whose chat data settings differ (the data iterator state would not fit)."""
    saved = Path(cfg.run_dir) / "config.yaml"
    if not saved.is_file():
        return
    old = (yaml.safe_load(saved.read_text()) or {}).get("sft", {})
    for key in DATA_KEYS:
        if key in old and old[key] != getattr(cfg.sft, key):
            raise ConfigError(f"run_dir {cfg.run_dir} holds a fine-tuning run with sft.{key}={old[key]!r} (now "
                              f"{getattr(cfg.sft, key)!r}); choose a new run_dir= or restore the original setting")


def reply(model, init: InitSource, question: str, max_new_tokens: int) -> str:
    """The model's greedy answer to one user turn, rendered and encoded as in training."""
    prompt = init.chat.encode_text(init.chat.render([{"role": "user", "content": question}], True))
    return init.tokenizer.decode(generate(model, prompt, max_new_tokens=max_new_tokens, eos_id=init.chat.eos_id))


def sft_inputs(init: InitSource):
    """The `inputs` argument of `train.loop.train` for fine-tuning from `init`."""
    def inputs(cfg: Config, mesh) -> RunInputs:
        chat = load_chat_data(init.chat, train_file=cfg.sft.train_file, val_file=cfg.sft.val_file,
                              val_fraction=cfg.sft.val_fraction, seq_len=cfg.seq_len, seed=cfg.seed,
                              skip_bad_lines=cfg.sft.skip_bad_lines)
        s, t, v = chat.stats, chat.stats["train"], chat.stats["val"]
        message = (f"chat {cfg.sft.train_file}: {t['conversations']} train / {v['conversations']} val conversations "
                   f"in {t['rows']} / {v['rows']} rows ({100 * t['fill']:.0f}% filled), {t['reply_tokens']:,} "
                   f"assistant tokens; truncated to seq_len={cfg.seq_len}: {t['truncated'] + v['truncated']} "
                   f"(dropped, no reply left: {t['dropped'] + v['dropped']}); skipped: {s['bad_lines']} bad lines, "
                   f"{s['no_assistant']} without an assistant turn")
        if jax.process_index() == 0:
            print(message, flush=True)
        log.info(message)
        train_iter = make_chat_iterator(chat.train, global_batch=cfg.global_batch, seed=cfg.seed,
                                        shuffle=cfg.data.shuffle, process_index=jax.process_index(),
                                        process_count=jax.process_count())
        return RunInputs(
            init.tokenizer, train_iter, val_batches(chat.val, cfg.global_batch // cfg.grad_accum, cfg.log.eval_batches),
            f"{t['reply_tokens']:,} assistant train tokens", summary={"chat": chat.stats},
            init_model=None if init.run_dir is None and init.hf_dir is None else init_model,
            sample=lambda model: reply(model, init, cfg.log.sample_prompt, cfg.log.sample_tokens),
            eval_at_start=True)

    def init_model(model_cfg, mesh):
        if init.hf_dir is not None:
            own = {k: getattr(model_cfg, k) for k in HF_INIT_OWN_FIELDS if hasattr(model_cfg, k)}
            return load_hf_checkpoint(init.hf_dir, dtype=jnp.float32, mesh=mesh, **own)[0]
        model = load_run_dir(init.run_dir, mesh=mesh)[0]
        if model.config != model_cfg:
            raise ConfigError(f"the model of sft.init_from differs from the run's model config: {model.config} "
                              f"vs {model_cfg}")
        return model

    return inputs


def byte_tokenizer_json(path: Path) -> None:
    """Write a tokenizer.json that encodes exactly as `train.data.ByteTokenizer` (ids 0..255 are the UTF-8
    bytes, 256 is <|endoftext|>): byte-level BPE without merges over GPT-2's printable stand-ins for the bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]  # bytes that stand for themselves
    stand_in = {b: chr(b) for b in printable}
    stand_in.update({b: chr(256 + k) for k, b in enumerate(b for b in range(256) if b not in stand_in)})
    vocab = {stand_in[b]: b for b in range(256)} | {EOS_TEXT: 256}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS_TEXT])
    tok.save(str(path))


def keep_remote_code_entries(source: Path, out: Path) -> None:
    """Carry the source config.json's `auto_map` (and the code files it names, copied, never run here) into the
    exported config.json, so the export loads wherever the source did, with or without trust_remote_code."""
    import shutil
    src = json.loads((source / "config.json").read_text()) if (source / "config.json").is_file() else {}
    if not src.get("auto_map"):
        return
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "auto_map": src["auto_map"]}, indent=2))
    for file in {v.split(".")[0] + ".py" for v in src["auto_map"].values() if isinstance(v, str)}:
        if (source / file).is_file():
            shutil.copyfile(source / file, out / file)


def export_hf(run_dir: str | Path, init: InitSource, out: str | Path, mesh=None) -> Path:
    """The newest checkpoint of `run_dir` as a Hugging Face directory with its tokenizer and chat template,
    restored onto `mesh` (default: one device); with several processes, all call it and process 0 writes."""
    model, tokenizer = load_run_dir(run_dir, mesh=mesh)
    out = Path(out)
    save_hf_checkpoint(model, model.config, out)
    if jax.process_index() != 0:
        return out
    if isinstance(tokenizer, data_lib.ByteTokenizer):
        byte_tokenizer_json(out / "tokenizer.json")
    elif isinstance(tokenizer, data_lib.TiktokenDirTokenizer):  # Moonlight's format back: tiktoken.model etc.
        tokenizer.save(out, init.chat.template)
        keep_remote_code_entries(tokenizer.path, out)
        return out
    elif isinstance(tokenizer, data_lib.HFTokenizer):
        tokenizer.tokenizer.save(str(out / "tokenizer.json"))
    else:
        log.warning("no tokenizer.json written for tokenizer %s: %s holds the weights and config only",
                    tokenizer.name, out)
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": init.chat.bos_token or None, "eos_token": init.chat.eos_token,
        "chat_template": init.chat.template or DEFAULT_CHAT_TEMPLATE}, indent=2))
    return out


def sft(cfg: Config, stop_after: int | None = None) -> dict:
    """Fine-tune as `cfg` says (resuming in its run_dir); returns train()'s summary plus `export_hf` once the
    last step is done."""
    check_resume(cfg)
    init = load_init(cfg)
    summary = train(init.cfg, stop_after, inputs=sft_inputs(init))
    if summary["steps"] == cfg.steps:
        out = cfg.sft.export_hf or Path(cfg.run_dir) / "hf"
        summary["export_hf"] = str(export_hf(cfg.run_dir, init, out, make_mesh(init.cfg)))
        if jax.process_index() != 0:
            return summary
        if summary.get("initial_val_loss") is not None and summary["val_loss"] is not None:
            print(f"assistant-token val loss {summary['initial_val_loss']:.4f} → {summary['val_loss']:.4f}",
                  flush=True)
        print(f"exported to {summary['export_hf']}", flush=True)
    return summary


def main(argv=None) -> int:
    """`python -m train.sft`: parse and fine-tune; exit status 2 on a user error."""
    parser = argparse.ArgumentParser(prog="python -m train.sft", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=None, help="YAML config (default: the bundled configs/sft_tiny.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. sft.init_from=runs/tiny")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="checkpoint and exit after this many steps; rerun to continue")
    add_distributed_args(parser)
    args = parser.parse_args(argv)

    def job():
        cfg = load_checked_config(args.config or bundled_config(DEFAULT_CONFIG), args.overrides)
        initialize_distributed(args)
        sft(cfg, stop_after=args.stop_after)

    return run_job(job)


if __name__ == "__main__":
    sys.exit(main())
