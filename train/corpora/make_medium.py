"""How `medium.jsonl.xz` was built (not run at train time): `python train/corpora/make_medium.py ../shared/data`.

The validation split of `train.data` holds out whole documents, so the four concatenated texts are cut into
documents first. Where the concatenation kept the original boundaries they are respected: a Shakespeare work
starts at its title (the line before "by William Shakespeare"), a State of the Union address at its upper-case
"... ADDRESS ..."/"... MESSAGE ..." title line (found for 56 of the 66). The inaugural addresses and the movie
reviews were joined with no marker, so they are cut only by size. Each unit is then cut at paragraph boundaries
(blank lines; single lines for movie_reviews.txt, which has none) into documents of about `TARGET_CHARS`, so
that 5 % of documents is a fair sample of every source rather than two whole plays.

Output: one JSON object per line, {"text": ..., "source": <file stem>}, xz-compressed.
"""
import json
import lzma
import re
import sys
from pathlib import Path

SOURCES = ("shakespeare_complete", "state_union", "inaugural", "movie_reviews")
TARGET_CHARS = 8000
# Files that did not end in a newline were glued onto the next file's title ("[Exeunt.]AS YOU LIKE IT",
# "From sea to shining sea.PRESIDENT JOHN F. KENNEDY'S ..."), so a unit starts where an upper-case title runs to
# the end of its line: before "by William Shakespeare" (minus a glued "THE END"), or an address title.
BY_LINE = re.compile(r"^by William Shakespeare\s*$", re.M)
TITLE_TAIL = re.compile(r"(?:THE END)?([A-Z][A-Z ,;'\-]*)$")
ADDRESS_TITLE = re.compile(r"[A-Z][A-Z0-9 .,'\-]*\b(?:ADDRESS|MESSAGE)\b[A-Z0-9 .,'\-]*$", re.M)


def unit_starts(name: str, text: str) -> list[int]:
    """Offsets in `text` where an original document (a work, an address) begins."""
    if name == "shakespeare_complete":
        starts = []
        for m in BY_LINE.finditer(text):
            head = text[:m.start()].rstrip()  # ends with the title line
            line = head.rfind("\n") + 1
            starts.append(line + TITLE_TAIL.search(head[line:]).start(1))
        return starts
    if name == "state_union":
        # a title names the president and the occasion; shorter upper-case lines are section headings
        return [m.start() for m in ADDRESS_TITLE.finditer(text) if len(m.group().strip()) >= 30]
    return []


def units(name: str, text: str) -> list[str]:
    """The original documents where the concatenation still shows where they start, else the whole text."""
    starts = sorted({0, *unit_starts(name, text)})
    return [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)])]


def chunks(unit: str) -> list[str]:
    """`unit` cut at paragraph boundaries into pieces of about TARGET_CHARS (a short tail joins the last piece)."""
    blocks = [b for b in re.split(r"\n\s*\n", unit) if b.strip()]
    joiner = "\n\n"
    if len(blocks) == 1:  # no blank lines (movie_reviews.txt): one sentence per line
        blocks, joiner = unit.splitlines(), "\n"
    out, doc, size = [], [], 0
    for block in blocks:
        doc.append(block)
        size += len(block)
        if size >= TARGET_CHARS:
            out.append(joiner.join(doc))
            doc, size = [], 0
    if doc:
        if out and size < TARGET_CHARS // 4:
            out[-1] += joiner + joiner.join(doc)
        else:
            out.append(joiner.join(doc))
    return out


def main(data_dir: str) -> None:
    out = Path(__file__).with_name("medium.jsonl.xz")
    counts = {}
    with lzma.open(out, "wt", encoding="utf-8", preset=9 | lzma.PRESET_EXTREME) as f:
        for name in SOURCES:
            text = (Path(data_dir) / f"{name}.txt").read_text(encoding="utf-8")
            parts = units(name, text)
            docs = [d for u in parts for d in chunks(u)]
            counts[name] = (len(parts), len(docs))
            for doc in docs:
                f.write(json.dumps({"text": doc, "source": name}) + "\n")
    print(f"wrote {out} ({out.stat().st_size:,} bytes); (units, documents) per source: {counts}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/data")
