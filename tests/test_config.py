"""Config loading and validation: YAML + dotted overrides, strict keys with suggestions, typed values."""
from pathlib import Path

import pytest

from train.config import ConfigError, config_from_dict, load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_builds_its_model_config(path):
    from train.models import model_config_from_dict as model_config
    cfg = load_config(path)
    model_config({"vocab_size": 50257, **cfg.model})  # strict model keys: a typo in a shipped config fails here


def test_overrides_are_applied_and_typed():
    cfg = load_config(CONFIGS / "tiny.yaml", ["optimizer.learning_rate=0.05", "steps=7", "mesh.fsdp=2",
                                               "optimizer.name=adamw", "model.hidden_size=64", "run_dir=/tmp/x"])
    assert (cfg.optimizer.learning_rate, cfg.steps, cfg.mesh.fsdp, cfg.optimizer.name) == (0.05, 7, 2, "adamw")
    assert cfg.model["hidden_size"] == 64 and cfg.run_dir == "/tmp/x"
    assert isinstance(load_config(CONFIGS / "tiny.yaml", ["optimizer.learning_rate=1"]).optimizer.learning_rate, float)


@pytest.mark.parametrize("override, message", [
    ("optimizer.learning_rat=0.1", "did you mean 'learning_rate'"),
    ("optimiser.name=muon", "did you mean 'optimizer'"),
    ("stpes=3", "did you mean 'steps'"),
    ("data.tokeniser=byte", "did you mean 'tokenizer'"),
    ("optimizer.name=sgd", "choose one of ('muon', 'adamw')"),
    ("steps=ten", "'steps' must be int"),
    ("optimizer.nesterov=3", "'optimizer.nesterov' must be bool"),
    ("global_batch=30", "not divisible by grad_accum"),
    ("noequals", "must look like key=value"),
])
def test_bad_config_names_the_problem(override, message):
    extra = ["grad_accum=4"] if override.startswith("global_batch") else []
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(CONFIGS / "tiny.yaml", [override, *extra])


def test_missing_file_and_model_type():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("configs/nope.yaml")
    with pytest.raises(ConfigError, match="needs a model_type"):
        config_from_dict({"model": {"hidden_size": 8}})
