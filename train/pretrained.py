"""A trained model and its tokenizer from disk: a trainer run directory or a Hugging Face checkpoint directory.

    model, tokenizer = load_pretrained("runs/tiny")          # config.yaml + the newest readable checkpoint
    model, tokenizer = load_pretrained("path/to/hf_dir")     # config.json + *.safetensors + tokenizer.json
"""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from train.checkpoint import CheckpointError, Checkpointer
from train.config import load_config
from train.data import checkpoint_tokenizer, load_tokenizer
from train.models import abstract_model, state_shardings
from train.models.hf import load_hf_checkpoint
from train.runtime import cache_dir, model_config_for


def is_run_dir(path: Path) -> bool:
    """Whether `path` was written by `python -m train` / `python -m train.sft` (it holds config.yaml)."""
    return (Path(path) / "config.yaml").is_file()


def is_hf_dir(path: Path) -> bool:
    """Whether `path` is a Hugging Face checkpoint directory (config.json and safetensors)."""
    path = Path(path)
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def load_run_dir(run_dir: str | Path, step: int | None = None, mesh: jax.sharding.Mesh | None = None):
    """(model, tokenizer) from a run directory: its config.yaml and the params (and model variables) of the newest
    readable checkpoint, or of `step`. Placed on the first device, or laid out on `mesh` by the logical axes
    (each process then reads only its devices' parts: what a multi-process job needs)."""
    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        raise CheckpointError(f"{run_dir} is not a run directory (no config.yaml); pass a directory made by "
                              "`python -m train`, or a Hugging Face checkpoint directory")
    cfg = load_config(run_dir / "config.yaml")
    tokenizer = load_tokenizer(cfg.data, cache_dir())
    graphdef, params, variables = nnx.split(abstract_model(model_config_for(cfg, tokenizer)), nnx.Param, ...)
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, (params, variables))
    else:
        shardings = (state_shardings(params, mesh), state_shardings(variables, mesh))
    params, variables = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                     (params, variables), shardings)
    ckpt = Checkpointer(run_dir, create=False)
    if not ckpt.steps():
        raise CheckpointError(f"no checkpoint in {ckpt.directory}; train first")
    if step is None:
        restored = ckpt.restore_latest_valid(params=params, variables=variables)[1]
    else:
        restored = ckpt.restore(step, params=params, variables=variables)
    return nnx.merge(graphdef, restored["params"], restored["variables"]), tokenizer


def load_hf_dir(path: str | Path, dtype=jnp.float32):
    """(model, tokenizer) from a Hugging Face checkpoint directory; the tokenizer carries the checkpoint's
    special tokens and chat template (`checkpoint_tokenizer`: tokenizer.json, or Moonlight's tiktoken.model)."""
    tokenizer = checkpoint_tokenizer(path)
    return load_hf_checkpoint(path, dtype=dtype)[0], tokenizer


def load_pretrained(path: str | Path, dtype=jnp.float32):
    """(model, tokenizer) from a run directory or a Hugging Face checkpoint directory."""
    path = Path(path).expanduser()
    if is_run_dir(path):
        return load_run_dir(path)
    if is_hf_dir(path):
        return load_hf_dir(path, dtype)
    raise CheckpointError(f"{path} is neither a trainer run directory (config.yaml) nor a Hugging Face checkpoint "
                          "directory (config.json + *.safetensors)")
