"""Writing a script's results into its own marked section of a markdown file under docs/."""
from __future__ import annotations

import pathlib
import platform

import jax


def device_line() -> str:
    """One line naming the machine the figures come from."""
    d = jax.devices()[0]
    return (f"{d.platform} ({getattr(d, 'device_kind', '?')}), {jax.device_count()} device(s), "
            f"jax {jax.__version__}, {platform.machine()}")


def replace_section(doc: str | pathlib.Path, script: str, markdown: str) -> None:
    """Replaces the text between ``<!-- {script}:begin -->`` and ``<!-- {script}:end -->`` in ``doc``
    (appending a new section if the markers are missing), leaving the rest of the file alone."""
    path = pathlib.Path(doc)
    begin, end = f"<!-- {script}:begin -->", f"<!-- {script}:end -->"
    text = path.read_text() if path.exists() else ""
    block = f"{begin}\n{markdown.strip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + f"\n\n## `{script}`\n\n{block}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
