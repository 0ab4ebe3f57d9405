"""How `medium.jsonl.xz` was built (not run at train time): `python train/corpora/make_medium.py ../shared/data`.

The four texts are cut into documents of about 8,000 characters at paragraph boundaries (blank lines; single lines
for movie_reviews.txt, which has none), so a validation split can hold out whole documents. One JSON object
per line: {"text": ..., "source": <file stem>}.
"""
import json
import lzma
import re
import sys
from pathlib import Path

SOURCES = ("shakespeare_complete", "state_union", "inaugural", "movie_reviews")
TARGET_CHARS = 8000


def documents(text: str):
    blocks = [b for b in re.split(r"\n\s*\n", text) if b.strip()]
    if len(blocks) == 1:
        blocks = text.splitlines()
        joiner = "\n"
    else:
        joiner = "\n\n"
    doc = []
    size = 0
    for block in blocks:
        doc.append(block)
        size += len(block)
        if size >= TARGET_CHARS:
            yield joiner.join(doc)
            doc, size = [], 0
    if doc:
        yield joiner.join(doc)


def main(data_dir: str) -> None:
    out = Path(__file__).with_name("medium.jsonl.xz")
    with lzma.open(out, "wt", encoding="utf-8", preset=9) as f:
        for name in SOURCES:
            text = (Path(data_dir) / f"{name}.txt").read_text(encoding="utf-8")
            for doc in documents(text):
                f.write(json.dumps({"text": doc, "source": name}) + "\n")
    print(f"wrote {out} ({out.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/data")
