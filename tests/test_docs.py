"""The API reference (docs/api): every public muon_jax name documents its arguments, its result and a runnable
example; the examples pass as doctests; the Sphinx build has no warning."""
import doctest
import inspect
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import muon_jax

ROOT = Path(__file__).resolve().parent.parent
DOCTEST_FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def public_objects():
    """(name, object) for every function and class in muon_jax.__all__ (constants have no docstring of their own)."""
    return [(n, getattr(muon_jax, n)) for n in muon_jax.__all__
            if inspect.isfunction(getattr(muon_jax, n)) or inspect.isclass(getattr(muon_jax, n))]


def required_sections(obj) -> tuple[str, ...]:
    """Google-style sections a public name's docstring must have: a function its Args and Returns, a class the
    fields it holds; both an Example."""
    if inspect.isclass(obj):
        return ("Attributes:", "Example")
    return ("Args:", "Returns:", "Example")


def test_all_lists_only_names_that_exist_and_are_public():
    assert muon_jax.__all__, "muon_jax.__all__ is empty"
    for name in muon_jax.__all__:
        assert not name.startswith("_") and hasattr(muon_jax, name), name


def test_every_public_name_documents_args_returns_and_an_example():
    missing = [f"{name}: no {section!r} section" for name, obj in public_objects()
               for section in required_sections(obj) if section not in (inspect.getdoc(obj) or "")]
    assert not missing, "\n".join(missing)


def test_examples_run_as_doctests():
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(optionflags=DOCTEST_FLAGS)
    globs = {"muon_jax": muon_jax, "jax": jax, "jnp": jnp, "np": np, "optax": optax}
    without_examples = []
    for name, obj in public_objects():
        tests = [t for t in finder.find(obj, name, globs=dict(globs)) if t.examples and t.name == name]
        if not tests:
            without_examples.append(name)
        for test in tests:
            runner.run(test)
    result = runner.summarize(verbose=False)
    assert not without_examples, f"no doctest example in: {without_examples}"
    assert result.failed == 0 and result.attempted > 0, result


def test_api_reference_builds_with_warnings_as_errors(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
                           str(ROOT / "docs" / "api"), str(tmp_path / "html")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    page = (tmp_path / "html" / "index.html").read_text()
    for name, _ in public_objects():
        assert f'id="muon_jax.{name}"' in page, f"{name} is missing from the built reference"
