"""A finished run's state for measurements beyond its metrics (bench/gram_ns.py's fixture): parameters,
optimizer state and the next batch's gradient, restored through the trainer's own path
(`train.checkpoint.Checkpointer.restore` into the abstract model of `train.models.abstract_model`)."""
from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from train import data as data_lib
from train.checkpoint import Checkpointer
from train.config import load_config
from train.models import abstract_model
from train.optim import make_optimizer, make_schedule
from train.runtime import cache_dir, make_mesh, model_config_for
from train.step import cross_entropy


@functools.lru_cache(maxsize=None)
def restore_for_update(run_dir: Path):
    """(cfg, params, opt_state, grads) of a finished run: its last checkpoint's parameters and optimizer state,
    and the gradient of the batch the trainer would have taken next (data iterator restored exactly)."""
    cfg = load_config(run_dir / "config.yaml")
    corpus = data_lib.load_corpus(cfg.data, cache_dir())
    model_cfg = model_config_for(cfg, corpus.tokenizer)
    # abstract targets (shapes only) for the restore: nothing is initialised or compiled just to be overwritten
    graphdef, params, variables = nnx.split(abstract_model(model_cfg), nnx.Param, ...)
    opt_state = jax.eval_shape(make_optimizer(cfg, make_schedule(cfg), make_mesh(cfg)).init, params)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    params, opt_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                                     (params, opt_state))
    ckpt = Checkpointer(run_dir, keep=cfg.checkpoint.keep, async_save=False)
    try:
        items = ckpt.restore(ckpt.steps()[-1], params=params, opt_state=opt_state, variables=variables)
    finally:
        ckpt.close()
    it = data_lib.make_train_iterator(corpus, seq_len=cfg.seq_len, global_batch=cfg.global_batch, seed=cfg.seed,
                                      shuffle=cfg.data.shuffle)
    data_lib.restore_iterator(it, items["data"])
    batch = {k: jnp.asarray(v) for k, v in next(it).items()}

    def loss(p):
        logits = nnx.merge(graphdef, p, items["variables"])(batch["inputs"], batch["segment_ids"], batch["positions"])
        return cross_entropy(logits, batch["targets"], batch["loss_mask"], 0.0)[0]

    return cfg, items["params"], items["opt_state"], jax.jit(jax.grad(loss))(items["params"])
