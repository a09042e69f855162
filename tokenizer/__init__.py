"""The tokenizer stage: a BERT WordPiece tokenizer trained on your corpus, saved in Hugging Face format.

`tokenizer.train` holds the library (build_wordpiece, train_wordpiece, save_tokenizer, load_tokenizer,
train_tokenizer); `berth tokenizer train CONFIG` and `python -m tokenizer train CONFIG` run it. This file
imports nothing heavy, so the command line can switch the hub libraries to offline mode before they load.
"""
