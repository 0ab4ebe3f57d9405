"""Tokenizers: `byte` (UTF-8 bytes + eos, no files), `bpe` (a byte-level BPE trained on the train split with
`tokenizers`, cached), `gpt2` (tiktoken with the bundled GPT-2 ranks) or any `tokenizer.json` / checkpoint dir."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Protocol

from train.config import DataConfig
from train.data.sources import (BPE_SAMPLE_BYTES, CORPORA, PIECE_BYTES, DataError, atomic_write, digest,
                                files_digest, is_tokens, source_files, train_sample)

EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>")
# GPT-2's pre-tokenizer regex (tiktoken's r50k_base); the ranks file holds only the merges
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class Tokenizer(Protocol):
    """What the trainer needs of a tokenizer: `eos_id` separates documents; `stop_ids` end generation."""
    name: str
    vocab_size: int
    eos_id: int
    stop_ids: list[int]

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def decode(self, ids) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, eos = 256."""
    name, vocab_size, eos_id, stop_ids = "byte", 257, 256, [256]

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """UTF-8 bytes; there are no special tokens to add."""
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A `tokenizers.Tokenizer` (any tokenizer.json, or our trained BPE); eos is its end-of-text token.

    Made by `from_checkpoint(dir)`, it also carries the checkpoint's `bos_token`, `eos_token` and `chat_template`
    (tokenizer_config.json) and, in `stop_ids`, every id that ends generation (the eos token and the eos ids of
    config.json / generation_config.json)."""
    bos_token: str = ""
    chat_template: str | None = None
    skip_special_tokens: bool = False    # in decode: a checkpoint's tokenizer shows text only

    def __init__(self, tokenizer, name: str, eos_token: str | None = None):
        self.tokenizer, self.name = tokenizer, name
        self.vocab_size = tokenizer.get_vocab_size()
        candidates = (eos_token,) if eos_token else EOS_CANDIDATES
        eos = next((t for t in candidates if tokenizer.token_to_id(t) is not None), None)
        if eos is None:
            raise DataError(f"tokenizer {name} has none of the end-of-document tokens {candidates}; "
                            "add one to its tokenizer.json (added_tokens)")
        self.eos_token, self.eos_id = eos, tokenizer.token_to_id(eos)
        self.stop_ids = [self.eos_id]

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike) -> "HFTokenizer":
        """The tokenizer of a Hugging Face checkpoint directory, with its special tokens and chat template."""
        from tokenizers import Tokenizer as HFTok
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise DataError(f"{path} has no tokenizer.json; a Hugging Face checkpoint directory needs one")
        cfg = _read_json(path / "tokenizer_config.json")
        content = lambda t: t.get("content") if isinstance(t, dict) else t
        self = cls(HFTok.from_file(str(path / "tokenizer.json")), str(path.resolve()), content(cfg.get("eos_token")))
        self.bos_token = content(cfg.get("bos_token")) or ""
        template = cfg.get("chat_template")
        if isinstance(template, list):  # the multi-template form: [{"name": "default", "template": ...}]
            template = {t["name"]: t["template"] for t in template}.get("default")
        self.chat_template = template
        ids = set(self.stop_ids)
        for file in ("config.json", "generation_config.json"):
            eos = _read_json(path / file).get("eos_token_id")
            ids |= set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
        self.stop_ids = sorted(ids)
        self.skip_special_tokens = True
        return self

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=self.skip_special_tokens)


def _prepared_bpe(root: Path, vocab_size: int) -> "HFTokenizer":
    """The "bpe" tokenizer stored in a prepared directory (trained on the source it was prepared from)."""
    from tokenizers import Tokenizer as HFTok
    made = _read_json(root / "manifest.json").get("tokenizer", {})
    if made.get("name") != f"bpe{vocab_size}" or not (root / "tokenizer.json").is_file():
        raise DataError(f"{root} was prepared with tokenizer {made.get('name')} (vocab {made.get('vocab_size')}), "
                        f"not a trained bpe{vocab_size}; set data.tokenizer (and data.vocab_size) to the ones "
                        "that prepared it")
    return HFTokenizer(HFTok.from_file(str(root / "tokenizer.json")), made["name"])


def _read_json(file: Path) -> dict:
    return json.loads(file.read_text()) if file.exists() else {}


class TiktokenTokenizer:
    """GPT-2 BPE (r50k_base) from the bundled ranks file; eos = <|endoftext|> = 50256."""
    name, vocab_size, eos_id, stop_ids = "gpt2", 50257, 50256, [50256]

    def __init__(self):
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe
        ranks = load_tiktoken_bpe(str(CORPORA / "gpt2.tiktoken"))
        self.encoding = tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                          special_tokens={"<|endoftext|>": 50256})

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """GPT-2 adds no special tokens; "<|endoftext|>" in a text is text, not eos."""
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(texts)

    def decode(self, ids) -> str:
        return self.encoding.decode([int(i) for i in ids])


# The Kimi / Moonlight pre-tokenizer (`pat_str` of moonshotai's tokenization_moonshot.py / tokenization_kimi.py):
# Han runs first, letter classes with Han subtracted, digits in runs of at most 3. Taken verbatim from the copy of
# tokenization_kimi.py (Kimi-Linear-48B-A3B-Instruct, rev 919416f) found in public sources; the same string is
# quoted from Kimi-K2's tokenizer by independent reimplementations (Rust, Swift, JS) checked alongside.
KIMI_PATTERN = "|".join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"""
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"""
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])
NUM_RESERVED_SPECIAL = 256      # special ids follow the ranks: len(ranks) .. len(ranks) + 255
MAX_ENCODE_CHARS, MAX_RUN_CHARS = 400_000, 25_000   # tiktoken limits the reference tokenizer works around


def split_runs(text: str, max_run: int = MAX_RUN_CHARS):
    """Pieces of `text` with no more than `max_run` consecutive whitespace or non-whitespace characters (as
    tokenization_moonshot.py splits before calling tiktoken, which overflows on longer runs)."""
    run, is_space, start = 0, text[:1].isspace(), 0
    for i, ch in enumerate(text):
        if ch.isspace() != is_space:
            run, is_space = 1, ch.isspace()
        else:
            run += 1
            if run > max_run:
                yield text[start:i]
                start, run = i, 1
    yield text[start:]


class TiktokenDirTokenizer:
    """A Moonlight / Kimi checkpoint's tokenizer: `tiktoken.model` ranks + tokenizer_config.json, encoded with
    `tiktoken` and the Kimi pattern. Special tokens are numbered after the ranks (256 slots, names from
    `added_tokens_decoder`, the others `<|reserved_token_{id}|>`), and special-token text in a string is
    encoded as the special token, as the reference does (`allowed_special="all"`)."""
    skip_special_tokens = True

    def __init__(self, path: str | os.PathLike):
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe
        self.path = Path(path)
        ranks = load_tiktoken_bpe(str(self.path / "tiktoken.model"))
        self.config = _read_json(self.path / "tokenizer_config.json")
        added = {int(i): t["content"] for i, t in self.config.get("added_tokens_decoder", {}).items()}
        n = len(ranks)
        ids = range(n, max([n + NUM_RESERVED_SPECIAL - 1, *added]) + 1)
        self.special = {added.get(i, f"<|reserved_token_{i}|>"): i for i in ids}
        self.encoding = tiktoken.Encoding(self.path.name, pat_str=KIMI_PATTERN, mergeable_ranks=ranks,
                                          special_tokens=self.special)
        self.name, self.vocab_size = str(self.path.resolve()), self.encoding.n_vocab
        content = lambda t: t.get("content") if isinstance(t, dict) else t
        self.bos_token = content(self.config.get("bos_token")) or ""
        self.eos_token = content(self.config.get("eos_token")) or "[EOS]"
        if self.eos_token not in self.special:
            raise DataError(f"{self.path}: eos_token {self.eos_token!r} is not among the special tokens of "
                            "tokenizer_config.json's added_tokens_decoder")
        self.eos_id = self.special[self.eos_token]
        self.chat_template = self.config.get("chat_template")
        # a chat turn ends with <|im_end|> (Moonlight's template), which must also stop generation
        self.turn_end = "<|im_end|>" if "<|im_end|>" in self.special and "<|im_end|>" in (
            self.chat_template or "") else self.eos_token
        stop = {self.eos_id, self.special[self.turn_end]}
        for file in ("config.json", "generation_config.json"):
            eos = _read_json(self.path / file).get("eos_token_id")
            stop |= set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
        self.stop_ids = sorted(stop)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids; special-token text becomes its id. Nothing is prepended (the reference adds no bos)."""
        out = []
        for i in range(0, len(text), MAX_ENCODE_CHARS):
            for piece in split_runs(text[i:i + MAX_ENCODE_CHARS]):
                out += self.encoding.encode(piece, allowed_special="all")
        return out

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        """Text of the ids; special tokens are left out (a checkpoint's tokenizer shows text only)."""
        specials = set(self.special.values())
        return self.encoding.decode([int(i) for i in ids if int(i) not in specials or not self.skip_special_tokens])

    def save(self, out: str | os.PathLike, chat_template: str | None = None) -> None:
        """Write tiktoken.model and tokenizer_config.json (all original keys kept: added_tokens_decoder,
        auto_map, tokenizer_class, ...) into `out`, with `chat_template` if given."""
        import shutil
        out = Path(out)
        shutil.copyfile(self.path / "tiktoken.model", out / "tiktoken.model")
        config = dict(self.config, chat_template=chat_template or self.chat_template)
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))


def checkpoint_tokenizer(path: str | os.PathLike):
    """The tokenizer of a checkpoint directory: `TiktokenDirTokenizer` when it holds tiktoken.model (Moonlight /
    Kimi), else `HFTokenizer.from_checkpoint` (tokenizer.json)."""
    path = Path(path)
    if (path / "tiktoken.model").is_file():
        return TiktokenDirTokenizer(path)
    return HFTokenizer.from_checkpoint(path)


def train_bpe(texts: list[str], vocab_size: int, path: Path) -> None:
    """Train a GPT-2-style byte-level BPE (every byte representable, eos = <|endoftext|>) and save it to `path`."""
    from tokenizers import Tokenizer as HFTok, decoders, models, pre_tokenizers, trainers
    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    atomic_write(path, lambda tmp: tok.save(str(tmp)))


def load_tokenizer(cfg: DataConfig, cache_dir: str | os.PathLike) -> Tokenizer:
    """The configured tokenizer; "bpe" is trained once on the start of the train split of `cfg.source` (at most
    BPE_SAMPLE_BYTES, so memory stays bounded whatever the corpus size) and cached."""
    return tokenizer_for_source(cfg, Path(cache_dir), lambda: train_sample(cfg))


def tokenizer_for_source(cfg: DataConfig, cache: Path, train_docs: Callable[[], list[str]]) -> Tokenizer:
    """`load_tokenizer`, with the train documents read only if a BPE must be trained (and by the caller's reader)."""
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    if cfg.tokenizer == "gpt2":
        return TiktokenTokenizer()
    from tokenizers import Tokenizer as HFTok
    prepared = Path(cfg.source).expanduser()
    if cfg.tokenizer == "bpe" and (prepared / "manifest.json").is_file():
        return _prepared_bpe(prepared, cfg.vocab_size)
    if cfg.tokenizer == "bpe":
        files = source_files(cfg)
        if is_tokens(files, cfg):
            raise DataError(f"data.source={cfg.source!r} is pre-tokenized; set data.tokenizer to the tokenizer "
                            "that made it ('byte', 'gpt2' or a tokenizer.json), not 'bpe'")
        # the train split depends on the bytes, the split and how documents are read
        key = digest(files_digest(files), cfg.vocab_size, cfg.val_fraction, cfg.format, cfg.text_field,
                     "sample", BPE_SAMPLE_BYTES, PIECE_BYTES)
        path = cache / f"bpe-{key}.json"
        if not path.is_file():
            train_bpe(train_docs(), cfg.vocab_size, path)
        return HFTokenizer(HFTok.from_file(str(path)), f"bpe{cfg.vocab_size}")
    path = Path(cfg.tokenizer).expanduser()
    if path.is_dir():  # a checkpoint directory: its special tokens and chat template come along
        return checkpoint_tokenizer(path)
    if not path.is_file():
        raise DataError(f"data.tokenizer={cfg.tokenizer!r}: not 'byte', 'bpe', 'gpt2' or an existing "
                        "tokenizer.json (or a directory holding one)")
    return HFTokenizer(HFTok.from_file(str(path)), str(path))
