"""The input pipeline: packing, segment ids, masks, shuffling, resume, process slicing, tokenizers, sources."""
import gzip
import json
import lzma

import numpy as np
import pytest

from train.config import ConfigError, DataConfig, config_from_dict, load_config
from train.data import prepare as prepare_mod, tokenizers
from train.data import (BUNDLED, ByteTokenizer, Corpus, DataError, TiktokenTokenizer, TokenStream, iterator_state,
                        load_corpus, load_tokenizer, make_train_iterator, make_val_batches, pack, restore_iterator,
                        source_files, unigram_entropy)
from train.data.sources import Unit, iter_pieces

EOS = ByteTokenizer.eos_id
KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert set(x) == set(KEYS)
        for k in KEYS:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_pack_segments_positions_and_mask():
    windows = np.array([[1, 2, EOS, 3, 4, 5, EOS, 6, 7],       # two document ends inside the window
                        [EOS, 8, 9, 10, 11, 12, 13, 14, 15]])  # starts on the previous document's eos
    ex = pack(windows, EOS)
    np.testing.assert_array_equal(ex["inputs"], windows[:, :-1])
    np.testing.assert_array_equal(ex["targets"], windows[:, 1:])
    np.testing.assert_array_equal(ex["segment_ids"], [[1, 1, 1, 2, 2, 2, 2, 3], [1, 2, 2, 2, 2, 2, 2, 2]])
    np.testing.assert_array_equal(ex["positions"], [[0, 1, 2, 0, 1, 2, 3, 0], [0, 0, 1, 2, 3, 4, 5, 6]])
    # predicting eos is trained; predicting the next document's first token from eos is not
    np.testing.assert_array_equal(ex["loss_mask"], [[1, 1, 0, 1, 1, 1, 0, 1], [0, 1, 1, 1, 1, 1, 1, 1]])
    assert {k: v.dtype for k, v in ex.items()} == {"inputs": np.int32, "targets": np.int32, "segment_ids": np.int32,
                                                   "positions": np.int32, "loss_mask": np.float32}


SEQ, N_WINDOWS = 8, 30


def toy_corpus():
    """Tokens 0..240 with no eos: window i is exactly [8i, 8i + 8], so its first input names it."""
    stream = np.arange(SEQ * N_WINDOWS + 1, dtype=np.int32)
    return Corpus(ByteTokenizer(), stream, stream[:100])


def window_ids(batches):
    return [int(row[0]) // SEQ for b in batches for row in b["inputs"]]


def test_windows_cover_each_epoch_in_a_new_order():
    batches = take(make_train_iterator(toy_corpus(), seq_len=SEQ, global_batch=4, seed=1), 30)  # 4 epochs
    for b in batches:
        assert b["inputs"].shape == (4, SEQ)
        np.testing.assert_array_equal(b["targets"], b["inputs"] + 1)  # targets are inputs shifted by one
        np.testing.assert_array_equal(b["inputs"], b["inputs"][:, :1] + np.arange(SEQ))  # contiguous windows
        assert (b["segment_ids"] == 1).all() and (b["loss_mask"] == 1).all()
    ids = window_ids(batches)
    epochs = [ids[e * N_WINDOWS:(e + 1) * N_WINDOWS] for e in range(4)]
    assert all(sorted(e) == list(range(N_WINDOWS)) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 4 and epochs[0] != list(range(N_WINDOWS))
    ordered = take(make_train_iterator(toy_corpus(), seq_len=SEQ, global_batch=4, seed=1, shuffle=False), 8)
    assert window_ids(ordered) == list(range(N_WINDOWS)) + [0, 1]


def test_same_seed_same_stream_other_seed_other_stream():
    def stream(seed):
        return window_ids(take(make_train_iterator(toy_corpus(), seq_len=SEQ, global_batch=4, seed=seed), 15))
    assert stream(0) == stream(0)
    assert stream(0) != stream(1)
    # grain seeds epoch e with seed + e; seed 1's first epoch must not be seed 0's second
    assert stream(1)[:N_WINDOWS] != stream(0)[N_WINDOWS:2 * N_WINDOWS]


@pytest.mark.parametrize("worker_count", [0, 2])
def test_resume_from_saved_state_continues_exactly(worker_count):
    def make(workers=0):
        return make_train_iterator(toy_corpus(), seq_len=SEQ, global_batch=4, seed=0, worker_count=workers)
    it = make(worker_count)
    take(it, 9)  # past the first epoch boundary (7.5 batches)
    state = json.loads(json.dumps(iterator_state(it)))  # as stored in a checkpoint
    expected = take(it, 11)
    fresh = make()  # the state is a batch counter: it does not depend on the thread count
    restore_iterator(fresh, state)
    assert_batches_equal(take(fresh, 11), expected)
    assert_batches_equal(take(make(worker_count), 20)[9:], expected)


def test_processes_together_see_the_one_process_batch():
    whole = take(make_train_iterator(toy_corpus(), seq_len=SEQ, global_batch=4, seed=3), 10)
    parts = [take(make_train_iterator(toy_corpus(), seq_len=SEQ, global_batch=4, seed=3, process_index=p,
                                      process_count=2), 10) for p in range(2)]
    for i in range(10):
        assert parts[0][i]["inputs"].shape == (2, SEQ)
        for k in KEYS:
            np.testing.assert_array_equal(np.concatenate([parts[0][i][k], parts[1][i][k]]), whole[i][k])
    with pytest.raises(DataError, match="split evenly"):
        make_train_iterator(toy_corpus(), seq_len=SEQ, global_batch=4, seed=0, process_count=3)


def test_val_batches_are_consecutive_windows():
    batches = make_val_batches(toy_corpus(), seq_len=SEQ, batch_size=3)
    assert len(batches) == 99 // SEQ // 3  # 12 windows in 100 tokens → 4 batches
    assert window_ids(batches) == list(range(12))
    assert len(make_val_batches(toy_corpus(), seq_len=SEQ, batch_size=3, max_batches=2)) == 2
    with pytest.raises(DataError, match=r"one batch of 4 x 32 needs 129"):
        make_val_batches(toy_corpus(), seq_len=32, batch_size=4)


def test_unigram_entropy():
    assert unigram_entropy(np.array([0, 1, 2, 3] * 10), 8) == pytest.approx(np.log(4))
    assert unigram_entropy(np.array([5] * 7), 8) == 0.0


def test_byte_and_gpt2_tokenizers():
    byte = ByteTokenizer()
    assert byte.encode("hé") == [104, 195, 169]
    assert byte.decode(byte.encode("héllo, wörld ✓")) == "héllo, wörld ✓"
    gpt2 = TiktokenTokenizer()
    assert (gpt2.vocab_size, gpt2.eos_id) == (50257, 50256)
    assert gpt2.encode("Hello world") == [15496, 995]  # GPT-2's published ids
    assert gpt2.encode(" Hello world!") == [18435, 995, 0]
    assert gpt2.decode(gpt2.encode(" Muon is scalable")) == " Muon is scalable"


@pytest.fixture(scope="module")
def shakespeare_50k(tmp_path_factory):
    path = tmp_path_factory.mktemp("src") / "s.txt"
    path.write_text(BUNDLED["tinyshakespeare"].read_text()[:50_000])
    return path


def test_bpe_is_trained_once_then_cached(shakespeare_50k, tmp_path, monkeypatch):
    cfg = DataConfig(source=str(shakespeare_50k), tokenizer="bpe", vocab_size=300)
    corpus = load_corpus(cfg, tmp_path)
    tok = corpus.tokenizer
    assert tok.vocab_size == 300 and tok.eos_id < 300 and np.asarray(corpus.train).max() < 300
    assert tok.decode(tok.encode("Wherefore art thou? ünïcode")) == "Wherefore art thou? ünïcode"
    assert len(corpus.train) + len(corpus.val) < 0.8 * 50_000  # even 43 merges save a fifth of the bytes
    assert len(list(tmp_path.glob("bpe-*.json"))) == 1

    def fail(*args, **kwargs):
        raise AssertionError("recomputed instead of loaded from the cache")
    monkeypatch.setattr(tokenizers, "train_bpe", fail)
    monkeypatch.setattr(prepare_mod, "_prepare_unit", fail)
    again = load_corpus(cfg, tmp_path)
    np.testing.assert_array_equal(np.asarray(again.train), np.asarray(corpus.train))
    np.testing.assert_array_equal(np.asarray(again.val), np.asarray(corpus.val))
    assert load_tokenizer(cfg, tmp_path).encode("thou art") == tok.encode("thou art")
    with pytest.raises(AssertionError, match="recomputed"):  # another vocabulary is another tokenizer
        load_tokenizer(DataConfig(source=str(shakespeare_50k), vocab_size=320), tmp_path)


def test_single_text_holds_out_pieces_at_line_boundaries(tmp_path):
    lines = [f"line {i} of the only document\n" for i in range(3000)]
    with gzip.open(tmp_path / "one.txt.gz", "wt") as f:
        f.write("".join(lines))
    corpus = load_corpus(DataConfig(source=str(tmp_path / "one.txt.gz"), tokenizer="byte", val_fraction=0.2),
                         tmp_path / "cache")
    train, val = (np.asarray(s) for s in (corpus.train, corpus.val))
    assert train[-1] == EOS and val[-1] == EOS
    pieces = {name: ByteTokenizer().decode(t).split("\n")[:-1] for name, t in (("train", train), ("val", val))}
    assert sorted(pieces["train"] + pieces["val"]) == sorted(x[:-1] for x in lines)  # whole lines, each once
    assert 0.05 < len(pieces["val"]) / len(lines) < 0.5  # 11 pieces of ~8 KB, each held out by its hash
    assert (val == EOS).sum() < (val == EOS).size  # eos only where the held-out text breaks off


def test_text_split_does_not_depend_on_units_or_processes(tmp_path):
    """A text file cut into byte-range units (read by 2 worker processes) prepares the same streams as one
    unit: units cut pieces only at line ends and look one piece ahead to place eos."""
    text = "".join(f"{'x' * (i % 50)} line {i}\n" for i in range(6000))
    (tmp_path / "t.txt").write_text(text)
    cfg = DataConfig(source=str(tmp_path / "t.txt"), tokenizer="byte", val_fraction=0.3)
    one = prepare_mod.prepare(cfg, tmp_path / "one", ByteTokenizer(), processes=1, progress=False)
    many = prepare_mod.prepare(cfg, tmp_path / "many", ByteTokenizer(), processes=2, unit_bytes=40_000,
                               chunk=100, progress=False)
    assert len(one["splits"]["train"]["shards"]) == 1 and len(many["splits"]["train"]["shards"]) > 3
    for split in ("train", "val"):
        streams = [np.asarray(TokenStream(tmp_path / d, m, split)) for d, m in (("one", one), ("many", many))]
        np.testing.assert_array_equal(*streams)
    assert len(one["splits"]["val"]["shards"]) and (streams[0] == EOS).sum() == one["splits"]["val"]["documents"]


@pytest.mark.parametrize("suffix, opener", [(".jsonl", open), (".jsonl.xz", lzma.open), (".jsonl.gz", gzip.open)])
def test_jsonl_sources_hold_out_whole_documents(tmp_path, suffix, opener):
    docs = [f"<document {i}> " + "word " * (i % 7 + 3) for i in range(40)]
    with opener(tmp_path / f"d{suffix}", "wt") as f:
        for d in docs:
            f.write(json.dumps({"body": d, "id": 0}) + "\n")
    corpus = load_corpus(DataConfig(source=str(tmp_path / f"d{suffix}"), text_field="body", tokenizer="byte",
                                    val_fraction=0.1), tmp_path / "cache")
    split = {name: ByteTokenizer().decode(np.asarray(getattr(corpus, name))) for name in ("train", "val")}
    held = [d for d in docs if d + ByteTokenizer().decode([EOS]) in split["val"]]
    assert 1 <= len(held) <= 10 and not any(d in split["train"] for d in held)
    assert sum(d in split["train"] for d in docs) == 40 - len(held)
    assert corpus.train.documents == 40 - len(held) and corpus.val.documents == len(held)  # one eos each


def test_npy_token_source_holds_out_whole_documents(tmp_path):
    docs = [np.arange(1, 10 + i) for i in range(40)]
    np.save(tmp_path / "t.npy", np.concatenate([np.append(d, EOS) for d in docs]).astype(np.int64))
    corpus = load_corpus(DataConfig(source=str(tmp_path / "t.npy"), tokenizer="byte", val_fraction=0.2),
                         tmp_path / "cache")
    train, val = np.asarray(corpus.train), np.asarray(corpus.val)
    assert train.dtype == np.int32 and train[-1] == EOS and val[-1] == EOS
    assert len(train) + len(val) == sum(len(d) + 1 for d in docs)
    held = [list(d) for d in np.split(val, np.flatnonzero(val == EOS)[:-1] + 1)]
    assert all(d[:-1] == list(range(1, len(d))) for d in held) and 1 <= len(held) <= 20  # whole documents
    with pytest.raises(DataError, match="pre-tokenized"):
        load_corpus(DataConfig(source=str(tmp_path / "t.npy"), tokenizer="bpe"), tmp_path / "cache")


def test_bundled_medium_holds_out_whole_documents_of_every_source():
    with lzma.open(BUNDLED["medium"], "rt") as f:
        records = [json.loads(line) for line in f]
    assert {r["source"] for r in records} == {"shakespeare_complete", "state_union", "inaugural", "movie_reviews"}
    pieces = list(iter_pieces(Unit(str(BUNDLED["medium"])), DataConfig(source="medium"), {}))
    docs = [p.text for p in pieces]  # what the pipeline reads: one document per line, each ending in eos
    assert docs == [r["text"] for r in records] and len(docs) > 1000 and all(p.eos for p in pieces)
    train, val = [p.text for p in pieces if not p.val], [p.text for p in pieces if p.val]
    n = len(docs)  # held out by hash: a binomial(n, 0.05) count, within 4 standard deviations
    assert abs(len(val) - 0.05 * n) < 4 * (n * 0.05 * 0.95) ** 0.5 and len(train) + len(val) == n
    assert not set(train) & set(val)
    val_sources = {r["source"] for r in records if r["text"] in set(val)}
    assert len(val_sources) == 4, val_sources


def test_bundled_tinyshakespeare_is_the_default():
    cfg = load_config().data  # the README's first command: no config given
    assert source_files(cfg) == [BUNDLED["tinyshakespeare"]] and BUNDLED["tinyshakespeare"].is_file()
    pieces = list(iter_pieces(Unit(str(BUNDLED["tinyshakespeare"])), cfg, {}))
    doc = "".join(p.text for p in pieces)  # one text file: ~8 KB pieces that rejoin into the whole file
    assert doc.startswith("First Citizen:") and len(doc) == 1_115_394
    assert sum(p.nbytes for p in pieces) == BUNDLED["tinyshakespeare"].stat().st_size


def test_clear_errors(tmp_path):
    with pytest.raises(DataError, match="missing.txt.*no such file"):
        load_corpus(DataConfig(source=str(tmp_path / "missing.txt"), tokenizer="byte"), tmp_path)
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(DataError, match="empty.txt.*tokenized to nothing"):
        load_corpus(DataConfig(source=str(tmp_path / "empty.txt"), tokenizer="byte"), tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(DataError, match="bad.jsonl:2"):
        load_corpus(DataConfig(source=str(tmp_path / "bad.jsonl"), tokenizer="byte"), tmp_path)
    with pytest.raises(DataError, match="nope.json.*not 'byte'"):
        load_tokenizer(DataConfig(tokenizer=str(tmp_path / "nope.json")), tmp_path)
    with pytest.raises(ConfigError, match="unknown config key 'data.tokeniser': did you mean 'tokenizer'"):
        config_from_dict({"model": {"model_type": "llama"}, "data": {"tokeniser": "byte"}})
    with pytest.raises(ConfigError, match=r"data.val_fraction=0.*\(0, 1\)"):
        config_from_dict({"model": {"model_type": "llama"}, "data": {"val_fraction": 0}})
    with pytest.raises(DataError, match="fewer than one global batch"):
        make_train_iterator(toy_corpus(), seq_len=SEQ, global_batch=64, seed=0)
