"""Orbax checkpoints of a run: params, optimizer state, model variables, data-iterator state and metadata.

Layout: `run_dir/checkpoints/<step>/{params,opt_state,variables,data,meta}`. Items are separate so inference
restores `params` alone. Orbax writes each step into a temporary directory and renames it when complete, so a
save killed half-way never looks like a checkpoint; on restore, a checkpoint that fails to read (truncated or
missing files) is reported and the next older one is tried. Nothing here deletes a checkpoint except orbax's
`max_to_keep` rotation after a newer save has completed.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger("train")

ITEMS = ("params", "opt_state", "variables", "data", "meta")


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one that does not fit the config; the message says which and what to do."""


def abstract_like(tree):
    """ShapeDtypeStructs (with shardings) of a tree of arrays: the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _path_name(path) -> str:
    """'layers/mlp/down_proj/kernel' for both nnx State paths (…].value) and orbax metadata paths (…]['value'])."""
    parts = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    return "/".join(p for p in parts if p != "value")


class Checkpointer:
    """The checkpoints of one run directory: save, list, and restore into given shapes and shardings."""

    def __init__(self, run_dir: str | Path, *, keep: int = 3, async_save: bool = True, create: bool = True):
        self.directory = Path(run_dir).resolve() / "checkpoints"
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=create)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def steps(self) -> list[int]:
        """The saved steps, oldest first."""
        return sorted(self.manager.all_steps())

    def save(self, step: int, *, params, opt_state, variables, data: dict, meta: dict) -> None:
        """Write one step (asynchronously when so configured); an unreadable checkpoint of the same step is kept
        aside, never overwritten."""
        if step in self.manager.all_steps():
            # only an unreadable checkpoint (skipped on resume) can hold a step we are about to write again:
            # keep it for inspection under another name rather than overwrite or delete it
            if jax.process_index() == 0:
                aside = self.directory / f"unreadable-{step}-{int(time.time())}"
                (self.directory / str(step)).rename(aside)
                log.warning("moved the unreadable checkpoint of step %d to %s", step, aside)
            self.manager.reload()
        trees = {"params": params, "opt_state": opt_state, "variables": variables}
        # orbax refuses empty trees (a dense model has no non-Param variables): such items are simply absent
        args = {k: ocp.args.StandardSave(v) for k, v in trees.items() if jax.tree.leaves(v)}
        self.manager.save(step, args=ocp.args.Composite(
            **args, data=ocp.args.JsonSave(data), meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, step: int, *, params, opt_state=None, variables=None) -> dict[str, Any]:
        """Restore one step into the shapes/shardings of the given (abstract or concrete) trees; an item given as
        None (e.g. the optimizer state, for inference) is not read and comes back as None."""
        trees = {"params": params, "opt_state": opt_state, "variables": variables}
        args = {k: ocp.args.StandardRestore(abstract_like(v)) for k, v in trees.items()
                if v is not None and jax.tree.leaves(v)}
        restored = self.manager.restore(step, args=ocp.args.Composite(
            **args, data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
        return {name: restored[name] if name in args or name in ("data", "meta") else trees.get(name)
                for name in ITEMS}

    def check_shapes(self, step: int, params) -> None:
        """Raise CheckpointError naming the first parameter whose saved shape differs from the model's."""
        saved = ocp.StandardCheckpointer().metadata(self.directory / str(step) / "params")
        saved = getattr(getattr(saved, "item_metadata", saved), "tree", saved)
        saved_shapes = {_path_name(k): tuple(v.shape) for k, v in jax.tree_util.tree_flatten_with_path(saved)[0]}
        for k, v in jax.tree_util.tree_flatten_with_path(params)[0]:
            name = _path_name(k)
            if saved_shapes.get(name, tuple(v.shape)) != tuple(v.shape):
                raise CheckpointError(
                    f"checkpoint {self.directory / str(step)} does not fit the model: {name} has shape "
                    f"{saved_shapes[name]} there but {tuple(v.shape)} in the config. Use the run's original model "
                    "settings, or a new run_dir.")
            if name not in saved_shapes:
                raise CheckpointError(f"checkpoint {self.directory / str(step)} has no tensor {name} that the model "
                                      "needs; use the run's original model settings, or a new run_dir.")

    def restore_latest_valid(self, **targets) -> tuple[int, dict[str, Any]] | None:
        """The newest checkpoint that restores cleanly (older ones are tried when a newer one is corrupt)."""
        failures = []
        for step in reversed(self.steps()):
            try:
                self.check_shapes(step, targets["params"])  # a mismatch is the config's fault, not corruption
                restored = self.restore(step, **targets)
            except CheckpointError:
                raise
            except Exception as e:  # a corrupt checkpoint shows up as any of orbax/tensorstore/json errors
                failures.append(f"step {step}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                log.warning("checkpoint %s/%d is unreadable (%s); trying an older one",
                            self.directory, step, failures[-1])
                continue
            if failures:
                log.warning("resuming from step %d; newer checkpoints skipped: %s", step, "; ".join(failures))
            return step, restored
        if failures:
            raise CheckpointError(
                f"no readable checkpoint in {self.directory}: {'; '.join(failures)}. Move the directory away to "
                "start afresh, or fix the config if the shapes changed.")
        return None

    def close(self) -> None:
        """Wait for pending saves (raising their errors) and release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()
