"""The shipped run configs: installed as the package `train.configs` (pyproject.toml maps it onto this directory),
read through importlib.resources by `train.config.bundled_config`, so they work from any directory."""
