"""`python -m train.prepare_data --config CONFIG [key=value ...] --out DIR`: tokenize `data.source` once.

The corpus is the config's `data.source` (files, directories, globs of .txt / .jsonl / .xz / .gz / .npy), the
tokenizer its `data.tokenizer`; overrides work as for `python -m train`. Every local core tokenizes (see
`train.data.prepare`); a killed run rerun with the same arguments skips the finished shards. Then train on it
with `python -m train --config CONFIG data.source=DIR`.
"""
from __future__ import annotations

import argparse
import sys
import time

from train.config import ConfigError, load_config
from train.data import DataError, load_tokenizer
from train.data.prepare import UNIT_BYTES, prepare


def parse_args(argv=None) -> argparse.Namespace:
    """The command line of prepare_data."""
    parser = argparse.ArgumentParser(prog="python -m train.prepare_data", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML config (default: configs/tiny.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. data.source=corpus/*.jsonl")
    parser.add_argument("--out", required=True, help="the prepared directory to write (or to resume)")
    parser.add_argument("--processes", type=int, default=None, help="worker processes (default: every core)")
    parser.add_argument("--unit-mb", type=float, default=UNIT_BYTES / 2 ** 20,
                        help="input MB per shard of a plain file (compressed files: one shard each)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """Prepare the corpus; a bad config or input prints one line and exits 2."""
    args = parse_args(argv)
    from train.runtime import cache_dir  # imported here: spawned workers re-import this module, not JAX
    try:
        cfg = load_config(args.config, args.overrides)
        start = time.time()
        tokenizer = load_tokenizer(cfg.data, cache_dir())
        manifest = prepare(cfg.data, args.out, tokenizer, processes=args.processes, unit_bytes=int(args.unit_mb * 2 ** 20))
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    print(f"{args.out}: {train['tokens']:,} train tokens ({train['documents']:,} documents, "
          f"{len(train['shards'])} shards), {val['tokens']:,} val tokens; tokenizer {tokenizer.name}; "
          f"{manifest['skipped_lines']} bad lines skipped; {time.time() - start:.0f} s\n"
          f"train on it: python -m train --config {args.config or 'configs/tiny.yaml'} data.source={args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
