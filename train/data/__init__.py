"""Training data: where documents come from (`sources`), tokenizers (`tokenizers`), pretraining streams packed into
windows (`corpus`) and chat conversations for fine-tuning (`chat`). The names most callers need are re-exported."""
from train.data.corpus import (Corpus, batch_iterator, iterator_state, load_corpus, make_train_iterator,
                               make_val_batches, pack, restore_iterator, unigram_entropy)
from train.data.sources import BUNDLED, CORPORA, DataError, read_documents, source_files, split_documents
from train.data.tokenizers import (ByteTokenizer, HFTokenizer, TiktokenDirTokenizer, TiktokenTokenizer, Tokenizer,
                                   checkpoint_tokenizer, load_tokenizer)

__all__ = ["BUNDLED", "CORPORA", "ByteTokenizer", "Corpus", "DataError", "HFTokenizer", "TiktokenDirTokenizer", "TiktokenTokenizer",
           "Tokenizer", "batch_iterator", "checkpoint_tokenizer", "iterator_state", "load_corpus", "load_tokenizer", "make_train_iterator",
           "make_val_batches", "pack", "read_documents", "restore_iterator", "source_files", "split_documents",
           "unigram_entropy"]
