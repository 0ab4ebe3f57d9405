"""Where documents come from: bundled corpora, files, directories and globs; streaming reads, the held-out split,
hashing and atomic writes.

Text files are one document each; JSONL files hold one per line (`data.text_field`); `.npy` files hold token ids.
`.xz` / `.gz` are read transparently. Cache keys hash file bytes, never paths, so every checkout shares a cache.
"""
from __future__ import annotations

import dataclasses
import glob
import gzip
import hashlib
import json
import lzma
import os
from pathlib import Path
from typing import Callable

import numpy as np

from train.config import DataConfig

CORPORA = Path(__file__).resolve().parent.parent / "corpora"
BUNDLED = {"tinyshakespeare": CORPORA / "tinyshakespeare.txt", "medium": CORPORA / "medium.jsonl.xz"}


class DataError(ValueError):
    """Missing, empty or unusable data; the message names the path and what to do."""


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


def format_of(path: Path, fmt: str) -> str:
    """The data format of one file: `fmt`, or from its extension when `fmt` is "auto"."""
    if fmt != "auto":
        return fmt
    suffixes = [s for s in path.suffixes if s not in (".xz", ".gz")]
    return {".jsonl": "jsonl", ".json": "jsonl", ".npy": "tokens"}.get(suffixes[-1] if suffixes else "", "text")


def is_tokens(files: list[Path], cfg: DataConfig) -> bool:
    """Whether the source is pre-tokenized .npy ids (a mix of token and text files is an error)."""
    kinds = {format_of(f, cfg.format) == "tokens" for f in files}
    if len(kinds) > 1:
        raise DataError(f"data.source={cfg.source!r} mixes .npy token files with text files; use one kind")
    return kinds.pop()


def hold_out(items: list, fraction: float) -> tuple[list, list]:
    """(kept, held out): a fixed `fraction` of the items (at least one, never all), chosen independently of
    any run's seed, so runs that differ only in seed or optimizer are scored on the same held-out items."""
    n_val = min(len(items) - 1, max(1, round(len(items) * fraction)))
    held = set(np.random.default_rng(0).permutation(len(items))[:n_val].tolist())
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def digest(*parts) -> str:
    """A short stable hash of the reprs of `parts` (cache keys)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(repr(p).encode() + b"\0")
    return h.hexdigest()[:16]


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes (hex), read in blocks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def files_digest(files: list[Path]) -> str:
    """A hash of the files' bytes (not their paths or mtimes), so every checkout and host shares a cache: the
    sha256 of the files' sha256 digests, shortened."""
    h = hashlib.sha256()
    for path in files:
        h.update(bytes.fromhex(file_sha256(path)))
    return h.hexdigest()[:16]


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file renamed into place (`write(tmp)` writes it), so concurrent processes sharing
    a cache never read half a file, and a crash leaves the old file or the new one, never a torn one. The one way
    the trainer writes a file that others read back (tokenizers, shards, manifests, config.yaml, the CPU peak)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")
    write(tmp)
    tmp.replace(path)


# --- streaming reads: a source as units (byte ranges of plain files, whole compressed files) of pieces ---

PIECE_BYTES = 8192        # a text file is cut into pieces of about this many bytes, at line ends
BPE_SAMPLE_BYTES = 16 << 20  # a "bpe" tokenizer is trained on at most this much train-split text


@dataclasses.dataclass(frozen=True)
class Unit:
    """One independently readable part of a source: lines starting in [start, end) of `path` (end None: all)."""
    path: str
    start: int = 0
    end: int | None = None


@dataclasses.dataclass
class Piece:
    """A document (a JSONL line, a .npy document) or a ~PIECE_BYTES run of lines of a text file."""
    text: str | np.ndarray   # token ids for a .npy source
    nbytes: int               # input bytes read for it (progress)
    val: bool                 # held out: chosen by the hash of its content
    eos: bool                 # ends its document: an eos follows it in its split


def plan_units(files: list[Path], unit_bytes: int) -> list[Unit]:
    """Units of about `unit_bytes` (plain text/JSONL files are split at byte offsets; compressed and .npy
    files are read whole, as they cannot be entered in the middle)."""
    units, unit_bytes = [], max(PIECE_BYTES, unit_bytes // PIECE_BYTES * PIECE_BYTES)  # units end where pieces do
    for path in files:
        size = path.stat().st_size
        if path.suffix in (".xz", ".gz", ".npy") or size <= unit_bytes:
            units.append(Unit(str(path)))
            continue
        bounds = list(range(0, size, unit_bytes)) + [size]
        units += [Unit(str(path), a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    return units


def held_out(content: bytes, fraction: float) -> bool:
    """Whether a document is in the validation split: a hash of its bytes, so the split is the same on every
    host, for every run seed and however the source is cut into units."""
    h = int.from_bytes(hashlib.blake2b(content, digest_size=8).digest(), "little")
    return h < fraction * 2.0 ** 64


def _lines(unit: Unit):
    """(byte offset, raw line) of the lines starting in the unit, then the lines after it (for look-ahead)."""
    path = Path(unit.path)
    opener = {".xz": lzma.open, ".gz": gzip.open}.get(path.suffix, open)
    with opener(path, "rb") as f:
        pos = unit.start
        if pos:
            f.seek(pos - 1)
            if f.read(1) != b"\n":  # the line under way belongs to the previous unit
                pos += len(f.readline())
        for line in f:
            yield pos, line
            pos += len(line)


def line_number(path: str, offset: int) -> int:
    """The 1-based number of the line starting at byte `offset` of a plain file (for error messages)."""
    with open(path, "rb") as f:
        return f.read(offset).count(b"\n") + 1


def _text_pieces(unit: Unit, fraction: float):
    """The lines of a text file that start in [k, k + 1) * PIECE_BYTES, for each k (byte offsets, so pieces do
    not depend on how the file is cut into units); eos ends a piece at the file's end or where the split
    changes, so each split sees contiguous text as one document (the next unit's first piece is read to decide)."""
    def runs():
        buf, piece, crossed = [], None, False
        for pos, line in _lines(unit):
            if buf and pos // PIECE_BYTES != piece:
                yield b"".join(buf)
                buf = []
            if not crossed and unit.end is not None and pos >= unit.end:
                crossed = True
                yield None
            buf.append(line)
            piece = pos // PIECE_BYTES
        if buf:
            yield b"".join(buf)
    prev, beyond = None, False
    for raw in runs():
        if raw is None:
            beyond = True
            continue
        val = held_out(raw, fraction)
        if prev is not None:
            yield Piece(prev[0].decode("utf-8", errors="replace"), len(prev[0]), prev[1], prev[1] != val)
        if beyond:
            return
        prev = (raw, val)
    if prev is not None:
        yield Piece(prev[0].decode("utf-8", errors="replace"), len(prev[0]), prev[1], True)


def _jsonl_pieces(unit: Unit, cfg: DataConfig, stats: dict):
    """One document per non-blank line; a bad line is an error naming file:line, or skipped and counted in
    stats["skipped"] when cfg.skip_bad_lines."""
    first = None
    for k, (pos, line) in enumerate(_lines(unit)):
        if unit.end is not None and pos >= unit.end:
            return
        first = pos if first is None else first
        if not line.strip():
            continue
        try:
            doc = json.loads(line)[cfg.text_field]
            if not isinstance(doc, str):
                raise TypeError(f"{cfg.text_field!r} is a {type(doc).__name__}, not a string")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            if cfg.skip_bad_lines:
                stats["skipped"] = stats.get("skipped", 0) + 1
                continue
            lineno = (line_number(unit.path, first) if first else 1) + k
            raise DataError(f"{unit.path}:{lineno}: not a JSON object with a string {cfg.text_field!r} field "
                            f"({e}); fix the line, set data.text_field, or data.skip_bad_lines=true to skip "
                            "bad lines") from e
        raw = doc.encode("utf-8", errors="replace")
        yield Piece(doc, len(line), held_out(raw, cfg.val_fraction), True)


def _token_pieces(unit: Unit, cfg: DataConfig, eos_id: int, vocab_size: int, block: int = 1 << 20):
    """The documents (ending at eos) of a .npy array of ids, read block by block from a memory map."""
    arr = np.load(unit.path, mmap_mode="r").reshape(-1)
    carry = np.zeros(0, np.int32)
    for a in range(0, len(arr), block):
        ids = np.asarray(arr[a:a + block])
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise DataError(f"{unit.path} has ids in [{ids.min()}, {ids.max()}] but the tokenizer has "
                            f"{vocab_size}; set data.tokenizer to the one that made them")
        ids = np.concatenate([carry, ids.astype(np.int32)])
        ends = np.flatnonzero(ids == eos_id) + 1
        for s, e in zip(np.concatenate([[0], ends[:-1]]), ends):
            doc = ids[s:e]
            yield Piece(doc, 4 * len(doc), held_out(doc.tobytes(), cfg.val_fraction), False)
        carry = ids[ends[-1] if ends.size else 0:]
    if carry.size:
        yield Piece(carry, 4 * len(carry), held_out(carry.tobytes(), cfg.val_fraction), False)


def iter_pieces(unit: Unit, cfg: DataConfig, stats: dict, eos_id: int = 0, vocab_size: int = 0):
    """The pieces of one unit, in order (see `Piece`); .npy pieces already hold their eos."""
    fmt = format_of(Path(unit.path), cfg.format)
    if fmt == "tokens":
        return _token_pieces(unit, cfg, eos_id, vocab_size)
    return _jsonl_pieces(unit, cfg, stats) if fmt == "jsonl" else _text_pieces(unit, cfg.val_fraction)


def train_sample(cfg: DataConfig, budget: int = BPE_SAMPLE_BYTES) -> list[str]:
    """Train-split text from the start of the source, at most `budget` bytes (what "bpe" is trained on)."""
    out, size = [], 0
    for unit in plan_units(source_files(cfg), 1 << 62):
        for piece in iter_pieces(unit, cfg, {}):
            if not piece.val:
                out.append(piece.text)
                size += piece.nbytes
            if size >= budget:
                return out
    if not out:
        raise DataError(f"data.source={cfg.source!r} holds no training text; point it at non-empty files")
    return out
