"""Tokenize a corpus once into a prepared directory (see `train.data.shards` for the format).

The source (`data.source`: files, directories, globs; text, JSONL, `.xz`/`.gz`, `.npy` ids) is cut into units:
byte ranges of ~`unit_bytes` of plain files (at line ends), whole compressed or `.npy` files. Worker processes
(all local cores by default) tokenize units independently, streaming: memory is bounded by a unit's batch of
pieces, never by the corpus. Unit i writes `train-0000i.arrayrecord` / `val-0000i.arrayrecord` under temporary
names, renames them, then writes `parts/unit-0000i.json`; a killed run restarted with the same source and
settings skips every unit that has its part file. `manifest.json` is written last, from the parts.

Documents are held out for validation by the hash of their bytes (`sources.held_out`); a text file counts as one
document cut into ~8 KB pieces at line ends, each held out on its own (see `sources._text_pieces`).
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import queue
import time
from pathlib import Path

import numpy as np

from train.config import DataConfig
from train.data.shards import (CHUNK_TOKENS, FORMAT, MANIFEST, WRITER_OPTIONS, encode_record, is_prepared,
                               read_manifest, token_dtype, tokenizer_record)
from train.data.sources import (DataError, Unit, atomic_write, file_sha256, files_digest, iter_pieces, plan_units,
                                source_files)
from train.data.tokenizers import ByteTokenizer

UNIT_BYTES = 64 << 20
MIN_UNIT_BYTES = 4 << 20
BATCH_BYTES = 1 << 20   # pieces tokenized per call: bounds a worker's memory
SPLITS = ("train", "val")
_progress = None        # a worker's queue of (input bytes, tokens) to the parent's progress bar


class _SplitWriter:
    """Token ids of one split of one unit → fixed-length records in an ArrayRecord file (a temporary name)."""

    def __init__(self, path: Path, chunk: int, dtype, vocab_size: int):
        self.path, self.chunk, self.dtype = path, chunk, dtype
        self.pending, self.n_pending = [], 0
        self.records = self.tokens = self.documents = 0
        self.counts = np.zeros(vocab_size, np.int64)
        self.writer = None

    def add(self, ids: np.ndarray, documents: int) -> None:
        self.pending.append(ids)
        self.n_pending += len(ids)
        self.tokens += len(ids)
        self.documents += documents
        self.counts += np.bincount(ids, minlength=len(self.counts))
        if self.n_pending >= self.chunk:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        from array_record.python.array_record_module import ArrayRecordWriter
        ids = np.concatenate(self.pending).astype(self.dtype) if self.pending else np.zeros(0, self.dtype)
        whole = len(ids) if final else len(ids) // self.chunk * self.chunk
        if whole and self.writer is None:
            self.writer = ArrayRecordWriter(str(self.path), WRITER_OPTIONS)
        for a in range(0, whole, self.chunk):
            self.writer.write(encode_record(ids[a:a + self.chunk]))
            self.records += 1
        self.pending, self.n_pending = [ids[whole:]], len(ids) - whole

    def close(self) -> None:
        self._flush(final=True)
        if self.writer is not None:
            self.writer.close()


def _tokenize(batch: list, tokenizer) -> list[tuple[np.ndarray, bool]]:
    """(ids with eos appended where a piece ends its document, is it held out) for each piece."""
    if batch and isinstance(batch[0].text, np.ndarray):
        return [(p.text, p.val) for p in batch]
    if isinstance(tokenizer, ByteTokenizer):  # bytes are their ids: skip a Python int per byte
        return [(np.concatenate([np.frombuffer(p.text.encode("utf-8"), np.uint8), [tokenizer.eos_id] * p.eos])
                 .astype(np.int32), p.val) for p in batch]
    encoded = tokenizer.encode_batch([p.text for p in batch])
    return [(np.asarray(ids + [tokenizer.eos_id] * p.eos, np.int32), p.val) for ids, p in zip(encoded, batch)]


def _prepare_unit(job: tuple) -> int:
    """Tokenize unit `index` into its shards and part file; returns the unit index. On an error the unit's
    temporary files are removed, so nothing half-written is left."""
    index, unit, cfg, tokenizer, out, chunk = job
    dtype = token_dtype(tokenizer.vocab_size)
    writers = {s: _SplitWriter(out / f".{s}-{index:05d}.arrayrecord.tmp{os.getpid()}", chunk, dtype,
                               tokenizer.vocab_size) for s in SPLITS}
    try:
        skipped = _fill(unit, cfg, tokenizer, writers)
        for w in writers.values():
            w.close()
    except BaseException:
        for w in writers.values():
            if w.writer is not None:
                w.writer.close()
            w.path.unlink(missing_ok=True)
        raise
    part = {"unit": dataclasses.asdict(unit), "skipped": skipped, "splits": {}}
    for split, w in writers.items():
        name = f"{split}-{index:05d}.arrayrecord"
        info = {"file": name, "records": w.records, "tokens": w.tokens, "documents": w.documents}
        if w.records:
            w.path.replace(out / name)
            info.update(bytes=(out / name).stat().st_size, sha256=file_sha256(out / name))
        part["splits"][split] = info
        atomic_write(out / "parts" / f"unit-{index:05d}-{split}.npy", lambda tmp, c=w.counts: np.save(tmp, c))
    atomic_write(out / "parts" / f"unit-{index:05d}.json", lambda tmp: tmp.write_text(json.dumps(part)))
    return index


def _fill(unit: Unit, cfg: DataConfig, tokenizer, writers: dict) -> int:
    """Stream the unit's pieces, tokenized a batch at a time, into the split writers; returns lines skipped."""
    stats, batch, size = {}, [], 0

    def flush():
        tokens = 0
        for ids, val in _tokenize(batch, tokenizer):
            writers["val" if val else "train"].add(ids, int(len(ids) > 0 and ids[-1] == tokenizer.eos_id))
            tokens += len(ids)
        if _progress is not None:
            _progress.put((size, tokens))
        batch.clear()

    for piece in iter_pieces(unit, cfg, stats, tokenizer.eos_id, tokenizer.vocab_size):
        batch.append(piece)
        size += piece.nbytes
        if size >= BATCH_BYTES:
            flush()
            size = 0
    flush()
    return stats.get("skipped", 0)


def _init_worker(progress) -> None:
    global _progress
    _progress = progress
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one tokenizer thread per worker process


def _plan(cfg: DataConfig, files: list[Path], units: list[Unit], tokenizer, chunk: int) -> dict:
    """Everything the shards depend on; a directory prepared under another plan is never resumed into."""
    return {"format": FORMAT, "source": cfg.source, "files": [[str(f), f.stat().st_size, files_digest([f])]
                                                              for f in files],
            "read": {"format": cfg.format, "text_field": cfg.text_field, "val_fraction": cfg.val_fraction,
                     "skip_bad_lines": cfg.skip_bad_lines},
            "tokenizer": tokenizer_record(tokenizer), "chunk_tokens": chunk,
            "dtype": np.dtype(token_dtype(tokenizer.vocab_size)).name,
            "units": [dataclasses.asdict(u) for u in units]}


def _claim(out: Path, plan: dict) -> None:
    """Start `out` with this plan, or check that an unfinished run there had the same one."""
    (out / "parts").mkdir(parents=True, exist_ok=True)
    file = out / "plan.json"
    if file.is_file():
        old = json.loads(file.read_text())
        if old != plan:
            diff = [k for k in plan if old.get(k) != plan[k]]
            raise DataError(f"{out} holds an unfinished preparation with other {', '.join(diff)}; use another "
                            "--out directory or delete this one")
    else:
        atomic_write(file, lambda tmp: tmp.write_text(json.dumps(plan, indent=1)))


def _done(out: Path, index: int) -> bool:
    part = out / "parts" / f"unit-{index:05d}.json"
    if not part.is_file():
        return False
    shards = json.loads(part.read_text())["splits"].values()
    return all(not s["records"] or (out / s["file"]).is_file() for s in shards)


def _run_units(jobs: list[tuple], processes: int, total_bytes: int, progress: bool) -> None:
    """Run the unit jobs on `processes` worker processes (in this one if 1), with a tqdm bar of input bytes,
    tokens/s and ETA."""
    from tqdm import tqdm
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=not progress,
               dynamic_ncols=True)
    start, tokens = time.time(), 0

    def update(item):
        nonlocal tokens
        bar.update(item[0])
        tokens += item[1]
        bar.set_postfix_str(f"{tokens / max(time.time() - start, 1e-9):,.0f} tokens/s", refresh=False)

    if processes <= 1 or len(jobs) <= 1:
        q = queue.SimpleQueue()
        _init_worker(q)
        try:
            for job in jobs:
                _prepare_unit(job)
                while not q.empty():
                    update(q.get())
        finally:
            _init_worker(None)
    else:
        # spawn, not fork: the caller may be a trainer whose JAX threads a fork would copy mid-state
        ctx = multiprocessing.get_context("spawn")
        q = ctx.Queue()
        with ctx.Pool(min(processes, len(jobs)), _init_worker, (q,)) as pool:
            result = pool.map_async(_prepare_unit, jobs, chunksize=1)
            while not result.ready() or not q.empty():
                try:
                    update(q.get(timeout=0.2))
                except queue.Empty:
                    pass
            result.get()  # re-raises a worker's DataError
    bar.close()


def _finish(out: Path, plan: dict, tokenizer, run: dict) -> dict:
    """Write the manifest (and the train split's unigram counts) from the finished units' part files."""
    parts = [json.loads((out / "parts" / f"unit-{i:05d}.json").read_text()) for i in range(len(plan["units"]))]
    splits = {}
    for split in SPLITS:
        shards = [p["splits"][split] for p in parts if p["splits"][split]["records"]]
        splits[split] = {"tokens": sum(s["tokens"] for s in shards), "documents": sum(s["documents"] for s in shards),
                         "shards": shards}
        if splits[split]["tokens"] < 2:
            fix = "raise data.val_fraction" if split == "val" else "add text or lower data.val_fraction"
            raise DataError(f"data.source={plan['source']!r}: the {split} split (documents held out by hash) "
                            f"tokenized to nothing; {fix}")
        counts = sum(np.load(out / "parts" / f"unit-{i:05d}-{split}.npy") for i in range(len(parts)))
        atomic_write(out / f"unigram-{split}.npy", lambda tmp, c=counts: np.save(tmp, c))
    if hasattr(tokenizer, "tokenizer"):  # a tokenizers.Tokenizer: the directory carries it
        tokenizer.tokenizer.save(str(out / "tokenizer.json"))
    manifest = {k: plan[k] for k in ("format", "source", "files", "read", "tokenizer", "chunk_tokens", "dtype")}
    manifest.update(skipped_lines=sum(p["skipped"] for p in parts), splits=splits, **run)
    atomic_write(out / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))
    return manifest


def prepare(cfg: DataConfig, out: str | os.PathLike, tokenizer, *, processes: int | None = None,
            unit_bytes: int = UNIT_BYTES, chunk: int = CHUNK_TOKENS, progress: bool = True) -> dict:
    """Tokenize `cfg.source` with `tokenizer` into the prepared directory `out` and return its manifest.

    Resumes an unfinished run into `out` (same source and settings), skipping finished units; a finished `out`
    is returned as is. `processes` defaults to every local core."""
    out = Path(out).expanduser()
    files = source_files(cfg)
    processes = processes or os.cpu_count() or 1
    # smaller units for a small source, so every process gets one; not below MIN_UNIT_BYTES, where starting a
    # worker process would cost more than it saves
    total = sum(f.stat().st_size for f in files)
    unit_bytes = min(unit_bytes, max(MIN_UNIT_BYTES, -(-total // processes)))
    units = plan_units(files, unit_bytes)
    plan = _plan(cfg, files, units, tokenizer, chunk)
    if is_prepared(out):
        manifest = read_manifest(out)
        if any(manifest.get(k) != plan[k] for k in ("files", "read", "tokenizer", "chunk_tokens")):
            raise DataError(f"{out} already holds a corpus prepared from other files or settings; use another "
                            "--out directory or delete this one")
        return manifest
    _claim(out, plan)
    todo = [i for i in range(len(units)) if not _done(out, i)]
    sizes = [(u.end if u.end is not None else Path(u.path).stat().st_size) - u.start for u in units]
    jobs = [(i, units[i], cfg, tokenizer, out, chunk) for i in todo]
    start = time.time()
    _run_units(jobs, processes, sum(sizes[i] for i in todo), progress)
    # how this call went (a resumed run counts only its own units' time)
    run = {"seconds": round(time.time() - start, 3), "processes": processes, "units_run": len(todo)}
    return _finish(out, plan, tokenizer, run)
