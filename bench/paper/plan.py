"""What the study runs: model sizes, the LR grid, step counts, and the one-run `Spec` whose settings name its
run directory."""
from __future__ import annotations

import dataclasses
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BASE_CONFIG = ROOT / "configs" / "paper_base.yaml"
OPTIMIZERS = ("adamw", "muon")


@dataclasses.dataclass(frozen=True)
class Size:
    """A Llama of width `hidden` and depth `layers`: head dim 32, grouped-query attention with half as many
    KV heads (so k/v projections have their own shape), MLP width 3·hidden."""
    hidden: int
    layers: int

    @property
    def name(self) -> str:
        """The size's label in run names, tables and plots, e.g. 'd64-L2'."""
        return f"d{self.hidden}-L{self.layers}"

    def overrides(self) -> list[str]:
        """Config overrides that give the model this size."""
        heads = max(1, self.hidden // 32)
        return [f"model.hidden_size={self.hidden}", f"model.intermediate_size={3 * self.hidden}",
                f"model.num_hidden_layers={self.layers}", f"model.num_attention_heads={heads}",
                f"model.num_key_value_heads={max(1, heads // 2)}"]


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the study runs. The first `swept` sizes get a full LR sweep per optimizer; larger sizes run at the
    best LR of the largest swept size (the transfer the sweep tests). `lr_grid` is extended geometrically, at
    most `max_extend` times, while the best LR sits at its edge."""
    sizes: tuple[Size, ...]
    swept: int
    lr_grid: tuple[float, ...]
    max_extend: int
    steps: int            # every sweep / scaling run
    wd_steps: int         # the weight-decay comparison's longer runs
    noise_seeds: tuple[int, ...]  # extra seeds of the best runs at the largest swept size: the noise floor
    overrides: tuple[str, ...]    # on top of configs/paper_base.yaml, for every run

    @property
    def main(self) -> Size:
        """The largest swept size: its best runs feed sections 1, 4 and 5."""
        return self.sizes[self.swept - 1]

    @property
    def swept_sizes(self) -> tuple[Size, ...]:
        """The sizes that get an LR sweep."""
        return self.sizes[:self.swept]

    def run_count(self) -> int:
        """Distinct runs of the plan if no sweep is extended (a progress bar's total)."""
        per_optimizer = self.swept * len(self.lr_grid) + len(self.sizes) - self.swept + len(self.noise_seeds)
        # the weight-decay runs: with wd_steps == steps, the decayed one is the sweep's best Muon run
        return len(OPTIMIZERS) * per_optimizer + (1 if self.wd_steps == self.steps else 2)


# Sizes from measured CPU throughput (the run table at the end of the report has each run's tokens/s): a 300-step
# run (1.2M tokens) of the two swept sizes takes ~1.5–2 min on 2 idle cores, d192-L2 ~3.5 min, d256-L3 ~4.5 min;
# 12–18 sweep runs + 4 scaling + 2 noise + 2 weight-decay runs then fit in ~60 min.
FULL = Plan(
    sizes=(Size(64, 2), Size(128, 2), Size(192, 2), Size(256, 3)),
    swept=2, lr_grid=(4e-3, 8e-3, 1.6e-2), max_extend=2, steps=300, wd_steps=600, noise_seeds=(1,),
    overrides=())
QUICK = Plan(
    sizes=(Size(32, 1), Size(64, 1)),
    swept=1, lr_grid=(4e-3, 1.6e-2), max_extend=0, steps=8, wd_steps=8, noise_seeds=(),
    overrides=("seq_len=64", "global_batch=8", "schedule.warmup_steps=2", "log.every=2", "log.eval_every=4",
               "log.eval_batches=2", "checkpoint.every=8"))


@dataclasses.dataclass(frozen=True)
class Spec:
    """One training run; its directory name is a function of these fields, which is what makes reuse work."""
    size: Size
    optimizer: str
    lr: float
    steps: int
    weight_decay: float = 0.1
    seed: int = 0

    @property
    def key(self) -> str:
        """The run's directory name under the study's runs folder."""
        return (f"{self.size.name}-{self.optimizer}-lr{self.lr:g}-wd{self.weight_decay:g}-s{self.steps}"
                f"-seed{self.seed}")

    def overrides(self, plan: Plan, runs: Path) -> list[str]:
        """Config overrides (on top of configs/paper_base.yaml) that make the trainer run this spec."""
        return [*plan.overrides, *self.size.overrides(), f"run_dir={runs / self.key}", f"steps={self.steps}",
                f"seed={self.seed}", f"optimizer.name={self.optimizer}", f"optimizer.learning_rate={self.lr}",
                f"optimizer.weight_decay={self.weight_decay}"]


def base_caption(plan: Plan) -> str:
    """The config every run of the plan shares, for figure footers."""
    extra = f" + {' '.join(plan.overrides)}" if plan.overrides else ""
    return f"configs/paper_base.yaml{extra}"
