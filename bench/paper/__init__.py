"""Moonlight's claims about Muon (Liu et al. 2025, arXiv 2502.16982), measured at CPU scale.

    python -m bench.paper [--quick] [--out docs/] [--runs runs/paper]

Every run goes through the real trainer (`train.loop.train`) from `configs/paper_base.yaml` (bundled `medium`
corpus, held-out documents for validation, 4k BPE, seq 128, batch 32, cosine schedule, weight decay 0.1, seed 0,
one device), so Muon and AdamW see the same initial weights and the same batches in the same order. The study
writes `OUT/results.md` (tables, and interpretation generated from the measured numbers) and `OUT/paper_*.png`:

1. update RMS per matrix shape (Lemma 1 and the 0.2 match), from the optimizer state of finished runs;
2. LR sweeps for both optimizers on the swept sizes (does the best LR transfer across sizes and optimizers?);
3. steps Muon needs to reach AdamW's best final validation loss, and loss vs step / vs FLOPs;
4. Muon with and without weight decay over a longer run;
5. SVD entropy of every weight matrix at the end of training, per layer;
6. loss vs compute over all sizes with a fitted power law per optimizer;
7. the optimizer update's share of the train step per size.

Runs live in `--runs` (one directory per run, named by its settings). A run whose directory already holds a
finished run is not trained again, so a killed study continues where it stopped when started again; the best-LR
runs of the sweep are reused by sections 1, 3, 5, 6 and 7. `--quick` runs a minutes-long miniature of the whole
pipeline (for CI: it checks that the report is produced, not the claims). A progress bar counts the runs.

Modules, bottom up: `plan` (sizes, LR grid, `Spec`), `runs` (`Study`: train or reuse runs, `Result`), `measures`
(restored optimizer state, SVD entropy, fits), `plots` and `tables` (figures, markdown), `sections` (the seven
sections), `report` (`run_study`: the whole document), `__main__` (the command line).
"""
from bench.paper.plan import FULL, QUICK, Plan, Size, Spec
from bench.paper.report import run_study
from bench.paper.runs import Result, Study, best

__all__ = ["FULL", "QUICK", "Plan", "Result", "Size", "Spec", "Study", "best", "run_study"]
