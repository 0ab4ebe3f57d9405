"""Where documents come from: bundled corpora, files, directories and globs; reading, splitting, hashing.

Text files are one document each; JSONL files hold one per line (`data.text_field`); `.npy` files hold token ids.
`.xz` / `.gz` are read transparently. Cache keys hash file bytes, never paths, so every checkout shares a cache.
"""
from __future__ import annotations

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


def open_text(path: Path):
    """A text handle on a plain, .xz or .gz file."""
    opener = {".xz": lzma.open, ".gz": gzip.open}.get(path.suffix, open)
    return opener(path, "rt", encoding="utf-8", errors="replace")


def read_documents(path: Path, cfg: DataConfig) -> list[str]:
    """A text file is one document; a JSONL file holds one per line (`cfg.text_field`)."""
    with open_text(path) as f:
        if format_of(path, cfg.format) == "text":
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
    return hold_out(docs, val_fraction)


def hold_out(items: list, fraction: float) -> tuple[list, list]:
    """(kept, held out): a fixed `fraction` of the items (at least one, never all), chosen independently of
    any run's seed, so runs that differ only in seed or optimizer are scored on the same held-out items."""
    n_val = min(len(items) - 1, max(1, round(len(items) * fraction)))
    held = set(np.random.default_rng(0).permutation(len(items))[:n_val].tolist())
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def split_source(cfg: DataConfig) -> tuple[list[str], list[str]]:
    """(train, val) documents of `cfg.source`."""
    files = source_files(cfg)
    docs = [d for f in files for d in read_documents(f, cfg)]
    if not any(d.strip() for d in docs):
        raise DataError(f"data.source={cfg.source!r} holds no text ({', '.join(map(str, files[:3]))}); "
                        "point it at non-empty files")
    return split_documents(docs, cfg.val_fraction)


def digest(*parts) -> str:
    """A short stable hash of the reprs of `parts` (cache keys)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(repr(p).encode() + b"\0")
    return h.hexdigest()[:16]


def files_digest(files: list[Path]) -> str:
    """A hash of the files' bytes (not their paths or mtimes), so every checkout and host shares a cache."""
    h = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            h.update(hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()[:16]


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file, so concurrent processes sharing a cache never read half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")
    write(tmp)
    tmp.replace(path)
