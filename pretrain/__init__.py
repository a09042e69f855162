"""The pretraining stage: corpus to masked batches (`pretrain.data`, `pretrain.masking`) and the training loop.

This file imports nothing heavy, so the command line can switch the hub libraries to offline mode first.
"""
