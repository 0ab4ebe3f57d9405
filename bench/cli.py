"""Command-line options shared by the bench scripts (no jax import: bench.distributed sets XLA_FLAGS first)."""
from __future__ import annotations

import argparse


def add_stack_arguments(parser: argparse.ArgumentParser, *, layers: int, d: int, f: int) -> None:
    """Add --layers, --d, --f (a Llama-like weight stack: depth, width, MLP width) and --write."""
    parser.add_argument("--layers", type=int, default=layers)
    parser.add_argument("--d", type=int, default=d)
    parser.add_argument("--f", type=int, default=f)
    parser.add_argument("--write", action="store_true", help="write the table into docs/benchmarks.md")
