"""The input pipeline: documents → tokens → packed, shuffled, per-process batches (grain), with exact resume.

1. `load_corpus` reads documents (text files, plain or `.xz`/`.gz`; JSONL with a text field; or `.npy` arrays of
   token ids), holds out `val_fraction` of whole documents (a single-document text is split at a line near its
   end), tokenizes each split into one stream with `eos` after every document, and caches the streams by a
   hash of the source's bytes and the tokenizer.
2. `make_train_iterator` cuts the train stream into windows of `seq_len + 1` tokens, shuffles them with grain (a
   new order each epoch, from the seed), batches them and packs only this process's rows of each global batch.
   `segment_ids` change after every `eos`, so packed documents never attend to each other, and `loss_mask`
   skips predicting the next document's first token from the previous document's `eos`.
3. The iterator is a grain `DatasetIterator`: `iterator_state` / `restore_iterator` make resume exact.

Tokenizers: `byte` (UTF-8 bytes + eos, no files), `bpe` (a byte-level BPE trained on the train split with
`tokenizers`, cached), `gpt2` (tiktoken with the bundled GPT-2 ranks) or a path to any `tokenizer.json`.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import glob
import gzip
import hashlib
import json
import lzma
import os
from pathlib import Path
from typing import Callable, Protocol

import grain
import numpy as np

CORPORA = Path(__file__).resolve().parent / "corpora"
BUNDLED = {"tinyshakespeare": CORPORA / "tinyshakespeare.txt", "medium": CORPORA / "medium.jsonl.xz"}
FORMATS = ("auto", "text", "jsonl", "tokens")
EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>")
# GPT-2's pre-tokenizer regex (tiktoken's r50k_base); the ranks file holds only the merges
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class DataError(ValueError):
    """Missing, empty or unusable data; the message names the path and what to do."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: str = "tinyshakespeare"   # bundled name ("tinyshakespeare" | "medium") or a file / directory / glob
    format: str = "auto"              # "auto" (by extension) | "text" | "jsonl" | "tokens" (.npy ids)
    text_field: str = "text"          # the JSONL field holding a document
    tokenizer: str = "bpe"            # "byte" | "bpe" | "gpt2" | path to a tokenizer.json
    vocab_size: int = 4096            # size of the trained "bpe" vocabulary
    val_fraction: float = 0.05        # held-out share: whole documents, or the tail of a single document
    shuffle: bool = True

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"data.format={self.format!r}: must be one of {FORMATS}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"data.val_fraction={self.val_fraction}: must be in (0, 1)")
        if self.tokenizer == "bpe" and self.vocab_size <= 257:
            raise ValueError(f"data.vocab_size={self.vocab_size}: a byte-level BPE needs more than 257 "
                             "(256 bytes + eos)")

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
    """A `tokenizers.Tokenizer` (any tokenizer.json, or our trained BPE); eos is its end-of-text token."""

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
        return self.encoding.encode_ordinary(text)  # "<|endoftext|>" in a text is text, not eos

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(texts)

    def decode(self, ids) -> str:
        return self.encoding.decode([int(i) for i in ids])


def train_bpe(texts: list[str], vocab_size: int, path: Path) -> None:
    """Train a GPT-2-style byte-level BPE (every byte representable, eos = <|endoftext|>) and save it to `path`."""
    from tokenizers import Tokenizer as HFTok, decoders, models, pre_tokenizers, trainers
    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    _atomic_write(path, lambda tmp: tok.save(str(tmp)))


def load_tokenizer(cfg: DataConfig, cache_dir: str | os.PathLike) -> Tokenizer:
    """The configured tokenizer; "bpe" is trained on the train split of `cfg.source` once and cached."""
    return _load_tokenizer(cfg, Path(cache_dir), lambda: _split_source(cfg)[0])


def _load_tokenizer(cfg: DataConfig, cache: Path, train_docs: Callable[[], list[str]]) -> Tokenizer:
    """`load_tokenizer`, with the train documents read only if a BPE must be trained (and by the caller's reader)."""
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    if cfg.tokenizer == "gpt2":
        return TiktokenTokenizer()
    from tokenizers import Tokenizer as HFTok
    if cfg.tokenizer == "bpe":
        files = source_files(cfg)
        if _is_tokens(files, cfg):
            raise DataError(f"data.source={cfg.source!r} is pre-tokenized; set data.tokenizer to the tokenizer "
                            "that made it ('byte', 'gpt2' or a tokenizer.json), not 'bpe'")
        # the train split depends on the bytes, the split and how documents are read
        key = _digest(_files_digest(files), cfg.vocab_size, cfg.val_fraction, cfg.format, cfg.text_field)
        path = cache / f"bpe-{key}.json"
        if not path.is_file():
            train_bpe(train_docs(), cfg.vocab_size, path)
        return HFTokenizer(HFTok.from_file(str(path)), f"bpe{cfg.vocab_size}")
    path = Path(cfg.tokenizer).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"data.tokenizer={cfg.tokenizer!r}: not 'byte', 'bpe', 'gpt2' or an existing "
                        "tokenizer.json (or a directory holding one)")
    return HFTokenizer(HFTok.from_file(str(path)), str(path))


# -------------------------------------------------------------------------------------------------- sources

def source_files(cfg: DataConfig) -> list[Path]:
    """The files behind `cfg.source`: a bundled corpus, a file, every file under a directory, or a glob."""
    if cfg.source in BUNDLED:
        return [BUNDLED[cfg.source]]
    path = Path(cfg.source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    elif path.is_file():
        files = [path]
    else:
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    if not files:
        raise DataError(f"data.source={cfg.source!r}: no such file, directory or glob match. Use a bundled corpus "
                        f"({', '.join(BUNDLED)}) or a path to .txt(.xz/.gz), .jsonl(.xz/.gz) or .npy files")
    return files


def _format_of(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    suffixes = [s for s in path.suffixes if s not in (".xz", ".gz")]
    return {".jsonl": "jsonl", ".json": "jsonl", ".npy": "tokens"}.get(suffixes[-1] if suffixes else "", "text")


def _is_tokens(files: list[Path], cfg: DataConfig) -> bool:
    kinds = {_format_of(f, cfg.format) == "tokens" for f in files}
    if len(kinds) > 1:
        raise DataError(f"data.source={cfg.source!r} mixes .npy token files with text files; use one kind")
    return kinds.pop()


def _open_text(path: Path):
    opener = {".xz": lzma.open, ".gz": gzip.open}.get(path.suffix, open)
    return opener(path, "rt", encoding="utf-8", errors="replace")


def read_documents(path: Path, cfg: DataConfig) -> list[str]:
    """A text file is one document; a JSONL file holds one per line (`cfg.text_field`)."""
    with _open_text(path) as f:
        if _format_of(path, cfg.format) == "text":
            return [f.read()]
        docs = []
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)[cfg.text_field]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DataError(f"{path}:{lineno}: not a JSON object with a {cfg.text_field!r} field ({e}); "
                                "fix the line or set data.text_field") from e
            if not isinstance(doc, str):
                raise DataError(f"{path}:{lineno}: {cfg.text_field!r} is a {type(doc).__name__}, not a string")
            docs.append(doc)
        return docs


def split_documents(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """(train, val): `val_fraction` of whole documents held out, or one document's tail cut at a line boundary.

    The held-out set is fixed (independent of the run's seed), so runs that differ only in seed or optimizer are
    scored on the same documents."""
    docs = [d for d in docs if d.strip()]
    if len(docs) == 1:
        text = docs[0]
        target = int(len(text) * (1 - val_fraction))
        cut = text.rfind("\n", 0, target) + 1 or target  # no newline before the target: cut mid-line
        return [text[:cut]], [text[cut:]]
    n_val = min(len(docs) - 1, max(1, round(len(docs) * val_fraction)))
    held = set(np.random.default_rng(0).permutation(len(docs))[:n_val].tolist())
    return ([d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held])


def _split_source(cfg: DataConfig) -> tuple[list[str], list[str]]:
    files = source_files(cfg)
    docs = [d for f in files for d in read_documents(f, cfg)]
    if not any(d.strip() for d in docs):
        raise DataError(f"data.source={cfg.source!r} holds no text ({', '.join(map(str, files[:3]))}); "
                        "point it at non-empty files")
    return split_documents(docs, cfg.val_fraction)


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(repr(p).encode() + b"\0")
    return h.hexdigest()[:16]


def _files_digest(files: list[Path]) -> str:
    """A hash of the files' bytes (not their paths or mtimes), so every checkout and host shares a cache."""
    h = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            h.update(hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()[:16]


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file, so concurrent processes sharing a cache never read half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")
    write(tmp)
    tmp.replace(path)


def _tokenize(docs: list[str], tokenizer) -> np.ndarray:
    ids = tokenizer.encode_batch(docs)
    lengths = np.array([len(d) + 1 for d in ids])
    out = np.full(int(lengths.sum()), tokenizer.eos_id, np.int32)  # eos already after every document
    for start, d in zip(np.cumsum(lengths) - lengths, ids):
        out[start:start + len(d)] = d
    return out


# --------------------------------------------------------------------------------------------------- corpus

@dataclasses.dataclass
class Corpus:
    tokenizer: Tokenizer
    train: np.ndarray   # 1-D int32 token stream, documents separated by tokenizer.eos_id
    val: np.ndarray     # same for the held-out split


def load_corpus(cfg: DataConfig, cache_dir: str | os.PathLike) -> Corpus:
    """Tokenized train/val streams of `cfg.source` (cached as .npy in `cache_dir` by content and tokenizer)."""
    cache = Path(cache_dir)
    files = source_files(cfg)
    if _is_tokens(files, cfg):
        return _token_corpus(files, cfg, cache)
    split = functools.cache(lambda: _split_source(cfg))  # read (and decompress) the source at most once
    tokenizer = _load_tokenizer(cfg, cache, lambda: split()[0])
    key = _digest(_files_digest(files), cfg.format, cfg.text_field, cfg.val_fraction, cfg.tokenizer,
                  tokenizer.name, tokenizer.vocab_size,
                  tokenizer.encode("Muon, 2025: ünïcode ✓"))  # catches a tokenizer.json edited in place
    paths = {name: cache / f"tokens-{key}-{name}.npy" for name in ("train", "val")}
    if all(p.is_file() for p in paths.values()):
        return Corpus(tokenizer, np.load(paths["train"]), np.load(paths["val"]))
    train_docs, val_docs = split()
    corpus = Corpus(tokenizer, _tokenize(train_docs, tokenizer), _tokenize(val_docs, tokenizer))
    for name, path in paths.items():
        if len(getattr(corpus, name)) <= 1:
            raise DataError(f"data.source={cfg.source!r}: the {name} split tokenized to nothing; add text or "
                            "lower data.val_fraction")
        _atomic_write(path, lambda tmp, arr=getattr(corpus, name): np.save(tmp, arr))
    return corpus


def _token_corpus(files: list[Path], cfg: DataConfig, cache: Path) -> Corpus:
    """Pre-tokenized ids, concatenated; the held-out tail starts after an eos, so it holds whole documents."""
    tokens = np.concatenate([np.load(f).reshape(-1) for f in files]).astype(np.int32)
    if tokens.size < 2:
        raise DataError(f"data.source={cfg.source!r}: the token arrays ({', '.join(map(str, files[:3]))}) are "
                        "empty; point it at non-empty .npy files")
    tokenizer = load_tokenizer(cfg, cache)
    if tokens.min() < 0 or tokens.max() >= tokenizer.vocab_size:
        raise DataError(f"data.source={cfg.source!r} has ids in [{tokens.min()}, {tokens.max()}] but tokenizer "
                        f"{tokenizer.name} has {tokenizer.vocab_size}; set data.tokenizer to the one that made them")
    target = int(len(tokens) * (1 - cfg.val_fraction))
    eos_before = np.flatnonzero(tokens[:target] == tokenizer.eos_id)
    cut = int(eos_before[-1]) + 1 if eos_before.size else target  # no eos: one document, cut inside it
    return Corpus(tokenizer, tokens[:cut], tokens[cut:])


# -------------------------------------------------------------------------------------------------- batches

def pack(windows: np.ndarray, eos_id: int) -> dict[str, np.ndarray]:
    """Model inputs from windows of `seq_len + 1` consecutive stream tokens, shape [rows, seq_len + 1].

    Every eos ends its document, so a new segment starts right after it; positions restart at 0 in each segment
    (a window that starts mid-document counts from its first token). Predicting the eos is trained; predicting
    the next document's first token from the eos is not."""
    inputs, targets = windows[:, :-1].astype(np.int32), windows[:, 1:].astype(np.int32)
    is_eos = inputs == eos_id
    starts = np.zeros_like(is_eos)
    starts[:, 1:] = is_eos[:, :-1]
    segment_ids = 1 + np.cumsum(starts, axis=1, dtype=np.int32)
    col = np.arange(inputs.shape[1], dtype=np.int32)
    last_start = np.maximum.accumulate(np.where(starts, col, 0), axis=1)
    return {"inputs": inputs, "targets": targets, "segment_ids": segment_ids,
            "positions": (col - last_start).astype(np.int32), "loss_mask": (~is_eos).astype(np.float32)}


def _n_windows(tokens: np.ndarray, seq_len: int) -> int:
    return max(0, (len(tokens) - 1) // seq_len)  # window i = tokens[i*seq_len : (i+1)*seq_len + 1]


def _pack_rows(window_ids: np.ndarray, *, tokens: np.ndarray, seq_len: int, eos_id: int) -> dict:
    starts = np.asarray(window_ids) * seq_len
    return pack(tokens[starts[:, None] + np.arange(seq_len + 1)], eos_id)


def batch_iterator(n: int, make_rows, *, global_batch: int, seed: int, shuffle: bool = True, process_index: int = 0,
                   process_count: int = 1, worker_count: int = 0, what: str = "examples") -> grain.DatasetIterator:
    """An endless grain iterator of this process's rows of each global batch over `n` examples.

    Every example is seen once per epoch, in an order drawn from `seed` and the epoch. The shuffled ids are
    batched globally and `make_rows(ids)` builds only this process's rows, so P processes together see exactly
    the batches of one process and the iterator state (a batch counter) is the same on every process.
    `worker_count` > 0 builds that many batches ahead in background threads. Threads, not processes: building a
    batch is vectorised numpy over in-memory arrays, so processes would only add start-up time and copies."""
    if n < global_batch:
        raise DataError(f"the data holds {what} = {n} sequences, fewer than one global batch ({global_batch}); "
                        "use more data, a smaller seq_len or global_batch")
    if global_batch % process_count or not 0 <= process_index < process_count:
        raise DataError(f"global_batch={global_batch} must split evenly over process_count={process_count} "
                        f"(process_index={process_index})")
    rows = global_batch // process_count
    part = slice(process_index * rows, (process_index + 1) * rows)
    ds = grain.MapDataset.range(n)
    if shuffle:
        # grain seeds epoch e with seed + e; hashing the seed keeps runs with seeds s and s+1 from replaying each
        # other's epochs one epoch apart
        ds = ds.shuffle(seed=int(np.random.SeedSequence(seed).generate_state(1)[0]))
    ds = ds.repeat().batch(global_batch).map(lambda ids: make_rows(np.asarray(ids)[part]))
    # grain's default (16 threads, 500 elements ahead) would hold 500 whole batches in memory
    read = grain.ReadOptions(num_threads=worker_count, prefetch_buffer_size=2 * worker_count)
    return iter(ds.to_iter_dataset(read))


def make_train_iterator(corpus: Corpus, *, seq_len: int, global_batch: int, seed: int, process_index: int = 0,
                        process_count: int = 1, worker_count: int = 0,
                        shuffle: bool = True) -> grain.DatasetIterator:
    """An endless iterator of this process's rows of each global batch (dicts of [global_batch / P, seq_len]) over
    the windows of `seq_len + 1` tokens of the train stream; see `batch_iterator`."""
    n = _n_windows(corpus.train, seq_len)
    return batch_iterator(
        n, functools.partial(_pack_rows, tokens=corpus.train, seq_len=seq_len, eos_id=corpus.tokenizer.eos_id),
        global_batch=global_batch, seed=seed, shuffle=shuffle, process_index=process_index,
        process_count=process_count, worker_count=worker_count,
        what=f"{len(corpus.train):,} train tokens = {n} windows of {seq_len + 1}")


def iterator_state(it: grain.DatasetIterator) -> dict:
    """A JSON-serialisable position of the iterator (saved in every checkpoint)."""
    return json.loads(json.dumps(it.get_state()))


def restore_iterator(it: grain.DatasetIterator, state: dict) -> None:
    """Continue `it` (made with the same corpus, seq_len, global_batch and seed) exactly where `state` was taken."""
    it.set_state(state)


def make_val_batches(corpus: Corpus, *, seq_len: int, batch_size: int, max_batches: int | None = None) -> list[dict]:
    """Deterministic, non-overlapping validation batches over the held-out stream (last partial batch dropped)."""
    n = _n_windows(corpus.val, seq_len) // batch_size
    if n == 0:
        raise DataError(f"the validation split has {len(corpus.val):,} tokens; one batch of {batch_size} x "
                        f"{seq_len} needs {batch_size * seq_len + 1:,}. Raise data.val_fraction or lower "
                        "seq_len / the batch size")
    n = n if max_batches is None else min(n, max_batches)
    windows = np.arange(n * batch_size)[:, None] * seq_len + np.arange(seq_len + 1)
    packed = pack(corpus.val[windows], corpus.tokenizer.eos_id)
    return [{k: v[b * batch_size:(b + 1) * batch_size] for k, v in packed.items()} for b in range(n)]


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy (nats/token) of the empirical unigram distribution: the loss of a model that ignores context."""
    counts = np.bincount(tokens, minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
