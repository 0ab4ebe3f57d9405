"""Benchmarks and paper reproductions; each script prints its figures and writes them under docs/."""
