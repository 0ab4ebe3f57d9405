"""The training loop, top to bottom: config → mesh → data → model → optimizer → (resume) → steps → eval → save.

`train(cfg)` runs one job described by a `train.config.Config` and returns a summary dict. What the run reads and
starts from is a `RunInputs` (default: `pretraining_inputs`, the configured corpus and a random init); supervised
fine-tuning (train/sft.py) runs the same loop with chat batches and a loaded model. Each step is one jitted,
buffer-donating `train_step(state, batch) -> (state, metrics)` from train/step.py.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax import nnx
from jax.sharding import NamedSharding

import muon_jax
from train import data as data_lib
from train.checkpoint import CheckpointError, Checkpointer
from train.config import Config, ConfigError
from train.data.sources import atomic_write
from train.decode import generate
from train.metrics import MetricsWriter, metrics_row, progress_line
from train.mfu import flops_per_token, peak_flops
from train.models import attention_path, build_model, param_counts
from train.optim import make_optimizer, make_schedule
from train.preemption import Preempted, StopSignal
from train.runtime import (batch_sharding, cache_dir, data_parallel_size, global_batch_array, local_rows,
                           make_mesh, model_config_for, on_mesh, replicated, to_host, use_compile_cache)
from train.step import make_eval_step, make_logit_probe, make_loss_fn, make_train_step

log = logging.getLogger("train")


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


@dataclasses.dataclass
class Run:
    """A run set up and ready to step: everything the loop reads, and the `state` it advances."""
    cfg: Config
    run_dir: Path
    mesh: jax.sharding.Mesh
    inputs: RunInputs
    model_cfg: object
    graphdef: object
    state: dict
    step_fn: Callable
    eval_fn: Callable
    val_batches: list[dict]
    ckpt: Checkpointer
    start: int = 0


def prepare_run_dir(cfg: Config) -> Path:
    """Create run_dir and write config.yaml; on resume, refuse a config whose model, data or global batch differ."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    saved = run_dir / "config.yaml"
    if saved.is_file():
        old = yaml.safe_load(saved.read_text()) or {}
        new = cfg.to_dict()
        if old.get("global_batch", cfg.global_batch) != cfg.global_batch:
            # the data iterator's position and the schedule count global batches: another size would repeat or
            # skip examples. The mesh, process count and grad_accum may change.
            raise ConfigError(
                f"global_batch={cfg.global_batch} differs from global_batch={old['global_batch']} of the run in "
                f"{run_dir}; a resumed run must keep global_batch (the mesh, process count and grad_accum may "
                "change). Set global_batch back, or choose a new run_dir=")
        for section in ("model", "data", "seq_len"):
            if old.get(section) != new.get(section):
                raise ConfigError(
                    f"run_dir {run_dir} holds a run with a different {section!r} ({old.get(section)} vs "
                    f"{new.get(section)}); choose a new run_dir= or restore the original setting")
    if jax.process_index() == 0:  # atomic: a crash never leaves a half-written config
        atomic_write(saved, lambda tmp: tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False)))
    return run_dir


def pretraining_inputs(cfg: Config, mesh) -> RunInputs:
    """The configured corpus, packed into windows (train/data/corpus.py), and a random init."""
    corpus = data_lib.load_corpus(cfg.data, cache_dir())
    train_iter = data_lib.make_train_iterator(
        corpus, seq_len=cfg.seq_len, global_batch=cfg.global_batch, seed=cfg.seed, shuffle=cfg.data.shuffle,
        process_index=jax.process_index(), process_count=jax.process_count(), worker_count=cfg.data.workers,
        prefetch=cfg.data.prefetch)
    val_batches = data_lib.make_val_batches(corpus, seq_len=cfg.seq_len, max_batches=cfg.log.eval_batches,
                                            batch_size=cfg.global_batch // cfg.grad_accum)
    entropy = data_lib.unigram_entropy(corpus.train, corpus.tokenizer.vocab_size)
    return RunInputs(corpus.tokenizer, train_iter, val_batches,
                     f"{len(corpus.train):,} train tokens, unigram entropy {entropy:.3f} nats",
                     summary={"unigram_entropy": entropy})


def check_batch_fits_mesh(cfg: Config, mesh) -> None:
    """Every micro-batch must split evenly over the data-parallel devices, and the batch over processes."""
    dp = data_parallel_size(mesh)
    if (cfg.global_batch // cfg.grad_accum) % dp or cfg.global_batch % jax.process_count():
        valid = range(dp * cfg.grad_accum, 4 * cfg.global_batch + 1, dp * cfg.grad_accum)
        near = sorted(valid, key=lambda b: abs(b - cfg.global_batch))[:2]
        raise ConfigError(f"global_batch={cfg.global_batch} / grad_accum={cfg.grad_accum} is not divisible by "
                          f"the data-parallel size {dp} (mesh data×fsdp); nearest valid global_batch: {sorted(near)}")


def model_routing(graphdef, params, variables, rows: int, seq_len: int, z_loss: float = 0.0) -> muon_jax.Routing:
    """Which params Muon orthogonalises, and as which matrices, read from the model's own training loss by
    `muon_jax.infer_routing`: traced on an abstract [rows, seq_len] micro-batch, so nothing runs or is allocated."""
    tokens = jax.ShapeDtypeStruct((rows, seq_len), jnp.int32)
    batch = {"inputs": tokens, "targets": tokens, "segment_ids": tokens, "positions": tokens,
             "loss_mask": jax.ShapeDtypeStruct((rows, seq_len), jnp.float32)}
    loss_fn = make_loss_fn(graphdef, z_loss)
    # the loss alone: aux outputs (expert loads, attention logits) are monitoring, not what is trained on
    return muon_jax.infer_routing(lambda p, v, b: loss_fn(p, v, b)[0], params, variables, batch)


def initial_state(cfg: Config, model_cfg, mesh, inputs: RunInputs):
    """(graphdef, state, tx, schedule, routing): the model split into params/variables, a fresh optimizer state
    with every buffer laid out like its parameter, and the `muon_jax.Routing` the optimizer uses."""
    if inputs.init_model is None:
        model = build_model(model_cfg, rngs=nnx.Rngs(params=cfg.seed), mesh=mesh)
    else:
        model = inputs.init_model(model_cfg, mesh)
    graphdef, params, variables = nnx.split(model, nnx.Param, ...)
    routing = model_routing(graphdef, params, variables, cfg.global_batch // cfg.grad_accum, cfg.seq_len,
                            cfg.optimizer.z_loss)
    schedule = make_schedule(cfg)
    tx = make_optimizer(cfg, schedule, mesh, jax.tree.map(lambda x: getattr(x.sharding, "spec", None), params),
                        routing=routing)
    # eager init: each buffer is created with its parameter's sharding (jax.jit(tx.init) may replicate them)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "variables": variables, "opt_state": tx.init(params)}
    # scalars such as Adam's step count come out on the default device: replicate them over the mesh
    state = jax.tree.map(lambda x: x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, replicated(mesh)),
                         state)
    return graphdef, state, tx, schedule, routing


def setup(cfg: Config, inputs: Callable[[Config, jax.sharding.Mesh], RunInputs]) -> Run:
    """Run dir, mesh, data, model, optimizer, jitted steps and the checkpointer of a run (before any resume)."""
    use_compile_cache(cfg)   # before anything compiles
    run_dir = prepare_run_dir(cfg)
    mesh = make_mesh(cfg)
    log.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), mesh.size, jax.process_count())
    check_batch_fits_mesh(cfg, mesh)
    run_inputs = inputs(cfg, mesh)
    model_cfg = model_config_for(cfg, run_inputs.tokenizer)
    graphdef, state, tx, schedule, routing = initial_state(cfg, model_cfg, mesh, run_inputs)
    log.info("%s (table: %s)", routing.summary(), run_dir / "routing.txt")
    if jax.process_index() == 0:
        (run_dir / "routing.txt").write_text(str(routing) + "\n")
    log.info("attention: %s (%s)", *attention_path(jax.default_backend(), model_cfg.dtype,
                                                   model_cfg.attention_head_dim))
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    step_fn = jax.jit(make_train_step(cfg, graphdef, tx, schedule, routing.labels, model_cfg),
                      donate_argnums=(0,), out_shardings=(state_shardings, None))
    ckpt = Checkpointer(run_dir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
    # on the mesh: attention runs per device under shard_map (a Pallas/cuDNN kernel cannot be partitioned by GSPMD)
    step_fn, eval_fn = on_mesh(mesh, step_fn), on_mesh(mesh, make_eval_step(graphdef))
    return Run(cfg, run_dir, mesh, run_inputs, model_cfg, graphdef, state, step_fn, eval_fn,
               [local_rows(b) for b in run_inputs.val_batches], ckpt)


def resume(run: Run) -> None:
    """Continue from the newest readable checkpoint, if any: state, step and data-iterator position."""
    state = run.state
    resumed = run.ckpt.restore_latest_valid(params=state["params"], opt_state=state["opt_state"],
                                            variables=state["variables"])
    if resumed is None:
        return
    run.start, items = resumed
    run.state = {"step": jax.device_put(jnp.asarray(run.start, jnp.int32), replicated(run.mesh)),
                 "params": items["params"], "opt_state": items["opt_state"], "variables": items["variables"]}
    data_lib.restore_iterator(run.inputs.train_iter, items["data"])
    log.info("resumed from %s at step %d", run.ckpt.directory, run.start)


def evaluate(run: Run) -> float:
    """Mean validation loss over the run's validation batches."""
    sharding = batch_sharding(run.mesh, (run.cfg.global_batch // run.cfg.grad_accum, run.cfg.seq_len))
    losses = [run.eval_fn(run.state["params"], run.state["variables"], global_batch_array(b, sharding))
              for b in run.val_batches]
    return float(np.mean(to_host(losses)))


def save_failed(ckpt: Checkpointer, step: int, e: Exception) -> CheckpointError:
    """The error to raise when writing a checkpoint failed: it names the newest intact checkpoint."""
    older = [s for s in ckpt.steps() if s < step]
    kept = f"checkpoint {ckpt.directory / str(older[-1])} is intact" if older else "no earlier checkpoint exists"
    return CheckpointError(f"saving the checkpoint of step {step} failed ({type(e).__name__}: {e}); {kept}. "
                           "Free disk space (or fix the error) and start again in the same run_dir to resume.")


def save(run: Run, step: int) -> None:
    """Checkpoint the state and the data-iterator position at `step` (an async failure surfaces later)."""
    s = run.state
    try:
        run.ckpt.save(step, params=s["params"], opt_state=s["opt_state"], variables=s["variables"],
                      data=data_lib.iterator_state(run.inputs.train_iter),
                      meta={"step": step, "config": run.cfg.to_dict()})
    except Exception as e:
        raise save_failed(run.ckpt, step, e) from e


def finish_saving(run: Run) -> None:
    """Wait for pending checkpoint writes; a failed one raises CheckpointError."""
    try:
        run.ckpt.close()
    except Exception as e:
        steps = run.ckpt.steps()
        raise save_failed(run.ckpt, steps[-1] if steps else 0, e) from e


class NanPolicy:
    """Counts non-finite steps (whose update the step already dropped) and stops the run as `nan_policy` says."""

    def __init__(self, run: Run):
        self.run, self.skipped, self.consecutive = run, 0, 0

    def check(self, fetched: list[dict], last_step: int) -> None:
        """`fetched`: the host metrics of the steps up to `last_step`; raises NonFiniteLoss when the run must stop."""
        cfg = self.run.cfg
        for i, m in enumerate(fetched):
            if bool(m["finite"]):
                self.consecutive = 0
                continue
            self.skipped += 1
            self.consecutive += 1
            if cfg.nan_policy == "halt" or self.consecutive > cfg.max_consecutive_skips:
                good = self.run.ckpt.steps()
                where = (f"last good checkpoint: {self.run.ckpt.directory / str(good[-1])}" if good
                         else "no checkpoint yet")
                finish_saving(self.run)
                raise NonFiniteLoss(
                    f"step {last_step - len(fetched) + 1 + i}: loss={float(m['loss'])} "
                    f"grad_norm={float(m['grad_norm'])} is not finite (nan_policy={cfg.nan_policy}); {where}. "
                    "Lower optimizer.learning_rate or check the data.")


class Logger:
    """Turns fetched step metrics into metrics.jsonl rows, validation passes and the progress line."""

    def __init__(self, run: Run):
        cfg, self.run = run.cfg, run
        self.writer = MetricsWriter(run.run_dir, cfg.log.tensorboard)
        self.tokens_per_step = cfg.global_batch * cfg.seq_len
        peak = peak_flops(cache=cache_dir())
        self.flops_per_s_per_token = (None if peak is None else
                                      flops_per_token(run.model_cfg, cfg.seq_len) / (peak * run.mesh.size))
        # without MuonClip the step computes no max logit: measure it here, at logging steps only
        micro_batch = cfg.global_batch // cfg.grad_accum
        self.probe = None if cfg.muon_clip.enabled else on_mesh(run.mesh, make_logit_probe(run.graphdef, micro_batch))
        self.t_log = self.t_start = time.perf_counter()
        self.losses, self.last_val = [], None

    def log(self, step: int, fetched: list[dict], skipped: int, batch: dict) -> None:
        """Write the row of the steps in `fetched` (ending at `step`, whose batch was `batch`), evaluating when it
        is time."""
        cfg, now = self.run.cfg, time.perf_counter()
        tokens_per_s = self.tokens_per_step * len(fetched) / (now - self.t_log)
        if self.probe is not None:
            state = self.run.state
            logits = to_host(self.probe(state["params"], state["variables"], batch))
            fetched = [*fetched[:-1], {**fetched[-1], **logits}]
        mfu = None if self.flops_per_s_per_token is None else tokens_per_s * self.flops_per_s_per_token
        row = metrics_row(fetched, tokens_per_s, mfu, skipped)
        self.losses.append((step, row["loss"]))
        if step % cfg.log.eval_every == 0 or step == cfg.steps:
            self.last_val = row["val_loss"] = evaluate(self.run)
        self.t_log = time.perf_counter()  # evaluation time is not training throughput
        self.writer.write(step, row)
        if jax.process_index() == 0:
            eta = (now - self.t_start) / (step - self.run.start) * (cfg.steps - step)
            print(progress_line(step, cfg.steps, row, eta), flush=True)


def flush_metrics(run: Run, logger: Logger, nan_policy: NanPolicy, pending: list, step: int, batch: dict) -> None:
    """Fetch the metrics of the steps up to `step` (whose batch was `batch`), apply the NaN policy and log them."""
    fetched = to_host(pending)
    nan_policy.check(fetched, step)
    logger.log(step, fetched, nan_policy.skipped, batch)


def run_steps(run: Run, last_step: int, stop: StopSignal | None = None) -> Logger:
    """Steps start+1 … last_step: fetch metrics at log and checkpoint steps, apply the NaN policy, then save.

    When `stop` (SIGTERM/SIGINT, agreed by all processes) asks, the run ends after the step in flight: that step
    is logged and checkpointed synchronously, and `Preempted` is raised. A request that came before the first
    step was dispatched (during set-up or compilation) drops that step and writes nothing."""
    cfg, logger, nan_policy = run.cfg, Logger(run), NanPolicy(run)
    stop = stop or StopSignal()
    sharding = batch_sharding(run.mesh, (cfg.global_batch, cfg.seq_len))
    pending, step, batch = [], run.start, None
    while step < last_step and not stop.agreed(run.mesh):
        batch = global_batch_array(next(run.inputs.train_iter), sharding)
        step += 1
        run.state, metrics = run.step_fn(run.state, batch)  # the first call compiles
        pending.append(metrics)
        if step == run.start + 1 and stop.agreed(run.mesh, wait=True):
            step, pending = run.start, []
            break
        checkpoint_now = step % cfg.checkpoint.every == 0 or step == last_step
        # a checkpoint is written only after its steps were checked for NaN
        if step % cfg.log.every == 0 or step == cfg.steps or checkpoint_now:
            flush_metrics(run, logger, nan_policy, pending, step, batch)
            pending = []
        if checkpoint_now:
            save(run, step)
    if step < last_step:
        preempt(run, logger, nan_policy, pending, step, batch, stop)
    finish_saving(run)
    logger.writer.close()
    return logger


def preempt(run: Run, logger: Logger, nan_policy: NanPolicy, pending: list, step: int, batch: dict | None,
            stop: StopSignal) -> None:
    """End the run after `step` (whose batch was `batch`) on a stop request: log its pending metrics, checkpoint it
    (unless no step ran or the loop already saved it) and wait for the write; raises Preempted."""
    log.warning("%s received: stopping after step %d", stop.received[0] if stop.received else "stop request", step)
    checkpoint = None
    if step > run.start:
        if pending:
            flush_metrics(run, logger, nan_policy, pending, step, batch)
        if step % run.cfg.checkpoint.every:
            save(run, step)
        checkpoint = run.ckpt.directory / str(step)
    finish_saving(run)
    logger.writer.close()
    raise Preempted(step, checkpoint, stop.received or ["a stop request"])


def sample(run: Run) -> str:
    """The end-of-run sample: the inputs' own, or a continuation of `log.sample_prompt` (temperature 0.8, top-p
    0.95)."""
    cfg, tokenizer = run.cfg, run.inputs.tokenizer
    model = nnx.merge(run.graphdef, jax.device_get(run.state["params"]), jax.device_get(run.state["variables"]))
    if run.inputs.sample is not None:
        return run.inputs.sample(model)
    prompt = tokenizer.encode(cfg.log.sample_prompt) or [tokenizer.eos_id]
    ids = generate(model, prompt, max_new_tokens=cfg.log.sample_tokens, temperature=0.8, top_p=0.95,
                   rng=jax.random.key(cfg.seed), eos_id=None)
    return cfg.log.sample_prompt + tokenizer.decode(ids)


def train(cfg: Config, stop_after: int | None = None,
          inputs: Callable[[Config, jax.sharding.Mesh], RunInputs] = pretraining_inputs) -> dict:
    """Run (or resume) the job described by `cfg`; returns a summary (final step, losses, timings).

    `stop_after`: leave after this many steps of this invocation, checkpointed, as a preempted job would (the
    schedule still spans `cfg.steps`; run again to continue). `inputs(cfg, mesh)` makes the run's data and
    initial model (`RunInputs`). SIGTERM or SIGINT (Ctrl-C) ends the run after the step in flight, checkpointed,
    with `train.preemption.Preempted`."""
    with StopSignal() as stop:  # from here on SIGTERM/SIGINT stop the run cleanly (see train/preemption.py)
        run = setup(cfg, inputs)
        resume(run)
        total_params, active_params = param_counts(run.model_cfg)
        if jax.process_index() == 0:
            print(f"model {run.model_cfg.model_type}: {total_params / 1e6:.2f}M params ({active_params / 1e6:.2f}M "
                  f"active), tokenizer {run.inputs.tokenizer.name} ({run.inputs.tokenizer.vocab_size}), "
                  f"{run.inputs.description}; optimizer {cfg.optimizer.name}; steps {run.start}→{cfg.steps}",
                  flush=True)
        summary = {"run_dir": str(run.run_dir), "start_step": run.start, "total_params": total_params,
                   "active_params": active_params, **run.inputs.summary}
        if run.inputs.eval_at_start and run.start == 0:
            summary["initial_val_loss"] = evaluate(run)
            if jax.process_index() == 0:
                print(f"step      0/{cfg.steps} | val {summary['initial_val_loss']:.4f}", flush=True)
        last_step = cfg.steps if stop_after is None else min(cfg.steps, run.start + stop_after)
        logger = run_steps(run, last_step, stop)
        summary.update(steps=last_step, losses=logger.losses, val_loss=logger.last_val,
                       seconds=time.perf_counter() - logger.t_start)
        if cfg.log.sample_tokens and jax.process_count() == 1 and last_step == cfg.steps > run.start:
            summary["sample"] = sample(run)
            print(f"--- sample ({cfg.log.sample_tokens} tokens) ---\n{summary['sample']}\n---", flush=True)
    return summary
