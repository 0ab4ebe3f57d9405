"""Sphinx configuration of the muon_jax API reference: `sphinx-build -W -b html docs/api docs/api/_build`."""
import muon_jax

project = "muon-jax"
release = version = muon_jax.__version__
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon"]
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_member_order = "bysource"
autodoc_typehints = "description"     # signatures stay readable; types go into the Args list
autodoc_default_options = {"members": True, "undoc-members": False}
exclude_patterns = ["_build"]
html_theme = "alabaster"              # ships with sphinx: the build needs no network and no extra theme
