"""Muon vs AdamW at CPU scale, measured from committed run records (Liu et al. 2025, arXiv 2502.16982).

    python -m bench.paper [--quick] [--report-only] [--out docs/] [--records bench/paper/records] [--runs runs/paper]

Three studies, all through the real trainer (`train.loop.train`, `train.sft.sft`) from `configs/paper_base.yaml`
(bundled `medium` corpus, 1024-token BPE, whole documents held out: 30%, >= 100k tokens from every source) and
`configs/paper_sft.yaml` (bundled chat data):

1. scaling: four sizes, tokens proportional to the non-embedding parameters, a cosine schedule decayed to the end
   of every run, a ×2 LR sweep per size and optimizer extended until the best is interior, several seeds at every
   best LR; the compute ratio (Muon's training FLOPs as a fraction of AdamW's at matched final loss) read inside
   the loss range both reached, with a seed-and-LR bootstrap CI, with and without Newton–Schulz FLOPs;
2. LR transfer across width: AdamW, Muon with lr_scale="moonlight" and with "spectral", best LR per width;
3. SFT 2×2: AdamW- and Muon-pretrained models fine-tuned with AdamW and with Muon.

Every finished run writes one JSON record (`bench/paper/records/KEY.json`, written atomically); the report
(`results.md`, `results.json`, `paper_*.png`) is computed from the records alone (`--report-only` trains
nothing and is byte-identical on rerun). Without `--report-only` the study trains the runs that have no record,
in plan order (`plan.next_spec`), then reports; an interrupted run leaves no record and restarts from scratch.
The study commits nothing; commit the records as they land. In the background on one core, e.g.:

    nohup nice -n 19 setsid taskset -c 0 .venv/bin/python -m bench.paper > runs/paper-study.log 2>&1 &

Modules, bottom up: `plan` (sizes, `Spec`, sweeps, what runs next), `records` (record files, machine, commit),
`runs` (train one spec into a record), `analysis` (cells, the compute ratio and its bootstrap, LR transfer,
the SFT 2×2), `plots`, `report` (results.md / results.json), `measures` (restoring a run's optimizer state, for
bench/gram_ns.py), `__main__` (the command line).
"""
from bench.paper.plan import FULL, QUICK, Plan, Size, Spec


def __getattr__(name):
    """`restore_for_update` (bench/gram_ns.py's fixture) imports the trainer only when asked for."""
    if name == "restore_for_update":
        from bench.paper.measures import restore_for_update   # noqa: PLC0415
        return restore_for_update
    raise AttributeError(name)


__all__ = ["FULL", "QUICK", "Plan", "Size", "Spec", "restore_for_update"]
