"""Training data: where documents come from (`sources`), tokenizers (`tokenizers`), prepared token shards (`prepare`, `shards`),
pretraining streams packed into windows (`corpus`) and chat conversations for fine-tuning (`chat`). The names most callers need are re-exported."""
from train.data.corpus import (Corpus, batch_iterator, iterator_state, load_corpus, make_train_iterator,
                               make_val_batches, pack, restore_iterator, unigram_entropy)
from train.data.shards import TokenStream, is_prepared, read_manifest
from train.data.sources import BUNDLED, CORPORA, DataError, read_documents, source_files, split_documents
from train.data.tokenizers import ByteTokenizer, HFTokenizer, TiktokenTokenizer, Tokenizer, load_tokenizer

__all__ = ["BUNDLED", "CORPORA", "ByteTokenizer", "Corpus", "DataError", "HFTokenizer", "TiktokenTokenizer",
           "TokenStream", "Tokenizer", "batch_iterator", "is_prepared", "iterator_state", "load_corpus", "load_tokenizer", "make_train_iterator",
           "make_val_batches", "pack", "read_documents", "read_manifest", "restore_iterator", "source_files", "split_documents",
           "unigram_entropy"]
