"""The input pipeline: a prepared corpus → packed, shuffled, per-process batches (grain), with exact resume.

1. `load_corpus` opens a prepared directory (`train.data.shards`: ArrayRecord shards of token ids, made by
   `python -m train.prepare_data`). Any other source (text, JSONL, `.xz`/`.gz`, `.npy` ids, the bundled corpora) is
   prepared into the cache first by the same streaming code (`train.data.prepare`), keyed by a hash of the
   source's bytes and the tokenizer, so there is one data path. Nothing is loaded up front: the train and val
   splits (documents held out by hash) are `TokenStream`s read by random access.
2. `make_train_iterator` cuts the train stream into windows of `seq_len + 1` tokens, shuffles their indices with
   grain (a new order each epoch, from the seed), batches them and reads and packs only this process's rows of
   each global batch. `segment_ids` change after every `eos`, so packed documents never attend to each other,
   and `loss_mask` skips predicting the next document's first token from the previous document's `eos`.
3. The iterator is a grain `DatasetIterator`: `iterator_state` / `restore_iterator` make resume exact.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from pathlib import Path

import grain
import numpy as np

from train.config import DataConfig
from train.data.prepare import prepare
from train.data.shards import (CHUNK_TOKENS, FORMAT, TokenStream, check_tokenizer, is_prepared, read_manifest,
                               tokenizer_record)
from train.data.sources import PIECE_BYTES, DataError, digest, files_digest, source_files
from train.data.tokenizers import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Corpus:
    tokenizer: Tokenizer
    train: TokenStream   # token stream, documents separated by tokenizer.eos_id
    val: TokenStream     # same for the held-out documents


def load_corpus(cfg: DataConfig, cache_dir: str | os.PathLike) -> Corpus:
    """The train/val streams of `cfg.source`: a prepared directory, or any other source prepared into
    `cache_dir` on first use (all local cores, bounded memory)."""
    cache = Path(cache_dir)
    if is_prepared(cfg.source):
        root = Path(cfg.source).expanduser()
        manifest = read_manifest(root)
        tokenizer = _prepared_tokenizer(cfg, root, manifest, cache)
    else:
        tokenizer = load_tokenizer(cfg, cache)
        key = digest(files_digest(source_files(cfg)), cfg.format, cfg.text_field, cfg.val_fraction,
                     cfg.skip_bad_lines, cfg.tokenizer, tokenizer_record(tokenizer), FORMAT, CHUNK_TOKENS,
                     PIECE_BYTES, [str(f.resolve()) for f in source_files(cfg)])  # the plan records the paths
        root = cache / f"prepared-{key}"
        if not is_prepared(root):
            log.info("preparing data.source=%s into %s (once; python -m train.prepare_data does this ahead)",
                     cfg.source, root)
        manifest = prepare(cfg, root, tokenizer)
    return Corpus(tokenizer, TokenStream(root, manifest, "train"), TokenStream(root, manifest, "val"))


def _prepared_tokenizer(cfg: DataConfig, root: Path, manifest: dict, cache: Path) -> Tokenizer:
    """The configured tokenizer ("bpe": the one stored in `root`), checked against the one that prepared `root`."""
    tokenizer = load_tokenizer(cfg, cache)
    check_tokenizer(manifest, tokenizer, str(root), cfg.tokenizer)
    return tokenizer


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


def _n_windows(tokens, seq_len: int) -> int:
    return max(0, (len(tokens) - 1) // seq_len)  # window i = tokens[i*seq_len : (i+1)*seq_len + 1]


def _windows(tokens, starts: np.ndarray, length: int) -> np.ndarray:
    if isinstance(tokens, TokenStream):
        return tokens.read(starts, length)
    return np.asarray(tokens)[np.asarray(starts)[:, None] + np.arange(length)]


def _pack_rows(window_ids: np.ndarray, *, tokens, seq_len: int, eos_id: int) -> dict:
    return pack(_windows(tokens, np.asarray(window_ids, np.int64) * seq_len, seq_len + 1), eos_id)


def batch_iterator(n: int, make_rows, *, global_batch: int, seed: int, shuffle: bool = True, process_index: int = 0,
                   process_count: int = 1, worker_count: int = 0, prefetch: int = 2,
                   what: str = "examples") -> grain.DatasetIterator:
    """An endless grain iterator of this process's rows of each global batch over `n` examples.

    Every example is seen once per epoch, in an order drawn from `seed` and the epoch. The shuffled ids are
    batched globally and `make_rows(ids)` builds only this process's rows, so P processes together see exactly
    the batches of one process and the iterator state (a batch counter) is the same on every process.
    `worker_count` > 0 builds batches in that many background threads, `prefetch` per thread ahead. Threads, not
    processes: a batch is a few dozen record reads and vectorised numpy, both of which release the GIL."""
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
    read = grain.ReadOptions(num_threads=worker_count, prefetch_buffer_size=prefetch * worker_count)
    return iter(ds.to_iter_dataset(read))


def make_train_iterator(corpus: Corpus, *, seq_len: int, global_batch: int, seed: int, process_index: int = 0,
                        process_count: int = 1, worker_count: int = 0, prefetch: int = 2,
                        shuffle: bool = True) -> grain.DatasetIterator:
    """An endless iterator of this process's rows of each global batch (dicts of [global_batch / P, seq_len]) over
    the windows of `seq_len + 1` tokens of the train stream; see `batch_iterator`."""
    n = _n_windows(corpus.train, seq_len)
    return batch_iterator(
        n, functools.partial(_pack_rows, tokens=corpus.train, seq_len=seq_len, eos_id=corpus.tokenizer.eos_id),
        global_batch=global_batch, seed=seed, shuffle=shuffle, process_index=process_index,
        process_count=process_count, worker_count=worker_count, prefetch=prefetch,
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
    packed = pack(_windows(corpus.val, np.arange(n * batch_size) * seq_len, seq_len + 1), corpus.tokenizer.eos_id)
    return [{k: v[b * batch_size:(b + 1) * batch_size] for k, v in packed.items()} for b in range(n)]


def unigram_entropy(tokens, vocab_size: int) -> float:
    """Entropy (nats/token) of the empirical unigram distribution: the loss of a model that ignores context.
    A prepared stream's counts were taken while preparing it, so this reads no tokens."""
    counts = getattr(tokens, "unigram_counts", None)
    counts = np.bincount(tokens, minlength=vocab_size) if counts is None else counts
    counts = counts.astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
