"""The training runtime shared by pretraining and fine-tuning: Accelerate set-up, optimizers, LR schedules,
atomic checkpoints with exact resume, metric logging and trackers.

This file imports nothing heavy, so the command line can switch the hub libraries to offline mode first.
"""
