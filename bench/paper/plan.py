"""What the study runs: model sizes, one-run `Spec`s (whose settings name the run and its record), LR sweeps, and
`next_spec`, which reads the records so far and says which run is due next (so the study resumes anywhere).

Order (what gives the compute ratio first): the scaling sweeps, smallest size first; then LR transfer across
width; then the SFT 2×2, which starts from the scaling study's best runs at `Plan.sft_size`."""
from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BASE_CONFIG = ROOT / "configs" / "paper_base.yaml"
SFT_CONFIG = ROOT / "configs" / "paper_sft.yaml"
OPTIMIZERS = ("adamw", "muon")
MODES = ("adamw", "muon-moonlight", "muon-spectral")   # optimizer and, for Muon, its lr_scale


@dataclasses.dataclass(frozen=True, order=True)
class Size:
    """A Llama of width `hidden` and depth `layers`: head dim 32 (one head below width 64), grouped-query
    attention with half as many KV heads, MLP width 3·hidden."""
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

    def non_embedding_params(self, vocab_size: int) -> int:
        """Parameters outside the input embedding and the output head (`train.models.param_counts` minus both),
        which is what the token budget of a run is proportional to."""
        return non_embedding_params(self, vocab_size)


@functools.lru_cache(maxsize=None)
def non_embedding_params(size: Size, vocab_size: int) -> int:
    """`Size.non_embedding_params`, cached: the plan asks for it at every scheduling step."""
    from train.models import LlamaConfig, param_counts   # noqa: PLC0415 (plan stays importable alone)
    heads = max(1, size.hidden // 32)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=size.hidden, intermediate_size=3 * size.hidden,
                      num_hidden_layers=size.layers, num_attention_heads=heads,
                      num_key_value_heads=max(1, heads // 2), tie_word_embeddings=False)
    return param_counts(cfg)[0] - 2 * vocab_size * size.hidden


@dataclasses.dataclass(frozen=True)
class Spec:
    """One training run. `mode` is the optimizer plus Muon's lr_scale; an SFT run also names the pretraining run
    it starts from (`pretrain`, a scaling Spec)."""
    study: str            # "scaling" | "lr_transfer" | "sft"
    size: Size
    mode: str             # one of MODES
    lr: float
    steps: int
    seed: int = 0
    pretrain: Spec | None = None

    @property
    def optimizer(self) -> str:
        """'adamw' or 'muon'."""
        return self.mode.split("-")[0]

    @property
    def lr_scale(self) -> str | None:
        """Muon's shape scaling; None for AdamW."""
        return self.mode.split("-")[1] if self.optimizer == "muon" else None

    @property
    def key(self) -> str:
        """The run's name: its run directory and its record file (`records/KEY.json`)."""
        base = f"{self.study}-{self.size.name}-{self.mode}-lr{self.lr:g}-s{self.steps}-seed{self.seed}"
        return base if self.pretrain is None else f"{base}-from-{self.pretrain.mode}-lr{self.pretrain.lr:g}"


@dataclasses.dataclass(frozen=True)
class Sweep:
    """An LR sweep of one mode at one size: a ×`factor` grid around `centre`, extended (at most `max_extend`
    times) while the best LR is at an edge, then `seeds` at the best LR. The best LR is the one with the lowest
    mean final loss over the seeds it has (diverged runs count as +inf)."""
    study: str
    size: Size
    mode: str
    steps: int
    centre: float
    seeds: tuple[int, ...]
    points: int = 3
    factor: float = 2.0
    max_extend: int = 3
    pretrain: Spec | None = None

    def spec(self, lr: float, seed: int = 0) -> Spec:
        """The sweep's run at `lr` and `seed`."""
        return Spec(self.study, self.size, self.mode, lr, self.steps, seed, self.pretrain)

    def initial_grid(self) -> list[float]:
        """`points` LRs ×`factor` apart centred on `centre` (4 significant digits, so keys stay short)."""
        half = (self.points - 1) / 2
        return [float(f"{self.centre * self.factor ** (i - half):.4g}") for i in range(self.points)]


def mean_loss(records: dict[str, dict], keys: list[str]) -> float:
    """Mean final validation loss of the recorded runs among `keys`; +inf if one diverged, nan if none ran."""
    losses = [math.inf if records[k]["diverged"] else records[k]["final_val_loss"] for k in keys if k in records]
    return sum(losses) / len(losses) if losses else math.nan


def sweep_state(sweep: Sweep, records: dict[str, dict]) -> tuple[list[float], Spec | None]:
    """(the sweep's LR grid so far, the next run it needs or None when complete)."""
    lrs = sweep.initial_grid()
    for extension in range(sweep.max_extend + 1):
        for lr in lrs:
            if sweep.spec(lr).key not in records:
                return lrs, sweep.spec(lr)
        means = [mean_loss(records, [sweep.spec(lr, s).key for s in sweep.seeds]) for lr in lrs]
        best_at = min(range(len(lrs)), key=lambda i: means[i])
        if extension == sweep.max_extend or 0 < best_at < len(lrs) - 1:
            break
        if best_at == 0:
            lrs.insert(0, float(f"{lrs[0] / sweep.factor:.4g}"))
        else:
            lrs.append(float(f"{lrs[-1] * sweep.factor:.4g}"))
    best_lr = best_of(sweep, lrs, records)
    for seed in sweep.seeds:
        if sweep.spec(best_lr, seed).key not in records:
            return lrs, sweep.spec(best_lr, seed)
    return lrs, None


def best_of(sweep: Sweep, lrs: list[float], records: dict[str, dict]) -> float:
    """The LR of `lrs` with the lowest mean final loss over its recorded seeds."""
    return min(lrs, key=lambda lr: mean_loss(records, [sweep.spec(lr, s).key for s in sweep.seeds]))


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the study runs.

    Scaling: every size of `sizes`, both optimizers (Muon with the Moonlight scaling), `tokens_per_param` tokens
    per non-embedding parameter, LR sweeps from `centres`, `seeds` at each best LR (`more_seeds` at the sizes in
    `more_seeds_at`). LR transfer: `transfer_widths` at depth `transfer_layers`, `transfer_steps` steps, the three
    MODES, one seed. SFT: from the best seed-0 scaling runs at `sft_size`, both fine-tuning optimizers, `sft_steps`
    steps, `seeds` at each best LR."""
    sizes: tuple[Size, ...]
    tokens_per_param: float
    centres: dict                     # mode -> the first grid's centre LR
    seeds: tuple[int, ...]
    more_seeds: tuple[int, ...]
    more_seeds_at: tuple[Size, ...]
    transfer_widths: tuple[int, ...]
    transfer_layers: int
    transfer_steps: int
    sft_size: Size
    sft_steps: int
    sft_centres: dict                 # fine-tuning optimizer -> centre LR
    tokens_per_step: int              # global_batch × seq_len of configs/paper_base.yaml (+ overrides)
    vocab_size: int
    points: int = 3
    max_extend: int = 3
    overrides: tuple[str, ...] = ()   # on top of configs/paper_base.yaml, for every pretraining run
    sft_overrides: tuple[str, ...] = ()
    quick: bool = False               # a miniature of the pipeline (CI): its numbers say nothing about Muon

    def steps_for(self, size: Size) -> int:
        """Steps of a scaling run: `tokens_per_param` × non-embedding params, rounded up to whole steps."""
        return math.ceil(self.tokens_per_param * size.non_embedding_params(self.vocab_size) / self.tokens_per_step)

    def scaling_sweeps(self) -> list[Sweep]:
        """Both optimizers at every size, smallest first (Muon with the Moonlight scaling)."""
        return [Sweep("scaling", s, mode, self.steps_for(s), self.centres[mode],
                      self.more_seeds if s in self.more_seeds_at else self.seeds, self.points,
                      max_extend=self.max_extend)
                for s in self.sizes for mode in ("adamw", "muon-moonlight")]

    def transfer_sweeps(self) -> list[Sweep]:
        """The three MODES at every transfer width, narrowest first."""
        return [Sweep("lr_transfer", Size(w, self.transfer_layers), mode, self.transfer_steps, self.centres[mode],
                      (0,), self.points, max_extend=self.max_extend)
                for w in self.transfer_widths for mode in MODES]

    def sft_sweeps(self, records: dict[str, dict]) -> list[Sweep]:
        """The SFT 2×2's sweeps, once the scaling sweeps at `sft_size` are complete (they pick the pretraining
        runs): [] before."""
        out = []
        for pre_mode in ("adamw", "muon-moonlight"):
            sweep = next(s for s in self.scaling_sweeps() if s.size == self.sft_size and s.mode == pre_mode)
            lrs, pending = sweep_state(sweep, records)
            if pending is not None:
                return []
            pretrain = sweep.spec(best_of(sweep, lrs, records), 0)
            out += [Sweep("sft", self.sft_size, mode, self.sft_steps, self.sft_centres[mode], self.seeds,
                          self.points, max_extend=self.max_extend, pretrain=pretrain)
                    for mode in ("adamw", "muon-moonlight")]
        return out

    def sweeps(self, records: dict[str, dict]) -> list[Sweep]:
        """Every sweep of the plan, in run order."""
        return self.scaling_sweeps() + self.transfer_sweeps() + self.sft_sweeps(records)


STUDIES = ("scaling", "lr_transfer", "sft")


def next_spec(plan: Plan, records: dict[str, dict], studies: tuple[str, ...] = STUDIES) -> Spec | None:
    """The next run the study needs among `studies`, given the records so far (key -> record); None when those
    are done. Processes given disjoint `studies` can train side by side (one per core)."""
    for sweep in plan.scaling_sweeps() + plan.transfer_sweeps() + plan.sft_sweeps(records):
        pending = sweep_state(sweep, records)[1] if sweep.study in studies else None
        if pending is not None:
            return pending
    return None


# Sizes from measured run times (nice 19 beside other work, the whole 1.8M-token validation split evaluated at
# the end): d48-L2 20-40 s, d64-L3 ~60 s, d96-L3 ~150 s per run on up to 2 cores; d128-L3 / d128-L4 about 10 / 15
# min on one. Five sizes spanning 13x in non-embedding params at 5 tokens per parameter (the largest, d128-L4,
# extends AdamW's loss range down to Muon's larger sizes). Scaling ~4.5 h, LR transfer ~1 h, SFT ~0.3 h.
FULL = Plan(
    sizes=(Size(48, 2), Size(64, 3), Size(96, 3), Size(128, 3), Size(128, 4)),
    tokens_per_param=5.0,
    centres={"adamw": 4e-3, "muon-moonlight": 8e-3, "muon-spectral": 3.2e-2},
    seeds=(0, 1), more_seeds=(0, 1, 2), more_seeds_at=(Size(48, 2), Size(64, 3)),
    transfer_widths=(32, 64, 96, 128), transfer_layers=2, transfer_steps=240,
    sft_size=Size(64, 3), sft_steps=80, sft_centres={"adamw": 1e-3, "muon-moonlight": 2e-3},
    tokens_per_step=16 * 128, vocab_size=1024)
QUICK = Plan(
    sizes=(Size(32, 1), Size(48, 1)),
    tokens_per_param=0.5,
    centres={"adamw": 4e-3, "muon-moonlight": 8e-3, "muon-spectral": 3.2e-2},
    seeds=(0,), more_seeds=(0, 1), more_seeds_at=(Size(32, 1),),
    transfer_widths=(32,), transfer_layers=1, transfer_steps=6,
    sft_size=Size(32, 1), sft_steps=4, sft_centres={"adamw": 1e-3, "muon-moonlight": 2e-3},
    tokens_per_step=4 * 64, vocab_size=1024, points=2, max_extend=0,
    overrides=("seq_len=64", "global_batch=4", "data.val_fraction=0.05", "log.eval_batches=4", "log.every=2"),
    sft_overrides=("seq_len=64", "global_batch=4", "log.eval_batches=4", "log.every=2"), quick=True)


def warmup_steps(steps: int) -> int:
    """5% of a run's steps (at least one) warm up its LR; the cosine then decays to the end of the run."""
    return max(1, steps // 20)


def overrides(spec: Spec, plan: Plan, runs: Path) -> list[str]:
    """Config overrides (on top of configs/paper_base.yaml or, for SFT, configs/paper_sft.yaml) for `spec`."""
    common = [f"run_dir={runs / spec.key}", f"steps={spec.steps}", f"seed={spec.seed}",
              f"optimizer.name={spec.optimizer}", f"optimizer.learning_rate={spec.lr}", "optimizer.weight_decay=0.1",
              f"optimizer.lr_scale={spec.lr_scale or 'moonlight'}", f"schedule.warmup_steps={warmup_steps(spec.steps)}",
              f"checkpoint.every={spec.steps}", f"log.eval_every={spec.steps}"]
    if spec.study == "sft":
        return [*plan.sft_overrides, *common, f"sft.init_from={runs / spec.pretrain.key}"]
    return [*plan.overrides, *spec.size.overrides(), *common]
