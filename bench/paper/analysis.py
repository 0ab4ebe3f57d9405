"""What the report computes from the records alone: LR cells, each sweep's best LR, the loss-vs-compute
frontiers, the compute ratio at matched loss with its bootstrap CI, LR transfer across width and the SFT 2×2.

A *cell* is (study, size, mode, lr) with its final losses over seeds (+inf for a diverged run). The best LR of a
sweep is the one with the lowest mean; it is *interior* when a lower and a higher LR were tried too."""
from __future__ import annotations

import dataclasses
import math

import numpy as np

BOOTSTRAP_REPLICATES = 2000
BOOTSTRAP_SEED = 0


def mode_of(record: dict) -> str:
    """'adamw', 'muon-moonlight' or 'muon-spectral'."""
    return record["optimizer"] if record["optimizer"] == "adamw" else f"muon-{record['lr_scale']}"


def loss_of(record: dict) -> float:
    """A record's final val loss; +inf if it diverged (so it never wins a sweep)."""
    return math.inf if record["diverged"] else float(record["final_val_loss"])


def cells(records: dict[str, dict], study: str, group=lambda r: (r["size"], mode_of(r))) -> dict:
    """group -> lr -> {seed: final loss} over the study's records (`group(record)` names the sweep)."""
    out: dict = {}
    for r in records.values():
        if r["study"] == study:
            out.setdefault(group(r), {}).setdefault(r["lr"], {})[r["seed"]] = loss_of(r)
    return out


@dataclasses.dataclass(frozen=True)
class Best:
    """A sweep's best LR and its cell's losses over seeds."""
    lr: float
    losses: tuple[float, ...]
    interior: bool

    @property
    def mean(self) -> float:
        """Mean loss over seeds."""
        return float(np.mean(self.losses))

    @property
    def std(self) -> float:
        """Sample standard deviation over seeds (0 with one seed)."""
        return float(np.std(self.losses, ddof=1)) if len(self.losses) > 1 else 0.0


def best_lr(sweep: dict[float, dict[int, float]]) -> Best:
    """The LR of `sweep` (lr -> {seed: loss}) with the lowest mean loss."""
    lrs = sorted(sweep)
    lr = min(lrs, key=lambda x: (sum(sweep[x].values()) / len(sweep[x]), x))
    losses = tuple(sweep[lr][s] for s in sorted(sweep[lr]))
    return Best(lr, losses, 0 < lrs.index(lr) < len(lrs) - 1)


def compute_to_reach(frontier: list[tuple[float, float]], loss: float) -> float | None:
    """log compute at which `frontier` ([(compute, loss)] sorted by compute) first reaches `loss`, linear in
    (log compute, loss) between its points; None outside the frontier's range (above its first point's loss or
    below its lowest loss): nothing is extrapolated."""
    xs = [math.log(c) for c, _ in frontier]
    ys = [y for _, y in frontier]
    if not ys or loss > ys[0] or loss < min(ys):
        return None
    if loss == ys[0]:
        return xs[0]
    for i in range(len(ys) - 1):
        if ys[i + 1] <= loss:
            t = (ys[i] - loss) / (ys[i] - ys[i + 1])
            return xs[i] + t * (xs[i + 1] - xs[i])
    return None   # unreachable: min(ys) <= loss


def ratio_at_matched_loss(adamw: list[tuple[float, float]], muon: list[tuple[float, float]]) -> tuple[float | None, int]:
    """(geometric mean of C_Muon / C_AdamW at equal loss, number of points it averages). Every frontier point of
    either optimizer whose loss lies inside the other's range contributes, read on the other's frontier."""
    logs = []
    for c, y in muon:
        x = compute_to_reach(adamw, y)
        if x is not None:
            logs.append(math.log(c) - x)
    for c, y in adamw:
        x = compute_to_reach(muon, y)
        if x is not None:
            logs.append(x - math.log(c))
    return (math.exp(float(np.mean(logs))), len(logs)) if logs else (None, 0)


def frontier(sweeps: dict, flops: dict, mode: str, choose=best_lr) -> list[tuple[float, float]]:
    """[(training FLOPs, best mean loss)] of `mode` over the sizes (sorted by FLOPs) whose best LR is interior
    and finite. `sweeps`: (size, mode) -> lr -> {seed: loss}; `flops`: (size, mode) -> FLOPs of a run."""
    points = []
    for (size, m), sweep in sweeps.items():
        if m != mode:
            continue
        b = choose(sweep)
        if b.interior and math.isfinite(b.mean):
            points.append((flops[size, m], b.mean))
    return sorted(points)


def resampled(sweep: dict[float, dict[int, float]], rng: np.random.Generator) -> dict[float, dict[int, float]]:
    """`sweep` with every cell's seeds drawn with replacement (as many as it has)."""
    out = {}
    for lr in sorted(sweep):
        losses = [sweep[lr][s] for s in sorted(sweep[lr])]
        out[lr] = ({i: losses[j] for i, j in enumerate(rng.integers(0, len(losses), len(losses)).tolist())}
                   if len(losses) > 1 else {0: losses[0]})
    return out


def compute_ratios(records: dict[str, dict]) -> dict[str, dict]:
    """Muon's training FLOPs as a fraction of AdamW's at matched final loss on the scaling study's frontiers,
    and its 95% bootstrap CI (seeds resampled within every cell, the best LR re-chosen in every replicate), without
    ("model") and with ("with_ns") Newton–Schulz FLOPs in Muon's compute; both from the same replicates."""
    sweeps = cells(records, "scaling")
    flops = {name: {(r["size"], mode_of(r)): r[key] for r in records.values() if r["study"] == "scaling"}
             for name, key in (("model", "train_flops"), ("with_ns", "train_flops_ns"))}

    def ratios(drawn: dict) -> dict[str, tuple[float | None, int]]:
        """(ratio, points) without and with NS FLOPs for a set of sweeps."""
        return {name: ratio_at_matched_loss(frontier(drawn, f, "adamw"), frontier(drawn, f, "muon-moonlight"))
                for name, f in flops.items()}

    point = ratios(sweeps)
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    replicates: dict[str, list[float]] = {name: [] for name in flops}
    for _ in range(BOOTSTRAP_REPLICATES if point["model"][0] is not None else 0):
        for name, (r, _) in ratios({k: resampled(v, rng) for k, v in sorted(sweeps.items())}).items():
            if r is not None:
                replicates[name].append(r)
    out = {}
    for name, (r, n) in point.items():
        reps = replicates[name]
        out[name] = {"muon_over_adamw": r, "points": n, "replicates_in_range": len(reps),
                     "replicates": BOOTSTRAP_REPLICATES if r is not None else 0,
                     "ci95": [float(np.percentile(reps, 2.5)), float(np.percentile(reps, 97.5))] if reps else None}
    return out


def compute_ratio(records: dict[str, dict], ns: bool) -> dict:
    """`compute_ratios`' result with (`ns`) or without Newton–Schulz FLOPs."""
    return compute_ratios(records)["with_ns" if ns else "model"]


def lr_transfer(records: dict[str, dict]) -> dict:
    """mode -> size -> Best of the LR-transfer sweeps."""
    out: dict = {}
    for (size, mode), sweep in sorted(cells(records, "lr_transfer").items()):
        out.setdefault(mode, {})[size] = best_lr(sweep)
    return out


def sft_2x2(records: dict[str, dict]) -> dict:
    """(pretrain optimizer, fine-tuning mode) -> Best of the SFT sweeps."""
    sweeps = cells(records, "sft", group=lambda r: (r["pretrain_optimizer"], mode_of(r)))
    return {k: best_lr(v) for k, v in sorted(sweeps.items())}
