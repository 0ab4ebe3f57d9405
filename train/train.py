"""The training loop, top to bottom: config → mesh → data → model → optimizer → (resume) → steps → eval → save.

`train(cfg)` runs one job described by a `train.config.Config` and returns a summary dict. What the run reads and
starts from is a `RunInputs` (default: `pretraining_inputs`, the configured corpus and a random init); supervised
fine-tuning (train/sft.py) runs the same loop with chat batches and a loaded model. Everything a step
needs is one jitted, buffer-donating function `train_step(state, batch) -> (state, metrics)` over a plain dict
state `{step, params, opt_state, variables}` (nnx `State`s split from the model: `params` are the `nnx.Param`s,
`variables` the rest, e.g. the MoE balancing bias).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import muon_jax
from train import data as data_lib
from train.checkpoint import CheckpointError, Checkpointer
from train.config import MESH_AXES, Config, ConfigError
from train.mfu import flops_per_token, peak_flops
from train.models import build_model, config_from_dict, param_counts, update_balancing_bias
from train.models.sharding import auto_mesh
from train.muon_clip import qk_clip_params, qk_clip_stats

log = logging.getLogger("train")
BATCH_AXES = ("data", "fsdp")


class NonFiniteLoss(RuntimeError):
    """Loss or gradient norm became NaN/Inf under nan_policy=halt (or too many consecutive skips)."""


@dataclasses.dataclass
class RunInputs:
    """What one run trains on and starts from.

    `train_iter` yields this process's rows of each global batch (dicts of [rows, seq_len] arrays: inputs, targets,
    segment_ids, positions, loss_mask) and has grain's get_state/set_state, so resume is exact; `val_batches`
    are whole micro-batches (every process's rows). `init_model(model_cfg, mesh)` returns the initial model with
    its params laid out on the mesh (None: random init from cfg.seed); `sample(model)` is the text shown at the
    end (None: a continuation of log.sample_prompt). `eval_at_start` adds the validation loss before the first
    step to the summary (`initial_val_loss`)."""
    tokenizer: data_lib.Tokenizer
    train_iter: object
    val_batches: list[dict]
    description: str                     # the data part of the start-up line
    summary: dict = dataclasses.field(default_factory=dict)  # merged into train()'s summary
    init_model: Callable | None = None
    sample: Callable | None = None
    eval_at_start: bool = False


# ----------------------------------------------------------------------------------------------- setup pieces

def cache_dir(cfg: Config) -> Path:
    """Where tokenizers and tokenized corpora are cached (shared across runs; MUON_JAX_CACHE overrides)."""
    return Path(os.environ.get("MUON_JAX_CACHE", Path.home() / ".cache" / "muon-jax"))


def model_config_for(cfg: Config, tokenizer):
    """The model config, with `vocab_size` taken from the tokenizer when the config leaves it out."""
    d = dict(cfg.model)
    d.setdefault("vocab_size", tokenizer.vocab_size)
    d.setdefault("max_position_embeddings", max(cfg.seq_len, 2048))
    if d["vocab_size"] < tokenizer.vocab_size:
        raise ConfigError(
            f"model.vocab_size={d['vocab_size']} is smaller than the tokenizer's vocabulary "
            f"({tokenizer.name}: {tokenizer.vocab_size}); remove model.vocab_size to use the tokenizer's size")
    return config_from_dict(d)


def make_mesh(cfg: Config) -> jax.sharding.Mesh:
    sizes = {a: getattr(cfg.mesh, a) for a in MESH_AXES}
    n = jax.device_count()
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if -1 in sizes.values():
        if n % fixed:
            raise ConfigError(f"mesh {sizes}: {n} devices are not divisible by the fixed axes' product {fixed}")
        sizes = {a: n // fixed if s == -1 else s for a, s in sizes.items()}
    used = math.prod(sizes.values())
    if used > n or (used < n and jax.process_count() > 1):
        raise ConfigError(f"mesh {sizes} needs {used} devices but {n} are present; "
                          "set one axis to -1 to absorb the rest")
    # fewer devices than present (single process only): the mesh takes the first `used`, e.g. 1 of 8 to compare
    devices = np.asarray(jax.devices()[:used]).reshape(tuple(sizes.values()))
    return auto_mesh(jax.sharding.Mesh(devices, MESH_AXES))


def make_schedule(cfg: Config) -> optax.Schedule:
    s, peak, steps = cfg.schedule, cfg.optimizer.learning_rate, cfg.steps
    warmup = max(1, min(s.warmup_steps, steps - 1))
    final = peak * s.final_fraction
    ramp = optax.linear_schedule(0.0, peak, warmup)
    if s.name == "cosine":  # decay_steps > warmup even for a 1-step run
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(steps, warmup + 1), final)
    if s.name == "constant":
        return optax.join_schedules([ramp, optax.constant_schedule(peak)], [warmup])
    decay = max(1, int(steps * s.decay_fraction))  # wsd: warmup, stable, linear decay over the last steps
    return optax.join_schedules([ramp, optax.constant_schedule(peak), optax.linear_schedule(peak, final, decay)],
                                [warmup, steps - decay])


def make_optimizer(cfg: Config, schedule, mesh) -> optax.GradientTransformation:
    o = cfg.optimizer
    if o.name == "adamw":
        # decay on every leaf, as muon_jax.muon does for its Adam branch, so the two compare like for like
        tx = optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
    else:
        tx = muon_jax.muon(schedule, momentum=o.momentum, nesterov=o.nesterov, ns_coeffs=o.ns_coeffs,
                           ns_steps=o.ns_steps, ns_dtype=jnp.dtype(o.ns_dtype), lr_scale=o.lr_scale,
                           ns_method=o.ns_method, weight_decay=o.weight_decay, adam_b1=o.b1, adam_b2=o.b2, adam_eps=o.eps,
                           **distributed_muon_args(cfg, mesh))
    return optax.chain(optax.clip_by_global_norm(o.grad_clip), tx) if o.grad_clip > 0 else tx


def distributed_muon_args(cfg: Config, mesh) -> dict:
    """Spread Newton–Schulz over the batch (data/fsdp) axes when there is more than one device on them."""
    axes = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1)
    if not axes:
        return {}
    return {"mesh": mesh, "ns_axis": axes, "ns_mode": cfg.optimizer.ns_mode}


# ------------------------------------------------------------------------------------------------ the step

def cross_entropy(logits, targets, mask, z_loss: float):
    """Mean token NLL over `mask` and the z-loss term `z_loss · mean(log Z²)`."""
    logz = jax.nn.logsumexp(logits, axis=-1)
    nll = logz - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    denom = jnp.maximum(mask.sum(), 1.0)
    loss = (nll * mask).sum() / denom
    return loss, z_loss * (jnp.square(logz) * mask).sum() / denom


def make_train_step(cfg: Config, graphdef, tx, schedule, labels, model_cfg):
    accum, z_loss = cfg.grad_accum, cfg.optimizer.z_loss
    is_moe = bool(getattr(model_cfg, "n_routed_experts", 0)) and model_cfg.num_moe_layers > 0

    def loss_fn(params, variables, batch):
        model = nnx.merge(graphdef, params, variables)
        logits, aux = model(batch["inputs"], batch["segment_ids"], batch["positions"], return_aux=True)
        loss, z = cross_entropy(logits, batch["targets"], batch["loss_mask"], z_loss)
        return loss + z, (loss, aux)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state, batch):
        params, variables = state["params"], state["variables"]
        micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)

        def accumulate(carry, mb):
            (_, (loss, aux)), grads = grad_fn(params, variables, mb)
            c_grads, c_loss, c_aux = carry
            # sums (divided by accum below), except the attention-logit max that MuonClip and metrics want
            c_aux = {k: jnp.maximum(c_aux[k], v) if k == "max_attn_logit" else c_aux[k] + v for k, v in aux.items()}
            return (jax.tree.map(jnp.add, c_grads, grads), c_loss + loss, c_aux), None

        (_, (loss0, aux0)), grads0 = jax.eval_shape(
            lambda: grad_fn(params, variables, jax.tree.map(lambda x: x[0], micro)))
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (grads0, loss0, aux0))
        zeros[2]["max_attn_logit"] = jnp.full(aux0["max_attn_logit"].shape, -jnp.inf, aux0["max_attn_logit"].dtype)
        (grads, loss, aux), _ = jax.lax.scan(accumulate, zeros, micro)
        grads, loss = jax.tree.map(lambda x: x / accum, (grads, loss))
        aux = {k: v if k == "max_attn_logit" else v / accum for k, v in aux.items()}

        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        clip_metrics = {}
        if cfg.muon_clip.enabled:
            new_params = qk_clip_params(new_params, aux["max_attn_logit"], tau=cfg.muon_clip.tau, config=model_cfg)
            clip_metrics = qk_clip_stats(aux["max_attn_logit"], cfg.muon_clip.tau)
        new_variables = variables
        if is_moe:
            model = nnx.merge(graphdef, new_params, variables)
            update_balancing_bias(model, aux["expert_load"])
            new_variables = nnx.split(model, nnx.Param, ...)[2]

        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = {"step": state["step"] + 1, "params": keep(new_params, params),
                     "opt_state": keep(opt_state, state["opt_state"]), "variables": keep(new_variables, variables)}

        lr = schedule(state["step"])
        per_layer = aux["max_attn_logit"].max(-1)  # the signal MuonClip acts on
        if cfg.muon_clip.enabled:
            clip_metrics["max_attn_logit_per_layer_after_clip"] = jnp.minimum(per_layer, cfg.muon_clip.tau)
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr, "finite": finite,
                   "max_attn_logit": per_layer.max(), "max_attn_logit_per_layer": per_layer, **clip_metrics}
        for group in ("muon", "adam"):  # update RMS per label group, relative to the LR (Moonlight: ≈ 0.2 each)
            leaves = [u for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(labels)) if g == group]
            if leaves:
                sq = sum(jnp.sum(jnp.square(u.astype(jnp.float32))) for u in leaves)
                metrics[f"update_rms_{group}"] = jnp.sqrt(sq / sum(u.size for u in leaves)) / jnp.maximum(lr, 1e-12)
        if is_moe:
            load = aux["expert_load"]
            metrics["expert_load_max_over_mean"] = (load.max(-1) / jnp.maximum(load.mean(-1), 1e-9)).max()
        return new_state, metrics

    return train_step


def make_eval_step(cfg: Config, graphdef):
    def eval_step(params, variables, batch):
        model = nnx.merge(graphdef, params, variables)
        logits = model(batch["inputs"], batch["segment_ids"], batch["positions"])
        return cross_entropy(logits, batch["targets"], batch["loss_mask"], 0.0)[0]
    return jax.jit(eval_step)


# ------------------------------------------------------------------------------------------------- helpers

def global_batch_array(local: dict, sharding) -> dict:
    """Assemble each process's rows into one global array laid out by `sharding`."""
    process_count = jax.process_count()
    return {k: jax.make_array_from_process_local_data(
        sharding, np.asarray(v), (v.shape[0] * process_count, *v.shape[1:])) for k, v in local.items()}


def to_host(tree):
    """Replicated device values → numpy, on every process (`device_get` refuses arrays spanning processes)."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else x, tree)


def local_rows(batch: dict) -> dict:
    n, p = jax.process_count(), jax.process_index()
    return {k: v[p * len(v) // n:(p + 1) * len(v) // n] for k, v in batch.items()}


class MetricsWriter:
    """metrics.jsonl (one object per logged step) + TensorBoard, from process 0 only."""

    def __init__(self, run_dir: Path, tensorboard: bool):
        self.enabled = jax.process_index() == 0
        self.tb = None
        if self.enabled:
            path = run_dir / "metrics.jsonl"
            if path.is_file():  # a process killed mid-write leaves a partial last line: drop it
                text = path.read_text()
                if text and not text.endswith("\n"):
                    path.write_text(text[:text.rfind("\n") + 1])
            self.file = open(path, "a")
            if tensorboard:
                from tensorboardX import SummaryWriter
                self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        if self.tb:
            for k, v in metrics.items():
                for name, x in ([(f"{k}/{i}", x) for i, x in enumerate(v)] if isinstance(v, list) else [(k, v)]):
                    self.tb.add_scalar(name, x, step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb:
                self.tb.close()


def format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def prepare_run_dir(cfg: Config) -> Path:
    """Create run_dir and write config.yaml; on resume, refuse a config whose model or data differ."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    saved = run_dir / "config.yaml"
    if saved.is_file():
        old = yaml.safe_load(saved.read_text()) or {}
        new = cfg.to_dict()
        for section in ("model", "data", "seq_len"):
            if old.get(section) != new.get(section):
                raise ConfigError(
                    f"run_dir {run_dir} holds a run with a different {section!r} ({old.get(section)} vs "
                    f"{new.get(section)}); choose a new run_dir= or restore the original setting")
    if jax.process_index() == 0:
        tmp = run_dir / "config.yaml.tmp"
        tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        tmp.replace(saved)  # atomic: a crash never leaves a half-written config
    return run_dir


# ---------------------------------------------------------------------------------------------------- train

def pretraining_inputs(cfg: Config, mesh) -> RunInputs:
    """The configured corpus, packed into windows (train/data.py), and a random init."""
    corpus = data_lib.load_corpus(cfg.data, cache_dir(cfg))
    train_iter = data_lib.make_train_iterator(
        corpus, seq_len=cfg.seq_len, global_batch=cfg.global_batch, seed=cfg.seed, shuffle=cfg.data.shuffle,
        process_index=jax.process_index(), process_count=jax.process_count())
    val_batches = data_lib.make_val_batches(corpus, seq_len=cfg.seq_len, max_batches=cfg.log.eval_batches,
                                            batch_size=cfg.global_batch // cfg.grad_accum)
    entropy = data_lib.unigram_entropy(corpus.train, corpus.tokenizer.vocab_size)
    return RunInputs(corpus.tokenizer, train_iter, val_batches,
                     f"{len(corpus.train):,} train tokens, unigram entropy {entropy:.3f} nats",
                     summary={"unigram_entropy": entropy})


def train(cfg: Config, stop_after: int | None = None,
          inputs: Callable[[Config, jax.sharding.Mesh], RunInputs] = pretraining_inputs) -> dict:
    """Run (or resume) the job described by `cfg`; returns a summary (final step, losses, timings).

    `stop_after`: leave after this many steps of this invocation, checkpointed, as a preempted job would (the
    schedule still spans `cfg.steps`; run again to continue). `inputs(cfg, mesh)` makes the run's data and
    initial model (`RunInputs`)."""
    run_dir = prepare_run_dir(cfg)
    mesh = make_mesh(cfg)
    log.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), mesh.size, jax.process_count())

    # data
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    micro_batch = cfg.global_batch // cfg.grad_accum
    if micro_batch % dp or cfg.global_batch % jax.process_count():
        valid = [b for b in range(dp * cfg.grad_accum, 4 * cfg.global_batch + 1, dp * cfg.grad_accum)]
        near = sorted(valid, key=lambda b: abs(b - cfg.global_batch))[:2]
        raise ConfigError(f"global_batch={cfg.global_batch} / grad_accum={cfg.grad_accum} is not divisible by "
                          f"the data-parallel size {dp} (mesh data×fsdp); nearest valid global_batch: {sorted(near)}")
    run_inputs = inputs(cfg, mesh)
    tokenizer, train_iter = run_inputs.tokenizer, run_inputs.train_iter
    val_batches = [local_rows(b) for b in run_inputs.val_batches]

    # model + optimizer
    model_cfg = model_config_for(cfg, tokenizer)
    total_params, active_params = param_counts(model_cfg)
    if run_inputs.init_model is None:
        model = build_model(model_cfg, rngs=nnx.Rngs(params=cfg.seed), mesh=mesh)
    else:
        model = run_inputs.init_model(model_cfg, mesh)
    graphdef, params, variables = nnx.split(model, nnx.Param, ...)
    del model
    schedule = make_schedule(cfg)
    tx = make_optimizer(cfg, schedule, mesh)
    labels = muon_jax.default_labels(params)
    # eager init: each buffer is created with its parameter's sharding (jax.jit(tx.init) may replicate them)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "variables": variables, "opt_state": tx.init(params)}
    # scalars such as Adam's step count come out on the default device: replicate them over the mesh
    replicated = NamedSharding(mesh, P())
    state = jax.tree.map(lambda x: x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, replicated), state)
    state_shardings = jax.tree.map(lambda x: x.sharding, state)

    # resume
    ckpt = Checkpointer(run_dir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
    start = 0
    resumed = ckpt.restore_latest_valid(params=state["params"], opt_state=state["opt_state"],
                                        variables=state["variables"])
    if resumed is not None:
        start, items = resumed
        state = {"step": jax.device_put(jnp.asarray(start, jnp.int32), NamedSharding(mesh, P())),
                 "params": items["params"], "opt_state": items["opt_state"], "variables": items["variables"]}
        data_lib.restore_iterator(train_iter, items["data"])
        log.info("resumed from %s at step %d", ckpt.directory, start)

    batch_sharding = NamedSharding(mesh, P(BATCH_AXES))
    step_fn = jax.jit(make_train_step(cfg, graphdef, tx, schedule, labels, model_cfg),
                      donate_argnums=(0,), out_shardings=(state_shardings, None))
    eval_fn = make_eval_step(cfg, graphdef)
    tokens_per_step = cfg.global_batch * cfg.seq_len
    flops_token = flops_per_token(model_cfg, cfg.seq_len)
    peak = peak_flops() * mesh.size
    writer = MetricsWriter(run_dir, cfg.log.tensorboard)
    if jax.process_index() == 0:
        print(f"model {model_cfg.model_type}: {total_params / 1e6:.2f}M params ({active_params / 1e6:.2f}M active), "
              f"tokenizer {tokenizer.name} ({tokenizer.vocab_size}), {run_inputs.description}; "
              f"optimizer {cfg.optimizer.name}; steps {start}→{cfg.steps}", flush=True)

    def evaluate() -> float:
        losses = [eval_fn(state["params"], state["variables"], global_batch_array(b, batch_sharding))
                  for b in val_batches]
        return float(np.mean(to_host(losses)))

    def save(step: int) -> None:
        try:  # an async save's failure surfaces at the next save or at finish_saving
            ckpt.save(step, params=state["params"], opt_state=state["opt_state"], variables=state["variables"],
                      data=data_lib.iterator_state(train_iter), meta={"step": step, "config": cfg.to_dict()})
        except Exception as e:
            raise save_failed(step, e) from e

    def finish_saving() -> None:
        try:
            ckpt.close()
        except Exception as e:
            raise save_failed(ckpt.steps()[-1] if ckpt.steps() else 0, e) from e

    def save_failed(step, e) -> CheckpointError:
        older = [s for s in ckpt.steps() if s < step]
        kept = f"checkpoint {ckpt.directory / str(older[-1])} is intact" if older else "no earlier checkpoint exists"
        return CheckpointError(f"saving the checkpoint of step {step} failed ({type(e).__name__}: {e}); {kept}. "
                               "Free disk space (or fix the error) and start again in the same run_dir to resume.")

    initial_val = None
    if run_inputs.eval_at_start and start == 0:
        initial_val = evaluate()
        if jax.process_index() == 0:
            print(f"step      0/{cfg.steps} | val {initial_val:.4f}", flush=True)

    pending, losses, consecutive_skips, skipped = [], [], 0, 0
    last_val = None
    t_log, step_times = time.perf_counter(), []
    t_start = time.perf_counter()
    last_step = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    for step in range(start + 1, last_step + 1):
        batch = global_batch_array(next(train_iter), batch_sharding)
        state, metrics = step_fn(state, batch)
        pending.append(metrics)

        checkpoint_now = step % cfg.checkpoint.every == 0 or step == last_step
        if step % cfg.log.every == 0 or step == cfg.steps or checkpoint_now:  # a checkpoint is written only after its steps are checked
            fetched = to_host(pending)
            pending = []
            for i, m in enumerate(fetched):
                if not bool(m["finite"]):
                    at = step - len(fetched) + 1 + i
                    skipped += 1
                    consecutive_skips += 1
                    good = ckpt.steps()
                    where = f"last good checkpoint: {ckpt.directory / str(good[-1])}" if good else "no checkpoint yet"
                    if cfg.nan_policy == "halt" or consecutive_skips > cfg.max_consecutive_skips:
                        finish_saving()
                        raise NonFiniteLoss(
                            f"step {at}: loss={float(m['loss'])} grad_norm={float(m['grad_norm'])} is not finite "
                            f"(nan_policy={cfg.nan_policy}); {where}. Lower optimizer.learning_rate or check the data.")
                else:
                    consecutive_skips = 0
            now = time.perf_counter()
            tokens_per_s = tokens_per_step * len(fetched) / (now - t_log)
            t_log = now
            m = fetched[-1]
            row = {"loss": float(np.mean([f["loss"] for f in fetched])), "lr": float(m["lr"]),
                   "grad_norm": float(m["grad_norm"]), "tokens_per_s": tokens_per_s,
                   "mfu": tokens_per_s * flops_token / peak, "skipped_steps": skipped,
                   **{k: float(v) if np.ndim(v) == 0 else np.asarray(v).tolist()
                      for k, v in m.items() if k not in ("loss", "lr", "grad_norm", "finite")}}
            losses.append((step, row["loss"]))
            if step % cfg.log.eval_every == 0 or step == cfg.steps:
                last_val = row["val_loss"] = evaluate()
                t_log = time.perf_counter()  # evaluation time is not training throughput
            writer.write(step, row)
            if jax.process_index() == 0:
                step_times.append((now - t_start) / (step - start))
                eta = step_times[-1] * (cfg.steps - step)
                val = f" | val {row['val_loss']:.4f}" if "val_loss" in row else ""
                print(f"step {step:>6}/{cfg.steps} | loss {row['loss']:.4f}{val} | lr {row['lr']:.2e} | "
                      f"gnorm {row['grad_norm']:.2f} | {tokens_per_s / 1e3:.1f}k tok/s | MFU {100 * row['mfu']:.1f}% "
                      f"| ETA {format_eta(eta)}", flush=True)
        if checkpoint_now:
            save(step)

    finish_saving()
    writer.close()
    summary = {"run_dir": str(run_dir), "steps": last_step, "start_step": start, "losses": losses,
               "val_loss": last_val, "seconds": time.perf_counter() - t_start,
               "total_params": total_params, "active_params": active_params, **run_inputs.summary}
    if initial_val is not None:
        summary["initial_val_loss"] = initial_val
    if cfg.log.sample_tokens and jax.process_count() == 1 and last_step == cfg.steps > start:
        if run_inputs.sample is None:
            summary["sample"] = sample(graphdef, state, tokenizer, cfg)
        else:
            summary["sample"] = run_inputs.sample(
                nnx.merge(graphdef, jax.device_get(state["params"]), jax.device_get(state["variables"])))
        print(f"--- sample ({cfg.log.sample_tokens} tokens) ---\n{summary['sample']}\n---", flush=True)
    return summary


def sample(graphdef, state, tokenizer, cfg: Config) -> str:
    """Text generated from `cfg.log.sample_prompt` by the trained model (temperature 0.8, top-p 0.95)."""
    from train.generate import generate
    model = nnx.merge(graphdef, jax.device_get(state["params"]), jax.device_get(state["variables"]))
    prompt = tokenizer.encode(cfg.log.sample_prompt) or [tokenizer.eos_id]
    ids = generate(model, prompt, max_new_tokens=cfg.log.sample_tokens, temperature=0.8, top_p=0.95,
                   rng=jax.random.key(cfg.seed), eos_id=None)
    return cfg.log.sample_prompt + tokenizer.decode(ids)


__all__ = ["NonFiniteLoss", "RunInputs", "cache_dir", "cross_entropy", "make_mesh", "make_optimizer",
           "make_schedule", "make_train_step", "model_config_for", "pretraining_inputs", "train"]
