"""CUDA checks, skipped without a CUDA device (`bench/gpu_check.sh` runs them with the GPU benchmark).

They cover what the CPU suite cannot: a bf16 step with fused AdamW, packed block-diagonal masks and sdpa on CUDA
kernels (BERT and ModernBERT), and MFU computed from a measured step.
"""

import contextlib
import math

import pytest
import torch
from test_pretrain_model import SLIDING, batch, inputs, modernbert
from test_pretrain_train import config, setup  # noqa: F401

from berth.pretrain.config import ModelConfig
from berth.pretrain.masking import pack_batch
from berth.pretrain.model import MaskedLMObjective, build_model
from berth.pretrain.train import PretrainingStage, peak_tflops_of, pretrain
from berth.runtime.loop import Loop
from berth.runtime.tracking import read_metrics

pytestmark = pytest.mark.gpu
VOCAB = 300


@pytest.fixture(autouse=True)
def _exact_matmuls():
    """TF32 would make fp32 comparisons loose; the checks below compare in true fp32."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def on_cuda(tensors):
    return {k: v.cuda() for k, v in tensors.items()}


@pytest.mark.parametrize("architecture", ["bert", "modernbert", "sliding"])
def test_packed_batches_give_the_unpacked_losses_on_cuda(architecture):
    if architecture == "bert":
        torch.manual_seed(0)
        model = build_model(ModelConfig(size="tiny", attn_implementation="sdpa"), VOCAB, 0)
    else:
        model = modernbert("sdpa", **(SLIDING if architecture == "sliding" else {}))
    torch.manual_seed(1)
    objective = MaskedLMObjective(model, VOCAB, sentence_task=True).cuda().eval()
    unpacked = batch(seed=5, n=12)
    packed = pack_batch(unpacked, capacity=96, pad_id=0)
    extra = {k: packed[k] for k in ("position_ids", "sequence_ids", "cls_positions")}
    with torch.no_grad():
        a = objective(**on_cuda(inputs(unpacked)))
        b = objective(**on_cuda(inputs(packed)), **on_cuda(extra))
    for key in ("mlm_loss", "nsp_loss"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-4)
    assert torch.equal(a["mlm_count"], b["mlm_count"])


def packed_losses_and_gradients(architecture: str, impl: str, autocast: torch.dtype | None = None):
    """The MLM and NSP losses of one packed batch on CUDA, and every gradient, with the same weights whatever `impl`;
    under autocast to `autocast` when given."""
    if architecture == "bert":
        torch.manual_seed(0)
        model = build_model(ModelConfig(size="tiny", attention_dropout=0.0), VOCAB, 0, device_type="cuda")
    else:
        model = modernbert("sdpa", **(SLIDING if architecture == "sliding" else {}))
    model.set_attn_implementation(impl)
    torch.manual_seed(1)
    objective = MaskedLMObjective(model, VOCAB, sentence_task=True).cuda().eval()  # eval: no dropout
    packed = pack_batch(batch(seed=5, n=12), capacity=96, pad_id=0)
    extra = {k: packed[k] for k in ("position_ids", "sequence_ids", "cls_positions")}
    with torch.autocast("cuda", dtype=autocast) if autocast else contextlib.nullcontext():
        out = objective(**on_cuda(inputs(packed)), **on_cuda(extra))
    (out["mlm_loss"] + out["nsp_loss"]).backward()
    return out, [p.grad.clone() for p in objective.parameters() if p.grad is not None]


def assert_alike(reference, other, loss_tol: float, grad_rtol: float, grad_atol: float) -> None:
    (dense, dense_grads), (theirs, their_grads) = reference, other
    for key in ("mlm_loss", "nsp_loss"):
        torch.testing.assert_close(dense[key], theirs[key], rtol=loss_tol, atol=loss_tol)
    assert len(dense_grads) == len(their_grads)
    for a, b in zip(dense_grads, their_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=grad_rtol, atol=grad_atol)


@pytest.mark.parametrize("architecture", ["bert", "modernbert", "sliding"])
def test_flex_attention_on_packed_rows_gives_the_dense_losses_and_gradients(architecture):
    """model.attn_implementation=flex_attention: the document block mask against the dense block-diagonal mask
    (sdpa), same weights, forward and backward."""
    dense = packed_losses_and_gradients(architecture, "sdpa")
    flex = packed_losses_and_gradients(architecture, "flex_attention")
    assert_alike(dense, flex, loss_tol=1e-4, grad_rtol=1e-3, grad_atol=1e-4)


@pytest.mark.parametrize("architecture", ["bert", "modernbert", "sliding"])
def test_unpadded_varlen_flash_attention_gives_the_dense_losses_and_gradients(architecture):
    """model.attn_implementation=unpadded in bf16 on CUDA runs torch's varlen_attn over each example (ModernBERT's
    sliding band as its window); against sdpa with the dense block-diagonal mask, same weights, under autocast."""
    from berth.pretrain.unpadded import NAME, varlen_kernel

    assert varlen_kernel(torch.zeros(1, device="cuda", dtype=torch.bfloat16), 0.0)
    dense = packed_losses_and_gradients(architecture, "sdpa", torch.bfloat16)
    varlen = packed_losses_and_gradients(architecture, NAME, torch.bfloat16)
    assert_alike(dense, varlen, loss_tol=2e-2, grad_rtol=5e-2, grad_atol=5e-3)


@pytest.mark.parametrize("architecture", ["bert", "modernbert"])
def test_sdpa_and_eager_agree_on_cuda(architecture):
    outs = []
    for impl in ("sdpa", "eager"):
        if architecture == "bert":
            torch.manual_seed(0)
            model = build_model(ModelConfig(size="tiny", attn_implementation=impl), VOCAB, 0)
        else:
            model = modernbert(impl)
        objective = MaskedLMObjective(model, VOCAB, True).cuda().eval()
        with torch.no_grad():
            outs.append(objective(**on_cuda(inputs(batch(seed=3)))))
    for key in ("mlm_loss", "nsp_loss"):
        torch.testing.assert_close(outs[0][key], outs[1][key], rtol=1e-4, atol=1e-4)


def test_a_bf16_step_with_fused_adamw_trains(setup):  # noqa: F811
    cfg = config(setup, "gpu-bf16", "train.precision=bf16", "train.max_steps=20", "model.architecture=modernbert")
    loop = Loop(cfg, PretrainingStage(cfg))
    loop.build()
    assert loop.accelerator.device.type == "cuda" and loop.accelerator.mixed_precision == "bf16"
    inner = loop.optimizer.optimizer  # Accelerate's wrapper around the torch optimizer
    assert isinstance(inner, torch.optim.AdamW) and inner.defaults["fused"]
    losses = []
    for step, micro_batches in enumerate(loop.epoch_steps()):
        loop.train_step(micro_batches)
        losses.append(float(loop.sums["loss"]))
        loop.sums = {}
        if step == 19:
            break
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) < sum(losses[:5])  # it learns (lr 1e-3 on a tiny model)


def test_mfu_is_reported_from_the_measured_step(setup):  # noqa: F811
    peak = peak_tflops_of(torch.cuda.get_device_name())
    overrides = ["train.precision=bf16", "train.max_steps=20", "train.log_every=5", "train.eval_every=0"]
    overrides += ["model.size=mini"] + ([] if peak else ["train.peak_tflops=100"])
    final = pretrain(config(setup, "gpu-mfu", *overrides))
    mfu = [m["mfu"] for m in read_metrics(final.parent) if "mfu" in m]
    assert len(mfu) == 4 and all(0 < x < 1 for x in mfu)
