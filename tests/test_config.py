"""Config loading and validation: YAML + dotted overrides, strict keys with suggestions, typed values, enumerated
options checked at load (one line naming key, value and the closest valid one; exit 2 from every command line)."""
import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest

import muon_jax
from train.config import ConfigError, bundled_config, config_from_dict, load_config

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
    ("optimizer.name=sgd", "optimizer.name='sgd' is not one of 'muon', 'adamw'"),
    ("steps=ten", "'steps' must be int"),
    ("optimizer.nesterov=3", "'optimizer.nesterov' must be bool"),
    ("global_batch=30", "not divisible by grad_accum"),
    ("noequals", "must look like key=value"),
    ("optimizer.learning_rate=-1", "optimizer.learning_rate=-1.0 must be a positive number"),
    ("optimizer.learning_rate=0", "optimizer.learning_rate=0.0 must be a positive number"),
    ("optimizer.weight_decay=-0.1", "optimizer.weight_decay=-0.1 must be ≥ 0"),
    ("optimizer.grad_clip=-1", "optimizer.grad_clip=-1.0 must be ≥ 0"),
    ("schedule.final_fraction=2", "schedule.final_fraction=2.0 must be in \\[0, 1\\]"),
    ("schedule.warmup_steps=-5", "schedule.warmup_steps=-5 must be ≥ 0"),
])
def test_bad_config_names_the_problem(override, message):
    extra = ["grad_accum=4"] if override.startswith("global_batch") else []
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(CONFIGS / "tiny.yaml", [override, *extra])


def test_missing_file_and_model_type():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("configs/nope.yaml")
    with pytest.raises(ConfigError, match="no bundled config 'nope.yaml'; bundled: .*tiny.yaml"):
        bundled_config("nope.yaml")
    with pytest.raises(ConfigError, match="needs a model_type"):
        config_from_dict({"model": {"hidden_size": 8}})


# Every option with a fixed set of values, a typo of it, and the valid value the message must suggest.
TYPOS = [
    ("optimizer.name", "adamv", "adamw"),
    ("optimizer.ns_mode", "plced", "placed"),
    ("optimizer.ns_method", "grm", "gram"),
    ("optimizer.ns_coeffs", "polar", "polar_express"),
    ("optimizer.lr_scale", "moonlite", "moonlight"),
    ("optimizer.ns_dtype", "bfloat61", "bfloat16"),
    ("schedule.name", "cosin", "cosine"),
    ("nan_policy", "skp", "skip"),
    ("data.format", "jsnl", "jsonl"),
    ("model.model_type", "lama", "llama"),
    ("model.remat", "ful", "full"),
    ("model.dtype", "bfloat61", "bfloat16"),
    ("model.param_dtype", "flaot32", "float32"),
    ("model.hidden_act", "siilu", "silu"),
    ("model.scoring_func", "sigmod", "sigmoid"),
    ("model.topk_method", "noaux", "noaux_tc"),
]


@pytest.mark.parametrize("key, typo, closest", TYPOS, ids=[t[0] for t in TYPOS])
def test_enumerated_option_typo_names_key_value_and_closest(key, typo, closest):
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS / "tiny.yaml", [f"{key}={typo}"])
    message = str(e.value)
    assert message.startswith(f"{key}={typo!r} is not one of ") and message.endswith(f"(did you mean {closest!r}?)")
    assert "\n" not in message


def test_rope_type_typo_in_a_nested_mapping():
    with pytest.raises(ConfigError, match=r"model.rope_scaling.rope_type='yarnn' is not one of .*did you mean 'yarn'"):
        load_config(CONFIGS / "tiny.yaml", ["model.rope_scaling={rope_type: yarnn, factor: 2}"])


def test_every_enumerated_field_of_the_config_is_covered_by_the_typos():
    from train.config import MODEL_CHOICES, Config

    def literal_keys(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                yield from literal_keys(hints[f.name], f"{prefix}{f.name}.")
            elif typing.get_origin(hints[f.name]) is typing.Literal:
                yield prefix + f.name
    enumerated = set(literal_keys(Config)) | {f"model.{k}" for k in MODEL_CHOICES}
    assert enumerated == {key for key, _, _ in TYPOS}


def test_config_enumerations_are_muon_jax_and_model_ones():
    """train.config restates muon_jax's option values (it must not import JAX): they must stay equal."""
    from train.config import LrScale, ModelType, NsCoeffs, NsMethod, NsMode, RematPolicy, RopeType
    from train.models.model_config import CONFIG_CLASSES
    args = typing.get_args
    assert args(NsMode) == muon_jax.NS_MODES and args(NsMethod) == muon_jax.NS_METHODS
    assert args(LrScale) == muon_jax.LR_SCALES and set(args(NsCoeffs)) == set(muon_jax.NS_SCHEDULES)
    assert set(args(ModelType)) == set(CONFIG_CLASSES)
    from train.models import model_config_from_dict
    for remat in args(RematPolicy):  # every listed value is one the models accept
        model_config_from_dict({"model_type": "llama", "remat": remat})
    for rope_type in args(RopeType):
        model_config_from_dict({"model_type": "llama", "rope_scaling": {"rope_type": rope_type, "factor": 2.0,
                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 1024}})


def test_model_config_checks_its_enumerations_itself():
    """Built from a dict or a Hugging Face config.json, outside load_config, the same check applies."""
    from train.models import model_config_from_dict, model_config_from_hf
    with pytest.raises(ConfigError, match="remat='dot' is not one of .*did you mean 'dots'"):
        model_config_from_dict({"model_type": "llama", "remat": "dot"})
    with pytest.raises(ConfigError, match="hidden_act='gelu' is not one of 'silu'"):
        model_config_from_hf({"model_type": "llama", "hidden_act": "gelu"})
    with pytest.raises(ConfigError, match="model_type='mistral' is not one of 'llama', 'qwen2', 'deepseek_v3'"):
        model_config_from_dict({"model_type": "mistral"})


def test_check_config_turns_muon_jax_value_errors_into_one_line_config_errors():
    """A value that got past load_config (here set directly, bypassing it) still fails at the CLI's check, before
    any data work, with muon_jax's own message."""
    from train.cli import check_config
    cfg = load_config(CONFIGS / "tiny.yaml")
    check_config(cfg)
    bad = dataclasses.replace(cfg, optimizer=dataclasses.replace(cfg.optimizer, ns_mode="bogus"))
    with pytest.raises(ConfigError, match=r"^optimizer: Unknown ns_mode 'bogus'"):
        check_config(bad)
    with pytest.raises(ConfigError, match=r"^model: unknown LlamaConfig key 'hiden_size': did you mean 'hidden_size'"):
        check_config(dataclasses.replace(cfg, model={**cfg.model, "hiden_size": 8}))


@pytest.mark.parametrize("module, override", [("train", "optimizer.ns_mode=plced"), ("train.sft", "model.remat=ful"),
                                              ("train.prepare_data", "data.format=txt")])
def test_cli_typo_exits_2_with_one_line_before_any_data_work(tmp_path, module, override):
    extra = ["--out", str(tmp_path / "out")] if module == "train.prepare_data" else []
    done = subprocess.run([sys.executable, "-m", module, f"run_dir={tmp_path / 'run'}", override, *extra],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={"MUON_JAX_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin",
                               "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 2, done.stderr
    key, value = override.split("=")
    assert done.stderr.splitlines() == [done.stderr.strip()] and done.stderr.startswith(f"error: {key}={value!r} ")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()  # nothing tokenized or written
