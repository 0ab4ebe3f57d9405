"""Training data: where documents come from (`sources`), tokenizers (`tokenizers`), corpora tokenized once into
ArrayRecord shards (`prepare`, `shards`), pretraining streams packed into windows (`corpus`) and chat
conversations for fine-tuning (`chat`). The names most callers need are re-exported.

They are imported from their module on first use: a tokenizing worker process of `train.data.prepare` then
loads only sources, tokenizers and shards, not grain and JAX (seconds and ~0.3 GB per worker)."""
import importlib

_MODULES = {
    "corpus": ["Corpus", "batch_iterator", "iterator_state", "load_corpus", "make_train_iterator",
               "make_val_batches", "pack", "restore_iterator", "unigram_entropy"],
    "shards": ["TokenStream", "is_prepared", "read_manifest"],
    "sources": ["BUNDLED", "CORPORA", "DataError", "source_files"],
    "tokenizers": ["ByteTokenizer", "HFTokenizer", "TiktokenDirTokenizer", "TiktokenTokenizer", "Tokenizer",
                   "checkpoint_tokenizer", "load_tokenizer"],
}
_HOME = {name: module for module, names in _MODULES.items() for name in names}
__all__ = sorted(_HOME)


def __getattr__(name: str):
    """A re-exported name, imported from its module now."""
    if name not in _HOME:
        raise AttributeError(f"module 'train.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"train.data.{_HOME[name]}"), name)
