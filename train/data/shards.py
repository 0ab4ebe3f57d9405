"""The prepared-corpus format: a directory of ArrayRecord shards of token ids and a `manifest.json`.

Each split (`train`, `val`) is one token stream: its documents' ids, each document followed by eos, cut into
records of `chunk_tokens` ids (raw little-endian uint16, or int32 for vocabularies over 65,536; then the CRC-32 of
those bytes, 4 bytes little-endian, checked on every read, so a damaged shard is named, not trained on). Shards hold
consecutive records and the stream is the shards in manifest order; only a shard's last record may be short.
Fixed-length chunks (not one record per document) make any token span a lookup of at most
`span // chunk_tokens + 2` records, with no per-document index whose size would grow with the corpus.

`manifest.json` is written last, so a directory without it is an unfinished preparation: it records the format,
the tokenizer (name, vocab size, eos id and the ids of a probe text, to refuse another tokenizer), each split's
token and document counts and shards (file, records, tokens, bytes, sha256). `tokenizer.json` is copied in for a
trained or file tokenizer; `unigram.npy` holds the train split's token counts.
"""
from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import numpy as np

from train.data.sources import DataError

FORMAT = "muon-jax-tokens/1"
MANIFEST = "manifest.json"
CHUNK_TOKENS = 2048
PROBE = "Muon, 2025: ünïcode ✓\n"  # catches a tokenizer with the same name and size but other ids
# one record per group: a random read decodes one record, not a group; snappy: 5x faster to write than the default
# brotli, half the size of uncompressed ids
WRITER_OPTIONS = "group_size:1,snappy"


def is_prepared(path: str | os.PathLike) -> bool:
    """Whether `path` is a prepared-corpus directory (it has a manifest)."""
    return (Path(path).expanduser() / MANIFEST).is_file()


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a prepared directory, checked for its format."""
    file = Path(path).expanduser() / MANIFEST
    try:
        manifest = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{file}: unreadable manifest ({e}); prepare the corpus again with "
                        "python -m train.prepare_data") from e
    if manifest.get("format") != FORMAT:
        raise DataError(f"{file}: format {manifest.get('format')!r}, this trainer reads {FORMAT!r}; prepare the "
                        "corpus again with python -m train.prepare_data")
    return manifest


def tokenizer_record(tokenizer) -> dict:
    """What identifies a tokenizer in a manifest."""
    return {"name": tokenizer.name, "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
            "probe": [int(i) for i in tokenizer.encode(PROBE)]}


def check_tokenizer(manifest: dict, tokenizer, where: str, configured: str) -> None:
    """Refuse a prepared directory made by another tokenizer than `tokenizer` (configured as `configured`)."""
    made, have = manifest["tokenizer"], tokenizer_record(tokenizer)
    if any(made[k] != have[k] for k in ("vocab_size", "eos_id", "probe")):
        raise DataError(f"{where} was prepared with tokenizer {made['name']} (vocab {made['vocab_size']}, eos "
                        f"{made['eos_id']}) but data.tokenizer={configured!r} is {have['name']} (vocab "
                        f"{have['vocab_size']}, eos {have['eos_id']}); set data.tokenizer to the one that prepared "
                        "it or prepare the corpus again with this tokenizer")


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.int32


def encode_record(ids: np.ndarray) -> bytes:
    """A record: the ids' bytes and their CRC-32."""
    raw = ids.tobytes()
    return raw + zlib.crc32(raw).to_bytes(4, "little")


class TokenStream:
    """One split of a prepared directory as a random-access token stream (nothing is loaded up front).

    `len(stream)` is its token count; `stream.read(starts, length)` returns the spans
    [start, start + length) as one [len(starts), length] int32 array; `stream[a:b]` and `np.asarray(stream)`
    read one span (the latter the whole stream: for small corpora and tests)."""

    def __init__(self, root: Path, manifest: dict, split: str):
        info = manifest["splits"][split]
        shards = [s for s in info["shards"] if s["records"]]
        for s in shards:
            path = root / s["file"]
            size = path.stat().st_size if path.is_file() else None
            if size != s["bytes"]:
                raise DataError(f"{path}: shard {'missing' if size is None else f'has {size} bytes'}, the manifest "
                                f"says {s['bytes']}; prepare the corpus again (python -m train.prepare_data)")
        self.paths = [root / s["file"] for s in shards]
        self.chunk, self.dtype = manifest["chunk_tokens"], np.dtype(manifest["dtype"])
        self.n_tokens, self.documents = info["tokens"], info["documents"]
        self._token_starts = np.cumsum([0] + [s["tokens"] for s in shards])
        self._record_starts = np.cumsum([0] + [s["records"] for s in shards])
        from grain.sources import ArrayRecordDataSource  # here: the writing side never needs grain (nor JAX)
        self._source = ArrayRecordDataSource([str(p) for p in self.paths]) if shards else None
        counts = root / f"unigram-{split}.npy"
        self.unigram_counts = np.load(counts) if counts.is_file() else None

    def __len__(self) -> int:
        return self.n_tokens

    def read(self, starts, length: int) -> np.ndarray:
        """Token spans [start, start + length) for each start, as an int32 array [len(starts), length]."""
        pos = np.asarray(starts, np.int64)[:, None] + np.arange(length)
        if pos.size and (pos.min() < 0 or pos.max() >= self.n_tokens):
            raise IndexError(f"token span outside [0, {self.n_tokens})")
        shard = np.searchsorted(self._token_starts, pos, side="right") - 1
        local = pos - self._token_starts[shard]
        record = self._record_starts[shard] + local // self.chunk
        wanted, inverse = np.unique(record, return_inverse=True)
        table = np.zeros((len(wanted), self.chunk), np.int32)
        for i, (r, raw) in enumerate(zip(wanted, self._records(wanted))):
            if len(raw) < 4 or zlib.crc32(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
                self._corrupt(r, "record checksum mismatch")
            ids = np.frombuffer(raw[:-4], self.dtype)
            table[i, :len(ids)] = ids
        return table[inverse.reshape(pos.shape), local % self.chunk]

    def _records(self, ids: np.ndarray) -> list[bytes]:
        try:
            return self._source.__getitems__([int(i) for i in ids])
        except Exception as e:  # riegeli reports a framing or header error without the file name
            for i in ids:
                try:
                    self._source[int(i)]
                except Exception:
                    self._corrupt(i, str(e))
            raise

    def _corrupt(self, record: int, why: str):
        shard = int(np.searchsorted(self._record_starts, record, side="right") - 1)
        raise DataError(f"{self.paths[shard]}: corrupt shard (record {record - self._record_starts[shard]}: "
                        f"{why}); prepare the corpus again (python -m train.prepare_data) or restore the file")

    def __getitem__(self, index: slice) -> np.ndarray:
        start, stop, step = index.indices(self.n_tokens)
        if step != 1:
            raise IndexError("a TokenStream is read in contiguous slices")
        return self.read([start], max(0, stop - start))[0]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)
