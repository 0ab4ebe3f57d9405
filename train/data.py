"""The input pipeline: documents → tokens → packed, shuffled, sharded batches (grain), with exact resume.

1. `load_corpus` reads documents (text files, optionally `.xz`/`.gz`; JSONL with a text field; or a `.npy` of
   pre-tokenized ids), holds out `val_fraction` of whole documents (a single-document text is split at a line
   near its end), tokenizes both splits into one stream each with `eos` after every document, and caches the
   token arrays by content hash.
2. `make_train_iterator` cuts the train stream into windows of `seq_len + 1` tokens, shuffles them with grain
   (a new order each epoch, from the seed), batches them, and gives each process its rows of every global
   batch. Each example carries `segment_ids` that change after every `eos`, so packed documents never attend
   to each other, and a `loss_mask` that skips predicting the first token of the next document.
3. The iterator is a grain `DatasetIterator`: `iterator_state` / `restore_iterator` make resume exact.

Tokenizers: `byte` (UTF-8 bytes + eos, no files), `bpe` (a byte-level BPE trained on the train split with
`tokenizers`, cached), `gpt2` (tiktoken with the bundled GPT-2 ranks) or a path to any `tokenizer.json`.
"""
from __future__ import annotations

import dataclasses
import difflib
import glob
import gzip
import hashlib
import json
import lzma
import os
from pathlib import Path
from typing import Iterable, Protocol

import grain
import numpy as np

CORPORA = Path(__file__).resolve().parent / "corpora"
BUNDLED = {"tinyshakespeare": CORPORA / "tinyshakespeare.txt", "medium": CORPORA / "medium.jsonl.xz"}
FORMATS = ("auto", "text", "jsonl", "tokens")
EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>")
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class DataError(ValueError):
    """Missing, empty or unreadable data; the message names the path and the fix."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: str = "tinyshakespeare"   # bundled name ("tinyshakespeare" | "medium") or a file / directory / glob
    format: str = "auto"              # "auto" (by extension) | "text" | "jsonl" | "tokens" (.npy ids)
    text_field: str = "text"          # the JSONL field holding a document
    tokenizer: str = "bpe"            # "byte" | "bpe" | "gpt2" | path to a tokenizer.json
    vocab_size: int = 4096            # size of the trained "bpe" vocabulary
    val_fraction: float = 0.05        # held-out share of documents (or of a single document's lines)
    shuffle: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> "DataConfig":
        valid = [f.name for f in dataclasses.fields(cls)]
        for key in d:
            if key not in valid:
                close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
                raise ValueError(f"unknown data key {key!r}: " + (
                    f"did you mean {', '.join(map(repr, close))}?" if close else f"valid keys: {valid}"))
        return cls(**d)


# ----------------------------------------------------------------------------------------------- tokenizers

class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, eos = 256."""
    name, vocab_size, eos_id = "byte", 257, 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A `tokenizers.Tokenizer` (any tokenizer.json, or our trained BPE)."""

    def __init__(self, tokenizer, name: str):
        self.tokenizer, self.name = tokenizer, name
        self.vocab_size = tokenizer.get_vocab_size()
        eos = next((t for t in EOS_CANDIDATES if tokenizer.token_to_id(t) is not None), None)
        if eos is None:
            raise DataError(f"tokenizer {name} has none of the end-of-document tokens {EOS_CANDIDATES}; "
                            "add one to its tokenizer.json (added_tokens)")
        self.eos_id = tokenizer.token_to_id(eos)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


class TiktokenTokenizer:
    """GPT-2 BPE (r50k_base) from the bundled ranks file; eos = <|endoftext|> = 50256."""
    name, vocab_size, eos_id = "gpt2", 50257, 50256

    def __init__(self):
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe
        ranks = load_tiktoken_bpe(str(CORPORA / "gpt2.tiktoken"))
        self.encoding = tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                          special_tokens={"<|endoftext|>": 50256})

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(texts)

    def decode(self, ids) -> str:
        return self.encoding.decode([int(i) for i in ids])


def train_bpe(texts: list[str], vocab_size: int, path: Path) -> None:
    from tokenizers import Tokenizer as HFTok, decoders, models, pre_tokenizers, trainers
    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tok.save(str(tmp))
    tmp.replace(path)  # atomic: concurrent runs never read half a file


# -------------------------------------------------------------------------------------------------- sources

def _open_text(path: Path):
    if path.suffix == ".xz":
        return lzma.open(path, "rt", encoding="utf-8", errors="replace")
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def _format_of(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    suffixes = [s for s in path.suffixes if s not in (".xz", ".gz")]
    ext = suffixes[-1] if suffixes else ""
    return {".jsonl": "jsonl", ".json": "jsonl", ".npy": "tokens"}.get(ext, "text")


def source_files(cfg: DataConfig) -> list[Path]:
    if cfg.source in BUNDLED:
        return [BUNDLED[cfg.source]]
    path = Path(cfg.source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    elif path.is_file():
        files = [path]
    else:
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    if not files:
        raise DataError(f"data.source={cfg.source!r}: no such file, directory or glob match. Use a bundled corpus "
                        f"({', '.join(BUNDLED)}) or a path to .txt(.xz/.gz), .jsonl(.xz/.gz) or .npy files")
    return files


def read_documents(path: Path, cfg: DataConfig) -> list[str]:
    fmt = _format_of(path, cfg.format)
    if fmt == "text":
        with _open_text(path) as f:
            return [f.read()]
    docs = []
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                docs.append(json.loads(line)[cfg.text_field])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DataError(f"{path}:{lineno}: not a JSON object with a {cfg.text_field!r} field ({e}); "
                                "fix the line or set data.text_field") from e
    return docs


def split_documents(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Hold out whole documents (a fixed, seed-independent choice); one document is split at a line near its end."""
    docs = [d for d in docs if d.strip()]
    if len(docs) == 1:
        text = docs[0]
        cut = text.rfind("\n", 0, int(len(text) * (1 - val_fraction)))
        cut = cut + 1 if cut > 0 else int(len(text) * (1 - val_fraction))
        return [text[:cut]], [text[cut:]]
    order = np.random.default_rng(0).permutation(len(docs))
    n_val = max(1, round(len(docs) * val_fraction))
    val_ids = set(order[:n_val].tolist())
    return ([d for i, d in enumerate(docs) if i not in val_ids], [d for i, d in enumerate(docs) if i in val_ids])


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
    return h.hexdigest()[:16]


def _files_digest(files: list[Path]) -> str:
    return _digest(*[f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files])


def load_tokenizer(cfg: DataConfig, cache_dir, train_docs: list[str] | None = None) -> Tokenizer:
    """The configured tokenizer; "bpe" is trained on the train split of `cfg.source` once and cached."""
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    if cfg.tokenizer == "gpt2":
        return TiktokenTokenizer()
    from tokenizers import Tokenizer as HFTok
    if cfg.tokenizer == "bpe":
        cache = Path(cache_dir)
        cache.mkdir(parents=True, exist_ok=True)
        files = source_files(cfg)
        path = cache / f"bpe-{_digest(_files_digest(files), cfg.vocab_size, cfg.val_fraction, cfg.text_field)}.json"
        if not path.is_file():
            if train_docs is None:
                train_docs = split_documents(_all_documents(files, cfg), cfg.val_fraction)[0]
            train_bpe(train_docs, cfg.vocab_size, path)
        return HFTokenizer(HFTok.from_file(str(path)), f"bpe{cfg.vocab_size}")
    path = Path(cfg.tokenizer).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"data.tokenizer={cfg.tokenizer!r}: not 'byte', 'bpe', 'gpt2' or an existing tokenizer.json")
    return HFTokenizer(HFTok.from_file(str(path)), str(path))


def _all_documents(files: list[Path], cfg: DataConfig) -> list[str]:
    docs = [d for f in files for d in read_documents(f, cfg)]
    if not any(d.strip() for d in docs):
        raise DataError(f"data.source={cfg.source!r} holds no text ({', '.join(map(str, files[:3]))}); "
                        "point it at non-empty files")
    return docs


def _tokenize(docs: Iterable[str], tokenizer) -> np.ndarray:
    out = []
    for ids in tokenizer.encode_batch(list(docs)):
        out.append(np.asarray(ids, np.int32))
        out.append(np.asarray([tokenizer.eos_id], np.int32))
    return np.concatenate(out) if out else np.zeros(0, np.int32)


# --------------------------------------------------------------------------------------------------- corpus

@dataclasses.dataclass
class Corpus:
    tokenizer: Tokenizer
    train: np.ndarray   # 1-D int32 stream, eos after every document
    val: np.ndarray


def load_corpus(cfg: DataConfig, cache_dir) -> Corpus:
    """Tokenized train/val streams of `cfg.source` (cached in `cache_dir` by content and tokenizer)."""
    files = source_files(cfg)
    if all(_format_of(f, cfg.format) == "tokens" for f in files):
        return _token_corpus(files, cfg)
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    docs = None
    if cfg.tokenizer == "bpe":
        docs = _all_documents(files, cfg)
        tokenizer = load_tokenizer(cfg, cache, split_documents(docs, cfg.val_fraction)[0])
    else:
        tokenizer = load_tokenizer(cfg, cache)
    key = _digest(_files_digest(files), tokenizer.name, tokenizer.vocab_size, cfg.val_fraction, cfg.text_field,
                  cfg.format, cfg.tokenizer)
    path = cache / f"tokens-{key}.npz"
    if path.is_file():
        arrays = np.load(path)
        return Corpus(tokenizer, arrays["train"], arrays["val"])
    train_docs, val_docs = split_documents(docs or _all_documents(files, cfg), cfg.val_fraction)
    corpus = Corpus(tokenizer, _tokenize(train_docs, tokenizer), _tokenize(val_docs, tokenizer))
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npz")
    np.savez(tmp, train=corpus.train, val=corpus.val)
    tmp.replace(path)
    return corpus


def _token_corpus(files: list[Path], cfg: DataConfig) -> Corpus:
    """Pre-tokenized ids: the stream's last `val_fraction` is validation; the tokenizer must still be named."""
    tokens = np.concatenate([np.load(f).reshape(-1).astype(np.int32) for f in files])
    if tokens.size == 0:
        raise DataError(f"data.source={cfg.source!r}: the token arrays are empty")
    tokenizer = load_tokenizer(cfg, Path.home() / ".cache" / "muon-jax")
    if tokens.max() >= tokenizer.vocab_size or tokens.min() < 0:
        raise DataError(f"data.source={cfg.source!r} has ids in [{tokens.min()}, {tokens.max()}] but tokenizer "
                        f"{tokenizer.name} has {tokenizer.vocab_size}; set data.tokenizer to the one that made them")
    cut = int(len(tokens) * (1 - cfg.val_fraction))
    return Corpus(tokenizer, tokens[:cut], tokens[cut:])


# -------------------------------------------------------------------------------------------------- batches

def pack_window(window: np.ndarray, eos_id: int) -> dict[str, np.ndarray]:
    """One example from `seq_len + 1` consecutive tokens of a packed stream."""
    inputs, targets = window[:-1], window[1:]
    is_eos = inputs == eos_id
    # a new segment starts right after every eos: eos belongs to the document it ends
    segment_ids = 1 + np.concatenate([[0], np.cumsum(is_eos[:-1])]).astype(np.int32)
    starts = np.flatnonzero(np.concatenate([[True], segment_ids[1:] != segment_ids[:-1]]))
    positions = np.arange(len(inputs)) - np.repeat(starts, np.diff(np.append(starts, len(inputs))))
    return {"inputs": inputs.astype(np.int32), "targets": targets.astype(np.int32), "segment_ids": segment_ids,
            "positions": positions.astype(np.int32), "loss_mask": (~is_eos).astype(np.float32)}


def _windows(tokens: np.ndarray, seq_len: int) -> int:
    return max(0, (len(tokens) - 1) // seq_len)


def make_train_iterator(corpus: Corpus, *, seq_len: int, global_batch: int, seed: int, process_index: int = 0,
                        process_count: int = 1, shuffle: bool = True) -> grain.DatasetIterator:
    """An endless iterator of this process's rows of each global batch (dicts of [B / P, seq_len] arrays)."""
    n = _windows(corpus.train, seq_len)
    if n < global_batch:
        raise DataError(f"the train split has {len(corpus.train):,} tokens = {n} windows of {seq_len + 1}, fewer than "
                        f"one global batch ({global_batch}); use more data, a smaller seq_len or global_batch")
    if global_batch % process_count:
        raise DataError(f"global_batch={global_batch} is not divisible by the {process_count} processes")
    tokens, eos, rows = corpus.train, corpus.tokenizer.eos_id, global_batch // process_count
    ds = grain.MapDataset.range(n)
    if shuffle:
        ds = ds.shuffle(seed=seed)  # grain reshuffles each epoch when indexed past the end (below, via repeat)
    ds = ds.repeat(None).map(lambda i: pack_window(tokens[i * seq_len:(i + 1) * seq_len + 1], eos))
    ds = ds.batch(global_batch, drop_remainder=True).map(
        lambda b: {k: v[process_index * rows:(process_index + 1) * rows] for k, v in b.items()})
    return iter(ds.to_iter_dataset())


def iterator_state(iterator: grain.DatasetIterator) -> dict:
    """A JSON-serialisable position of the iterator (saved in every checkpoint)."""
    return json.loads(json.dumps(iterator.get_state()))


def restore_iterator(iterator: grain.DatasetIterator, state: dict) -> None:
    iterator.set_state(state)


def make_val_batches(corpus: Corpus, *, seq_len: int, batch_size: int, max_batches: int | None = None) -> list[dict]:
    """Deterministic, non-overlapping validation batches over the held-out stream (last partial batch dropped)."""
    n = _windows(corpus.val, seq_len) // batch_size
    if n == 0:
        raise DataError(f"the validation split has {len(corpus.val):,} tokens; one batch needs "
                        f"{batch_size * seq_len + 1:,}. Raise data.val_fraction or lower seq_len/global_batch")
    n = n if max_batches is None else min(n, max_batches)
    eos = corpus.tokenizer.eos_id
    batches = []
    for b in range(n):
        rows = [pack_window(corpus.val[i * seq_len:(i + 1) * seq_len + 1], eos)
                for i in range(b * batch_size, (b + 1) * batch_size)]
        batches.append({k: np.stack([r[k] for r in rows]) for k in rows[0]})
    return batches


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy (nats/token) of the empirical unigram distribution: the loss of a model that ignores context."""
    counts = np.bincount(tokens, minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
