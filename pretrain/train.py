"""Pretraining as a stage of the shared loop: masked LM or replaced-token detection (+ NSP/SOP) on prepared
examples, exported to final/."""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from transformers import PreTrainedTokenizerBase

from berth.core.errors import BerthError
from berth.core.hub import push_folder
from berth.core.vocab import load_tokenizer, tokenizer_fingerprint
from berth.pretrain.config import PretrainConfig
from berth.pretrain.documents import SpecialIds, check_seq_len
from berth.pretrain.export import export_pretrained
from berth.pretrain.masking import EpochExamples, MaskingCollator, pack_batch
from berth.pretrain.model import MaskedLMObjective, build_model
from berth.pretrain.objective import Objective, evaluation_fields, figure_fields
from berth.pretrain.prepare import corpus_fingerprint, digest, prepare
from berth.pretrain.rtd import ReplacedTokenObjective
from berth.runtime.collective import Collective, shared_everywhere
from berth.runtime.engines import Engine, ShardingHints
from berth.runtime.lockstep import lockstep_batches
from berth.runtime.loop import Batch, Loop, TrainState

logger = logging.getLogger(__name__)

# Sections whose change makes a checkpoint meaningless for this run (the train section may change).
RESUME_SECTIONS = ("tokenizer", "corpus", "data", "model")
MODEL_INPUTS = (
    "input_ids",
    "token_type_ids",
    "attention_mask",
    "mlm_positions",
    "mlm_labels",
    "mlm_draws",
    "next_sentence_label",
    "position_ids",
    "sequence_ids",
    "cls_positions",
)
TokenizerSource = Callable[[], PreTrainedTokenizerBase]
# Dense bf16 peak FLOP/s of one device, for MFU.
PEAK_TFLOPS = {
    "H100": 989.0,
    "H200": 989.0,
    "A100": 312.0,
    "L4": 121.0,
    "L40S": 362.0,
    "A10": 125.0,
    "4090": 165.0,
}


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: batch[name] for name in MODEL_INPUTS if name in batch}


def peak_tflops_of(device_name: str) -> float:
    """Dense bf16 peak TFLOP/s of a GPU by its name's parts ("NVIDIA L40S" is not an L4), 0 when unknown."""
    parts = set(re.split(r"[\s\-_]+", device_name.upper()))
    return next((tflops for key, tflops in PEAK_TFLOPS.items() if key in parts), 0.0)


def peak_flops(cfg: PretrainConfig) -> float:
    if cfg.train.peak_tflops:
        return cfg.train.peak_tflops * 1e12
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        return peak_tflops_of(name) * 1e12
    return 0.0


class PretrainingStage:
    """Masked-LM (+ NSP/SOP) on prepared examples, plugged into the shared loop (`berth.runtime.loop.Stage`)."""

    name = "pretraining"
    resume_sections: tuple[str, ...] = RESUME_SECTIONS
    metric = ""  # pretraining keeps its last weights, not a best-so-far
    lower_is_better = True
    patience = 0

    def __init__(self, cfg: PretrainConfig, tokenizer_source: TokenizerSource | None = None):
        self.cfg = cfg
        self.tokenizer_source = tokenizer_source or (lambda: load_tokenizer(cfg.tokenizer.path))

    def build(self, acc: Accelerator, engine: Engine) -> torch.nn.Module:
        cfg, self.engine = self.cfg, engine
        # Without a cache directory every machine sees, each machine's first process prepares its own copy (the
        # data is the same: named by a hash of corpus, tokenizer and settings, and drawn from seeds).
        shared = shared_everywhere(acc, Path(cfg.data.cache_dir))
        self.collective = Collective(acc, shared)
        first = acc.main_process_first if shared else acc.local_main_process_first
        with first():
            self.prepared = prepare(cfg, self.tokenizer_source())
        self.objective = build_objective(cfg, self.prepared.special, acc.device.type)
        self.objective.load_heads(cfg.model.init)
        self.flops_per_token = self.objective.flops_per_token(cfg.data.max_seq_len, cfg.data.mask_prob)
        self.peak_flops = peak_flops(cfg) * acc.num_processes
        self.collator = MaskingCollator(cfg.data, self.prepared.special)
        with first():
            self.validation = EpochExamples(self.prepared.examples("validation", 0), cfg.data.seed, epoch=0)
        if not len(self.validation):
            logger.warning(
                "no held-out examples (data.eval_fraction=%s): evaluation is skipped, and the model card says so",
                cfg.data.eval_fraction,
            )
        return self.objective

    def sharding_hints(self) -> ShardingHints:
        return ShardingHints(external_parameters=self.objective.external_parameters())

    def data_key(self) -> dict[str, str]:
        return {
            "corpus": digest(corpus_fingerprint(self.cfg.corpus)),
            "tokenizer": tokenizer_fingerprint(self.prepared.tokenizer),
        }

    def epoch_examples(self, epoch: int, acc: Accelerator) -> EpochExamples:
        """Every process calls it: an epoch not yet counted is counted by all of them together."""
        return EpochExamples(self.prepared.examples("train", epoch, self.collective), self.cfg.data.seed, epoch)

    def steps_per_epoch(self, global_batch: int, acc: Accelerator) -> int:
        examples = len(self.epoch_examples(0, acc))
        if examples < global_batch:
            raise BerthError(f"an epoch has {examples} examples, fewer than one global batch ({global_batch})")
        return examples // global_batch

    def epoch_steps(self, epoch: int, skip: int, global_batch: int, acc: Accelerator) -> Iterator[list[Batch]]:
        """One optimizer step takes the next global batch of the epoch's stream (shuffled as it is drawn);
        micro-batch k of process r is the r-th slice of the k-th block. The same examples make up a step whatever
        the process count, and resuming jumps to the position without drawing the examples before it."""
        examples = self.epoch_examples(epoch, acc)  # now, in the calling thread: counting an epoch is collective
        size, rank, procs = self.cfg.train.batch_size, acc.process_index, acc.num_processes
        data, train = self.cfg.data, self.cfg.train
        # The optimizer step this epoch starts at (epochs differ in length: each is drawn anew), and the run's
        # count as the loop makes it (berth.runtime.loop.Loop.build), for a masking rate that changes over the run.
        start_step, total = skip, 1
        if data.mask_prob_end:
            before = [len(self.epoch_examples(e, acc)) // global_batch for e in range(epoch)]
            start_step += sum(before)
            total = train.max_steps or train.epochs * (before[0] if before else len(examples) // global_batch)

        def steps() -> Iterator[list[Batch]]:
            for step, start in enumerate(range(skip * global_batch, len(examples) - global_batch + 1, global_batch)):
                rate = data.mask_rate(start_step + step, total)
                parts = [start + (k * procs + rank) * size for k in range(self.cfg.train.grad_accum)]
                yield [self.collate([examples[i] for i in range(first, first + size)], rate) for first in parts]

        return steps()

    def collate(self, examples: list[dict], mask_prob: float | None = None) -> Batch:
        """Masked (at `mask_prob`, or the rate the run ends at) and, with data.pack_sequences, packed."""
        batch = self.collator(examples, self.cfg.data.final_mask_rate if mask_prob is None else mask_prob)
        if not self.cfg.data.pack_sequences:
            return batch
        return pack_batch(batch, self.cfg.data.max_seq_len, self.collator.special.pad, self.cfg.data.pad_to_multiple_of)

    def targets(self, batch: Batch) -> torch.Tensor:
        return self.objective.targets(batch)

    def forward(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = model(**model_inputs(batch))  # `model` is the objective as the engine spread it
        return self.objective.loss_terms(out), {k: v.detach().float() for k, v in out.items()}

    def log_fields(self, sums: dict[str, float], seconds: float) -> dict[str, float]:
        fields = figure_fields(sums)
        fields["packing_efficiency"] = sums["tokens"] / max(sums["slots"], 1.0)
        if self.peak_flops:
            fields["mfu"] = sums["tokens"] / seconds * self.flops_per_token / self.peak_flops
        return fields

    def evaluate(self, model: torch.nn.Module, acc: Accelerator) -> dict[str, Any]:
        if not len(self.validation):
            return {}  # no figures at all rather than a perplexity of 1.0 over nothing
        return evaluate(model, self.objective.figure_names, self.validation, self.cfg, self.collate, acc)

    def save_best(self, model: torch.nn.Module, state: TrainState, acc: Accelerator) -> None:
        raise NotImplementedError("pretraining has no best-so-far metric")

    def checkpoint_saved(self, model: torch.nn.Module, state: TrainState, acc: Accelerator) -> None:
        """Export the current weights in Hugging Face format and upload them to a step-N branch, so users can study
        training dynamics; the export is removed afterwards (the checkpoint itself stays)."""
        hub = self.cfg.hub
        if not (hub.push and hub.push_checkpoints):
            return
        branch = f"step-{state.step}"
        out = Path(self.cfg.output_dir)
        folder = export_pretrained(
            acc, self.engine, model, self.objective, self.prepared.tokenizer, self.cfg, out, f".hub-{branch}"
        )
        if acc.is_main_process:
            push_folder(folder, hub.repo_id, branch, hub.private, f"berth: checkpoint {branch}")
            shutil.rmtree(folder, ignore_errors=True)
        acc.wait_for_everyone()

    def finish(self, model: torch.nn.Module, state: TrainState, acc: Accelerator) -> Path:
        cfg = self.cfg
        final = export_pretrained(
            acc, self.engine, model, self.objective, self.prepared.tokenizer, cfg, Path(cfg.output_dir)
        )
        if cfg.hub.push and acc.is_main_process:
            push_folder(final, cfg.hub.repo_id, cfg.hub.revision, cfg.hub.private, "berth: final pretrained model")
        return final


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    names: tuple[str, ...],
    examples: EpochExamples,
    cfg: PretrainConfig,
    collate: Callable[[list[dict]], Batch],
    acc: Accelerator,
) -> dict[str, float]:
    """Held-out figures of the objective (`names`: the sums its forward returns) with a fixed mask: MLM loss,
    perplexity and masked-token accuracy, [CLS]-task and replaced-token figures.

    The validation examples of epoch 0 are masked by their own (seed, 0, index) generators, so every
    evaluation of a run (and of a resumed run) sees the very same masks. Dropout is off. Every process runs as
    many batches (`lockstep_batches`); `train.eval_batches` caps each process's.
    """
    parts = lockstep_batches(
        len(examples), cfg.train.batch_size, acc.process_index, acc.num_processes, limit=cfg.train.eval_batches
    )
    sums = torch.zeros(len(names), device=acc.device)  # [F]
    model.eval()
    for part in parts:
        rows = collate([examples[i] for i in part.rows])
        out = model(**model_inputs({k: v.to(acc.device) for k, v in rows.items()}))
        if part.own:  # else a filler batch: run only to keep the processes' collectives in step
            sums += torch.stack([out[name].float() for name in names])
    model.train()
    return evaluation_fields(dict(zip(names, acc.reduce(sums, reduction="sum").tolist(), strict=True)))


def build_objective(cfg: PretrainConfig, special: SpecialIds, device_type: str) -> Objective:
    """The module to train for `data.objective`, its encoder checked against the sequence length."""
    sentence_task = cfg.data.sentence_task != "none"
    if cfg.data.objective == "rtd":
        ids = {"pad": special.pad, "cls": special.cls, "sep": special.sep}
        objective: Objective = ReplacedTokenObjective(
            cfg.model, special.vocab_size, ids, sentence_task, cfg.data.rtd_weight, device_type
        )
        positions = cfg.model.max_position_embeddings
    else:
        model = build_model(cfg.model, special.vocab_size, special.pad, special.cls, special.sep, device_type)
        positions = model.config.max_position_embeddings
        objective = MaskedLMObjective(model, special.vocab_size, sentence_task)
    check_seq_len(cfg.data.max_seq_len, positions, "the model's position embeddings")
    return objective


def pretrain(cfg: PretrainConfig, tokenizer_source: TokenizerSource | None = None) -> Path:
    """Train, evaluate, checkpoint and export to <output_dir>/final/. Returns that directory.

    `tokenizer_source` gives the tokenizer (the command line's trains it first when missing); by default the
    one saved in tokenizer.path is loaded.
    """
    stage = PretrainingStage(cfg, tokenizer_source)
    return Loop(cfg, stage, find_unused=cfg.data.sentence_task == "none").run()
