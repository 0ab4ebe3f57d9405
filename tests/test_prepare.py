"""Prepared corpora (python -m train.prepare_data): sharded ArrayRecord files, streamed by the trainer."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from train import prepare_data
from train.config import DataConfig, load_config
from train.data import (ByteTokenizer, DataError, iterator_state, load_corpus, make_train_iterator,
                        restore_iterator)
from train.data import prepare as prepare_mod
from train.data.sources import file_sha256
from train.loop import train

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["model.hidden_size=64", "model.intermediate_size=128", "model.num_hidden_layers=2",
         "model.num_attention_heads=4", "model.num_key_value_heads=2", "seq_len=64", "global_batch=16",
         "data.tokenizer=byte", "log.eval_batches=2", "log.tensorboard=false", "log.sample_tokens=0",
         "optimizer.ns_dtype=float32", "schedule.warmup_steps=5", "mesh.data=1"]
EOS = ByteTokenizer.eos_id


def write_jsonl(path, n=600):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"text": f"document {i}: " + " ".join(f"w{(i * j) % 97}" for j in range(40))}) + "\n")
    return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A ~200 KB JSONL corpus prepared with the byte tokenizer in 52 KB units (several shards)."""
    tmp = tmp_path_factory.mktemp("prep")
    src = write_jsonl(tmp / "docs.jsonl")
    out = tmp / "prepared"
    argv = ["--out", str(out), "--processes", "1", "--unit-mb", "0.05", f"data.source={src}", "data.tokenizer=byte"]
    assert prepare_data.main(argv) == 0
    return out


def test_manifest_records_tokens_shards_and_hashes(prepared):
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert manifest["tokenizer"]["name"] == "byte" and manifest["dtype"] == "uint16"
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert len(train["shards"]) > 1 and train["documents"] + val["documents"] == 600
    for s in train["shards"] + val["shards"]:
        assert file_sha256(prepared / s["file"]) == s["sha256"]
    corpus = load_corpus(DataConfig(source=str(prepared), tokenizer="byte"), prepared / "cache")
    tokens = np.asarray(corpus.train)
    assert len(tokens) == train["tokens"] and (tokens == EOS).sum() == train["documents"]
    assert ByteTokenizer().decode(tokens[:12]) == "document 0: "


def run(tmp_path, name, source, *overrides, stop_after=None):
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [*SMALL, f"run_dir={tmp_path / name}", f"data.source={source}",
                                                       *overrides])
    train(cfg, stop_after=stop_after)
    return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


def test_prepare_train_resume_is_bit_identical(prepared, tmp_path):
    common = ["steps=8", "log.every=1", "checkpoint.every=4", "log.eval_every=1000", "checkpoint.async_save=false"]
    straight = run(tmp_path, "straight", prepared, *common)
    run(tmp_path, "resumed", prepared, *common, "data.workers=2", stop_after=4)
    resumed = run(tmp_path, "resumed", prepared, *common, "data.workers=2")
    after = {r["step"]: r["loss"] for r in resumed if r["step"] > 4}
    assert len(after) == 4 and after == {r["step"]: r["loss"] for r in straight if r["step"] > 4}


def test_two_processes_read_disjoint_rows_whose_union_is_the_global_batch(prepared, monkeypatch):
    def iterator(process_index=0, process_count=1):
        corpus = load_corpus(DataConfig(source=str(prepared), tokenizer="byte"), prepared / "cache")
        read = corpus.train.read
        monkeypatch.setattr(corpus.train, "read", lambda starts, n: (reads[process_index].append(list(starts)),
                                                                     read(starts, n))[1])
        return make_train_iterator(corpus, seq_len=64, global_batch=8, seed=5, process_index=process_index,
                                   process_count=process_count)
    reads = {0: []}
    whole = iterator()
    expected = [next(whole) for _ in range(6)]
    one_process_reads, reads = reads[0], {0: [], 1: []}
    parts = [iterator(p, 2) for p in range(2)]
    for i in range(3):
        rows = [next(it) for it in parts]
        for k in expected[i]:
            np.testing.assert_array_equal(np.concatenate([r[k] for r in rows]), expected[i][k])
        assert not set(reads[0][i]) & set(reads[1][i])  # each process read only its own rows
        assert reads[0][i] + reads[1][i] == one_process_reads[i]
    # a process-count change keeps the global order: 2 processes' state continues on 1 process
    single = iterator()
    restore_iterator(single, iterator_state(parts[0]))
    for i in range(3, 6):
        np.testing.assert_array_equal(next(single)["inputs"], expected[i]["inputs"])


def test_a_corpus_prepared_with_another_tokenizer_is_refused(prepared):
    with pytest.raises(DataError, match=r"prepared with tokenizer byte \(vocab 257.*data.tokenizer='gpt2'"):
        load_corpus(DataConfig(source=str(prepared), tokenizer="gpt2"), prepared / "cache")
    with pytest.raises(DataError, match="prepared with tokenizer byte.*not a trained bpe4096"):
        load_corpus(DataConfig(source=str(prepared), tokenizer="bpe"), prepared / "cache")


def test_a_corrupt_shard_is_reported_by_name(prepared, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(prepared, bad)
    shard = bad / "train-00001.arrayrecord"
    data = bytearray(shard.read_bytes())
    data[6000:6064] = b"\xff" * 64  # same size, damaged records (the file ends in zero padding)
    shard.write_bytes(bytes(data))
    corpus = load_corpus(DataConfig(source=str(bad), tokenizer="byte"), tmp_path / "cache")
    with pytest.raises(DataError, match=r"train-00001.arrayrecord: corrupt shard \(record \d+: "):
        np.asarray(corpus.train)
    shard.write_bytes(bytes(data[:1000]))
    with pytest.raises(DataError, match="train-00001.arrayrecord: shard has 1000 bytes, the manifest says"):
        load_corpus(DataConfig(source=str(bad), tokenizer="byte"), tmp_path / "cache")


def test_killed_preparation_resumes_without_redoing_finished_shards(prepared, tmp_path, monkeypatch):
    part = tmp_path / "part"
    shutil.copytree(prepared, part)
    (part / "manifest.json").unlink()  # killed after 2 units, while the third was being written
    for p in sorted((part / "parts").glob("unit-*.json"))[2:]:
        p.unlink()
    redone, run_unit = [], prepare_mod._prepare_unit
    monkeypatch.setattr(prepare_mod, "_prepare_unit", lambda job: (redone.append(job[0]), run_unit(job))[1])
    manifest = json.loads((prepared / "manifest.json").read_text())
    src = manifest["source"]
    again = prepare_mod.prepare(DataConfig(source=src, tokenizer="byte"), part, ByteTokenizer(), processes=1,
                                unit_bytes=int(0.05 * 2 ** 20), progress=False)
    assert redone == list(range(2, len(manifest["splits"]["train"]["shards"])))
    assert again["units_run"] == len(redone)
    assert {k: v for k, v in again.items() if k not in ("seconds", "units_run")} == {
        k: v for k, v in manifest.items() if k not in ("seconds", "units_run")}


def test_bad_lines_are_named_or_counted_and_nothing_is_half_written(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl")
    lines = src.read_text().splitlines()
    lines[500] = '{"text": 5}'
    src.write_text("\n".join(lines) + "\n")
    cfg = DataConfig(source=str(src), tokenizer="byte")
    with pytest.raises(DataError, match=r"d.jsonl:501: not a JSON object with a string 'text' field"):
        prepare_mod.prepare(cfg, tmp_path / "out", ByteTokenizer(), processes=1, unit_bytes=50_000,
                            progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert not list((tmp_path / "out").glob("*.tmp*"))  # the failed unit left no shard behind either
    skip = DataConfig(source=str(src), tokenizer="byte", skip_bad_lines=True)
    manifest = prepare_mod.prepare(skip, tmp_path / "skip", ByteTokenizer(), processes=1, unit_bytes=50_000,
                                   progress=False)
    assert manifest["skipped_lines"] == 1
    assert sum(manifest["splits"][s]["documents"] for s in ("train", "val")) == 599
