"""The project as shipped: the README's Quickstart test line is exactly what CI runs, and the package installs
(not editable) and trains from any directory."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    block = re.search(r"## Quickstart\s+```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    lines = [line for line in block.splitlines() if line.strip()]
    assert len(lines) == 2
    assert lines[1] in (ROOT / ".ci" / "run").read_text().splitlines()


def listed_packages() -> set[str]:
    import tomllib
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])


def test_every_python_package_is_listed_in_pyproject():
    """pyproject lists its packages (configs/ is mapped onto train.configs), so a new subpackage must be added there."""
    found = {".".join(init.parent.relative_to(ROOT).parts) for top in ("muon_jax", "train")
             for init in (ROOT / top).rglob("__init__.py")}
    assert found | {"train.configs"} == listed_packages()


# what the installed trainer runs: two steps of a small model on bytes (SFT keeps its seq_len: whole conversations)
QUICK = ["steps=2", "global_batch=4", "model.hidden_size=32", "model.intermediate_size=64",
         "model.num_hidden_layers=1", "model.num_attention_heads=2", "model.num_key_value_heads=1",
         "data.tokenizer=byte", "log.eval_batches=1", "log.tensorboard=false", "log.sample_tokens=0",
         "optimizer.ns_dtype=float32", "schedule.warmup_steps=1", "mesh.data=1", "checkpoint.async_save=false"]


@pytest.mark.slow
def test_non_editable_install_trains_from_another_directory(tmp_path, cpu_env):
    """`pip install .` (a wheel, not editable) into a fresh directory; then, from a directory outside the checkout,
    load_config() finds the bundled config, `muon-train` trains without --config and `python -m train.sft` with its
    bundled default. The checkout is not importable there: train and muon_jax come from the install."""
    src = tmp_path / "src"  # a copy: the build writes build/ and *.egg-info next to pyproject.toml
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    for name in ("muon_jax", "train", "configs"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--target", str(site), str(src)], check=True, capture_output=True, timeout=300)
    dist_info = next(site.glob("muon_jax-*.dist-info"))
    metadata = (dist_info / "METADATA").read_text()
    assert "License-Expression: Apache-2.0" in metadata and (dist_info / "licenses" / "LICENSE").is_file()
    core = {r.split()[1].split(">")[0].split("=")[0] for r in metadata.splitlines()
            if r.startswith("Requires-Dist:") and "extra ==" not in r}
    assert "chex" not in core and {"flax", "orbax-checkpoint", "grain", "pyyaml"} <= core  # plain install trains
    assert (site / "muon_jax" / "py.typed").is_file() and (site / "train" / "configs" / "tiny.yaml").is_file()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**cpu_env(1), "PYTHONPATH": str(site), "MUON_JAX_CACHE": str(tmp_path / "cache")}

    def run(*cmd):
        done = subprocess.run(cmd, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    where = run(sys.executable, "-c", "import muon_jax, train; from train.config import load_config; "
                "print(muon_jax.__file__, train.__file__, load_config().run_dir)").split()
    assert all(Path(p).is_relative_to(site) for p in where[:2]) and where[2] == "runs/tiny"
    run(str(site / "bin" / "muon-train"), *QUICK, "seq_len=32", "run_dir=pre")
    assert (elsewhere / "pre" / "metrics.jsonl").is_file()
    run(sys.executable, "-m", "train.sft", *QUICK, "run_dir=sft", "sft.export_hf=sft/hf")
    assert (elsewhere / "sft" / "hf" / "config.json").is_file()
