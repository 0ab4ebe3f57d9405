"""The input pipeline: packing, segment ids, masks, shuffling, resume, process slicing, tokenizers, sources."""
import gzip
import json
import lzma

import numpy as np
import pytest

from train.data import (ByteTokenizer, Corpus, DataConfig, DataError, TiktokenTokenizer, iterator_state,
                        load_corpus, load_tokenizer, make_train_iterator, make_val_batches, pack_window,
                        restore_iterator, split_documents, unigram_entropy)

EOS = 9


def test_pack_window_segments_positions_and_mask():
    window = np.array([1, 2, EOS, 3, 4, 5, EOS, 6, 7])  # seq_len 8
    ex = pack_window(window, EOS)
    np.testing.assert_array_equal(ex["inputs"], window[:-1])
    np.testing.assert_array_equal(ex["targets"], window[1:])
    # eos ends its document; the next token starts a new segment whose positions restart at 0
    np.testing.assert_array_equal(ex["segment_ids"], [1, 1, 1, 2, 2, 2, 2, 3])
    np.testing.assert_array_equal(ex["positions"], [0, 1, 2, 0, 1, 2, 3, 0])
    # predicting eos is learned; predicting the next document's first token from eos is not
    np.testing.assert_array_equal(ex["loss_mask"], [1, 1, 0, 1, 1, 1, 0, 1])


def toy_corpus(n_tokens=1000):
    stream = np.arange(n_tokens, dtype=np.int32) % 50
    return Corpus(ByteTokenizer(), stream, stream[:300])


def take(it, n):
    return [next(it) for _ in range(n)]


def test_iterator_shapes_determinism_and_epochs():
    corpus = toy_corpus()
    a = take(make_train_iterator(corpus, seq_len=16, global_batch=4, seed=1), 40)
    b = take(make_train_iterator(corpus, seq_len=16, global_batch=4, seed=1), 40)
    c = take(make_train_iterator(corpus, seq_len=16, global_batch=4, seed=2), 40)
    assert a[0]["inputs"].shape == (4, 16) and a[0]["loss_mask"].dtype == np.float32
    assert all(np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, b))
    assert not all(np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, c))
    # 62 windows → 15 batches per epoch; every window once per epoch, epochs in different orders
    starts = [int(row[0]) for batch in a for row in batch["inputs"]]
    first, second = starts[:62], starts[62:124]
    assert sorted(first) == sorted(second) and first != second
    for batch in a:  # targets are the inputs shifted by one within the stream
        np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])


def test_resume_from_state_continues_exactly():
    corpus = toy_corpus()
    it = make_train_iterator(corpus, seq_len=16, global_batch=4, seed=0)
    take(it, 7)
    state = json.loads(json.dumps(iterator_state(it)))
    expected = take(it, 5)
    fresh = make_train_iterator(corpus, seq_len=16, global_batch=4, seed=0)
    restore_iterator(fresh, state)
    for x, y in zip(take(fresh, 5), expected):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_processes_split_the_global_batch():
    corpus = toy_corpus()
    whole = take(make_train_iterator(corpus, seq_len=16, global_batch=4, seed=0), 3)
    parts = [take(make_train_iterator(corpus, seq_len=16, global_batch=4, seed=0, process_index=p,
                                      process_count=2), 3) for p in range(2)]
    for i in range(3):
        np.testing.assert_array_equal(np.concatenate([parts[0][i]["inputs"], parts[1][i]["inputs"]]),
                                      whole[i]["inputs"])


def test_val_batches_and_entropy():
    batches = make_val_batches(toy_corpus(), seq_len=16, batch_size=2, max_batches=100)
    assert len(batches) == 299 // 16 // 2
    starts = [int(r[0]) for b in batches for r in b["inputs"]]
    assert starts == [(16 * i) % 50 for i in range(len(starts))]  # consecutive, non-overlapping windows
    with pytest.raises(DataError, match="validation split"):
        make_val_batches(toy_corpus(), seq_len=256, batch_size=4)
    assert unigram_entropy(np.array([0, 1, 2, 3] * 10), 8) == pytest.approx(np.log(4))


def test_byte_and_gpt2_tokenizers():
    byte = ByteTokenizer()
    assert byte.decode(byte.encode("héllo, wörld")) == "héllo, wörld"
    gpt2 = TiktokenTokenizer()
    assert gpt2.encode("Hello world") == [15496, 995]  # GPT-2's published ids
    assert gpt2.decode(gpt2.encode(" Muon is scalable")) == " Muon is scalable"


def test_bpe_is_trained_once_and_cached(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    cfg = DataConfig(source=str(src), tokenizer="bpe", vocab_size=300)
    tok = load_tokenizer(cfg, tmp_path / "cache")
    cached = list((tmp_path / "cache").glob("bpe-*.json"))
    assert len(cached) == 1 and tok.vocab_size <= 300
    assert tok.decode(tok.encode("the lazy fox")) == "the lazy fox"
    assert len(tok.encode("the quick brown fox")) < len("the quick brown fox") / 2
    mtime = cached[0].stat().st_mtime_ns
    load_tokenizer(cfg, tmp_path / "cache")
    assert cached[0].stat().st_mtime_ns == mtime


@pytest.mark.parametrize("suffix, opener", [(".jsonl", open), (".jsonl.xz", lzma.open), (".jsonl.gz", gzip.open)])
def test_jsonl_sources_hold_out_whole_documents(tmp_path, suffix, opener):
    docs = [f"document number {i} " + "word " * (i % 7 + 3) for i in range(40)]
    with opener(tmp_path / f"d{suffix}", "wt") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    corpus = load_corpus(DataConfig(source=str(tmp_path / f"d{suffix}"), tokenizer="byte", val_fraction=0.1),
                         tmp_path / "cache")
    text_train = bytes(t for t in corpus.train if t < 256).decode()
    text_val = bytes(t for t in corpus.val if t < 256).decode()
    held = [d for d in docs if d in text_val]
    assert len(held) == 4 and all(d not in text_train for d in held)
    assert sum(d in text_train for d in docs) == 36


def test_bundled_medium_split_is_disjoint():
    from train.data import BUNDLED, read_documents
    docs = read_documents(BUNDLED["medium"], DataConfig(source="medium"))
    train, val = split_documents(docs, 0.05)
    assert len(docs) > 1000 and len(val) == round(0.05 * len(docs)) and not set(train) & set(val)


def test_clear_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_corpus(DataConfig(source=str(tmp_path / "missing.txt"), tokenizer="byte"), tmp_path)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="holds no text"):
        load_corpus(DataConfig(source=str(tmp_path / "empty.txt"), tokenizer="byte"), tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(DataError, match="bad.jsonl:2"):
        load_corpus(DataConfig(source=str(tmp_path / "bad.jsonl"), tokenizer="byte"), tmp_path)
    with pytest.raises(ValueError, match="did you mean 'tokenizer'"):
        DataConfig.from_dict({"tokeniser": "byte"})
    with pytest.raises(DataError, match="fewer than one global batch"):
        make_train_iterator(toy_corpus(100), seq_len=16, global_batch=8, seed=0)
