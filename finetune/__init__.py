"""The fine-tuning stage: text classification with long texts in windows (`finetune.classification`), BIO
token classification (`finetune.ner`), the loop on the shared runtime (`finetune.train`) and `finetune.predict`.

This file imports nothing heavy, so the command line can switch the hub libraries to offline mode first.
"""
