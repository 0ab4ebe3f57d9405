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

Sources are read by `train.data.sources`, tokenizers made by `train.data.tokenizers`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path

import grain
import numpy as np

from train.config import DataConfig
from train.data.sources import (DataError, atomic_write, digest, files_digest, is_tokens, source_files,
                                split_source)
from train.data.tokenizers import Tokenizer, load_tokenizer, tokenizer_for_source


def tokenize_documents(docs: list[str], tokenizer) -> np.ndarray:
    """One int32 stream of all documents' ids, each followed by eos."""
    ids = tokenizer.encode_batch(docs)
    lengths = np.array([len(d) + 1 for d in ids])
    out = np.full(int(lengths.sum()), tokenizer.eos_id, np.int32)  # eos already after every document
    for start, d in zip(np.cumsum(lengths) - lengths, ids):
        out[start:start + len(d)] = d
    return out




@dataclasses.dataclass
class Corpus:
    tokenizer: Tokenizer
    train: np.ndarray   # 1-D int32 token stream, documents separated by tokenizer.eos_id
    val: np.ndarray     # same for the held-out split


def load_corpus(cfg: DataConfig, cache_dir: str | os.PathLike) -> Corpus:
    """Tokenized train/val streams of `cfg.source` (cached as .npy in `cache_dir` by content and tokenizer)."""
    cache = Path(cache_dir)
    files = source_files(cfg)
    if is_tokens(files, cfg):
        return _token_corpus(files, cfg, cache)
    split = functools.cache(lambda: split_source(cfg))  # read (and decompress) the source at most once
    tokenizer = tokenizer_for_source(cfg, cache, lambda: split()[0])
    key = digest(files_digest(files), cfg.format, cfg.text_field, cfg.val_fraction, cfg.tokenizer,
                  tokenizer.name, tokenizer.vocab_size,
                  tokenizer.encode("Muon, 2025: ünïcode ✓"))  # catches a tokenizer.json edited in place
    paths = {name: cache / f"tokens-{key}-{name}.npy" for name in ("train", "val")}
    if all(p.is_file() for p in paths.values()):
        return Corpus(tokenizer, np.load(paths["train"]), np.load(paths["val"]))
    train_docs, val_docs = split()
    corpus = Corpus(tokenizer, tokenize_documents(train_docs, tokenizer), tokenize_documents(val_docs, tokenizer))
    for name, path in paths.items():
        if len(getattr(corpus, name)) <= 1:
            raise DataError(f"data.source={cfg.source!r}: the {name} split tokenized to nothing; add text or "
                            "lower data.val_fraction")
        atomic_write(path, lambda tmp, arr=getattr(corpus, name): np.save(tmp, arr))
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
