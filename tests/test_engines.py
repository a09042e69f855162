"""The engines users scale out with, launched for real on this CPU through the shipped Accelerate configs:
DeepSpeed ZeRO-2 and ZeRO-3 (DeepSpeed's CPU accelerator over gloo) and FSDP2 (PyTorch's fully_shard over gloo),
2 processes each, against a 1-process run with the same global batch."""

import json
import shutil

import pytest
import torch
from conftest import free_port, launch_two_processes
from safetensors.torch import load_file
from tamper import forget_optimizer_moments, shift_data_position
from test_finetune_train import _flat_overrides, review_config, step_figures, tiny  # noqa: F401
from test_pretrain_train import assert_same_weights, config, setup, weights  # noqa: F401
from transformers import AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification

from berth.core.errors import BerthError
from berth.finetune.train import finetune
from berth.pretrain.model import MaskedLMObjective, build_model
from berth.pretrain.train import pretrain
from berth.runtime import accel
from berth.runtime.engines import FullyShard, shard_units, untied
from berth.runtime.tracking import read_metrics

NO_DROPOUT = ["model.hidden_dropout=0", "model.attention_dropout=0"]
# torch's fp32 norm over the whole gradient and DeepSpeed's fp64 one differ by about 1e-4 relative here (the fp64
# sum of the same gradients agrees with DeepSpeed's); a loss or gradient scale error is a factor, far outside.
NORM_REL = 5e-4


# -- which modules FSDP2 shards ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("architecture", "layer", "count"), [("bert", "BertLayer", 2), ("modernbert", "ModernBertEncoderLayer", 2)]
)
def test_fsdp_groups_are_the_models_own_layer_classes(architecture, layer, count):
    from berth.pretrain.config import ModelConfig

    model = build_model(ModelConfig(architecture=architecture, size="tiny"), 100, 0, 2, 3, "cpu")
    units = shard_units(MaskedLMObjective(model, 100, True))
    assert [type(u).__name__ for u in units] == [layer] * count
    # the embeddings are a layer class too (_no_split_modules), but hold the matrix tied to the MLM output: root
    embeddings = model.base_model.embeddings
    assert type(embeddings).__name__ in model._no_split_modules and embeddings not in units


def test_tied_tensors_are_written_as_separate_copies():
    shared = torch.arange(6.0).reshape(2, 3)
    out = untied({"a": shared, "b": shared, "c": torch.ones(2)})
    assert out["a"].data_ptr() != out["b"].data_ptr() and torch.equal(out["a"], out["b"])
    assert out["c"].data_ptr() != out["a"].data_ptr()


def test_a_deepspeed_launch_without_deepspeed_installed_is_one_line(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    real = accel.importlib.util.find_spec
    monkeypatch.setattr(accel.importlib.util, "find_spec", lambda name: None if name == "deepspeed" else real(name))
    with pytest.raises(BerthError, match=r"^the launch asks for DeepSpeed, which is not installed; pip install"):
        accel.check_engine_request(cuda=False)


def test_fsdp2_with_fp16_is_refused_in_one_line():
    """berth runs FSDP2's backward itself, so Accelerate's loss scaling never applies: fp16 is refused."""

    class Fp16:
        mixed_precision = "fp16"

    with pytest.raises(BerthError, match=r"^FSDP2 with fp16 has no loss scaling in berth; set train.precision=bf16"):
        FullyShard(Fp16())  # type: ignore[arg-type]


@pytest.mark.slow
@pytest.mark.parametrize("launch", ["deepspeed_zero2", "deepspeed_zero3"])
def test_a_deepspeed_bf16_export_holds_the_fp32_master_weights(setup, tmp_path, launch):  # noqa: F811
    """Under bf16 DeepSpeed's module holds bf16 copies and its optimizer the fp32 masters: the export holds the
    masters, equal to the fp32 weights DeepSpeed's own zero_to_fp32 reads from the checkpoint of the same step."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    _, base = setup
    run = tmp_path / "run"
    args = ["configs/pretrain/mini_zh.yaml", *base, f"output_dir={run}", "train.max_steps=2", "train.save_every=2"]
    args += ["train.precision=bf16", "train.batch_size=4"]
    result = launch_two_processes("pretrain", args, config=f"configs/accelerate/{launch}.yaml")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "precision bf16" in result.stderr
    exported = weights(run)
    masters = get_fp32_state_dict_from_zero_checkpoint(
        str(run / "checkpoints" / "step-00000002" / "deepspeed"), "state"
    )
    assert all(v.dtype == torch.float32 for v in exported.values())
    compared = 0
    for name, value in exported.items():
        if f"model.{name}" in masters:
            assert torch.equal(value, masters[f"model.{name}"].float()), name
            compared += 1
    assert compared >= len(exported) - 3  # the buffers aside
    # fp32 masters, not bf16 values widened to fp32
    embeddings = exported["bert.embeddings.word_embeddings.weight"]
    assert not torch.equal(embeddings, embeddings.bfloat16().float())


# -- pretraining under each engine -------------------------------------------------------------------------------

# 6 steps, checkpoints after steps 2, 4 and 6 (all kept): a run resumed from step 2 takes 4 steps, each with a
# learning rate above zero (warm-up 2, linear decay to 0 after step 6), so a lost optimizer state or data position
# changes the weights it ends with.
COMMON = [*NO_DROPOUT, "train.max_steps=6", "train.log_every=1", "train.eval_every=3", "train.save_every=2"]
COMMON += ["train.keep_checkpoints=3"]
_references: dict = {}


def variant_args(variant):
    """ "bert", "modernbert", or either with "-rtd" (replaced-token detection) -> its config overrides."""
    architecture, _, objective = variant.partition("-")
    return [f"model.architecture={architecture}", f"data.objective={objective or 'mlm'}"]


def reference(setup, variant):  # noqa: F811
    """One process, global batch 8 in one micro-batch."""
    if variant not in _references:
        cfg = config(setup, f"engines-one-{variant}", *variant_args(variant), *COMMON)
        _references[variant] = pretrain(cfg).parent
    return _references[variant]


def figures(run_dir, name):
    return [m[name] for m in read_metrics(run_dir) if name in m]


@pytest.mark.parametrize(
    ("launch", "architecture", "engine"),
    [
        # FSDP2 pretrains in `make test` (DeepSpeed fine-tunes there); the rest of the matrix is `slow` (CI runs
        # it after `make test`)
        pytest.param("deepspeed_zero2", "bert", "DeepSpeed ZeRO-2", marks=pytest.mark.slow),
        pytest.param("deepspeed_zero3", "bert", "DeepSpeed ZeRO-3", marks=pytest.mark.slow),
        pytest.param("deepspeed_zero3", "modernbert", "DeepSpeed ZeRO-3", marks=pytest.mark.slow),
        pytest.param("fsdp", "bert", "FSDP2", marks=pytest.mark.slow),
        ("fsdp", "modernbert", "FSDP2"),
        # replaced-token detection: ZeRO-3 gathers the generator's output matrices read outside their modules;
        # FSDP2 shards two encoders that share the token embeddings
        pytest.param("deepspeed_zero3", "bert-rtd", "DeepSpeed ZeRO-3", marks=pytest.mark.slow),
        pytest.param("fsdp", "modernbert-rtd", "FSDP2", marks=pytest.mark.slow),
    ],
)
def test_engine_pretrains_like_one_process_resumes_exactly_and_exports(setup, launch, architecture, engine):  # noqa: F811
    one = reference(setup, architecture)
    root, base = setup
    run = root / f"engines-{launch}-{architecture}"
    # 2 per micro-batch x 2 processes x 2 accumulation = the reference's 8
    args = ["configs/pretrain/mini_zh.yaml", *base, f"output_dir={run}", *variant_args(architecture)]
    args += [*COMMON, "train.batch_size=2", "train.grad_accum=2"]
    accelerate_config = f"configs/accelerate/{launch}.yaml"
    result = launch_two_processes("pretrain", args, config=accelerate_config)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"global batch 8 = 2 per process x 2 processes x 2 accumulation; {engine}; precision" in result.stderr
    assert result.stderr.count(f"exported {run / 'final'}") == 1

    assert_same_weights(weights(one), weights(run), atol=1e-5)
    assert len(figures(one, "loss")) == 6
    assert figures(run, "loss") == pytest.approx(figures(one, "loss"), rel=1e-5)  # the logged loss is global
    assert figures(run, "grad_norm") == pytest.approx(figures(one, "grad_norm"), rel=NORM_REL)
    assert figures(run, "eval_mlm_loss") == pytest.approx(figures(one, "eval_mlm_loss"), rel=1e-5)
    loader = AutoModel if architecture.endswith("-rtd") else AutoModelForMaskedLM
    _, info = loader.from_pretrained(run / "final", output_loading_info=True)
    assert not (info["missing_keys"] or info["mismatched_keys"]), info  # unexpected: BERT's NSP head, not MLM

    # Resume from step 2 of the same launch: every later step's loss and the end must be the uninterrupted
    # run's, bit for bit (test_a_resume_that_loses_state_ends_elsewhere shows that these checks can fail).
    finished, losses = weights(run), figures(run, "loss")
    result = resume_from_step_2(run, args, accelerate_config)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("resumed from") == 1 and "step-00000002 at step 2" in result.stderr
    logged = [m for m in read_metrics(run) if "loss" in m]
    assert [m["step"] for m in logged] == [1, 2, 3, 4, 5, 6]
    # the rate logged after step k is the one step k + 1 used: steps 3, 4 and 5 learn (6 ends the decay at 0)
    assert all(m["lr"] > 0 for m in logged[1:4])
    assert figures(run, "loss") == losses
    assert_same_weights(finished, weights(run))


def resume_from_step_2(run, args, accelerate_config, tamper=None):
    """The run as a stop after step 2's checkpoint left it (with `tamper` applied to that checkpoint), resumed."""
    shutil.rmtree(run / "final", ignore_errors=True)
    for later in ("step-00000004", "step-00000006"):
        shutil.rmtree(run / "checkpoints" / later, ignore_errors=True)
    if tamper is not None:
        tamper(run / "checkpoints" / "step-00000002")
    return launch_two_processes("pretrain", [*args, "train.resume=auto"], config=accelerate_config)


@pytest.mark.slow
@pytest.mark.parametrize("launch", ["fsdp", "deepspeed_zero3"])
def test_a_resume_that_loses_state_ends_elsewhere(setup, tmp_path, launch):  # noqa: F811
    """The mutation check of the resume test above: the same resume from a checkpoint whose data position or
    optimizer moments were lost ends with other weights, so the test above would catch either loss."""
    _, base = setup
    run = tmp_path / "run"
    args = ["configs/pretrain/mini_zh.yaml", *base, f"output_dir={run}", "model.architecture=bert"]
    args += [*COMMON, "train.batch_size=2", "train.grad_accum=2"]
    accelerate_config = f"configs/accelerate/{launch}.yaml"
    result = launch_two_processes("pretrain", args, config=accelerate_config)
    assert result.returncode == 0, result.stderr[-3000:]
    finished = weights(run)
    for tamper in (shift_data_position, forget_optimizer_moments):
        copy = tmp_path / tamper.__name__
        shutil.copytree(run, copy)
        copied = [a.replace(f"output_dir={run}", f"output_dir={copy}") for a in args]
        result = resume_from_step_2(copy, copied, accelerate_config, tamper)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "step-00000002 at step 2" in result.stderr
        ended = weights(copy)
        differing = [k for k in finished if not torch.allclose(finished[k], ended[k], atol=1e-5, rtol=0)]
        assert differing, f"{tamper.__name__}: the resume ended with the uninterrupted run's weights"


# -- resuming on another number of processes ---------------------------------------------------------------------


def stopped_after_step_2(run, target):
    """A copy of a finished run as a stop after step 2's checkpoint left it."""
    shutil.copytree(run, target)
    shutil.rmtree(target / "final")
    for later in ("step-00000004", "step-00000006"):
        shutil.rmtree(target / "checkpoints" / later)
    return target


@pytest.mark.parametrize("launch", [pytest.param("cpu_ddp_2proc", marks=pytest.mark.slow), "fsdp"])
def test_a_one_process_checkpoint_resumes_on_two_processes(setup, launch):  # noqa: F811
    """The global batch kept (8 = 8 x 1 x 1, then 2 x 2 processes x 2 accumulation): the same examples in the same
    order, so the end is the uninterrupted one-process run's within fp32 summation order."""
    one = reference(setup, "bert")
    root, base = setup
    run = stopped_after_step_2(one, root / f"elastic-1-to-2-{launch}")
    args = ["configs/pretrain/mini_zh.yaml", *base, f"output_dir={run}", "model.architecture=bert", *COMMON]
    args += ["train.batch_size=2", "train.grad_accum=2", "train.resume=auto"]
    result = launch_two_processes("pretrain", args, config=f"configs/accelerate/{launch}.yaml")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step-00000002 at step 2" in result.stderr
    assert "resuming a checkpoint of 1 processes on 2" in result.stderr
    assert_same_weights(weights(one), weights(run), atol=1e-5)
    assert figures(run, "loss") == pytest.approx(figures(one, "loss"), rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("launch", ["cpu_ddp_2proc", "fsdp"])
def test_a_two_process_checkpoint_resumes_on_one(setup, launch):  # noqa: F811
    one = reference(setup, "bert")
    root, base = setup
    two = root / f"elastic-two-{launch}"
    args = ["configs/pretrain/mini_zh.yaml", *base, f"output_dir={two}", "model.architecture=bert", *COMMON]
    result = launch_two_processes("pretrain", [*args, "train.batch_size=4"], config=f"configs/accelerate/{launch}.yaml")
    assert result.returncode == 0, result.stderr[-3000:]
    run = stopped_after_step_2(two, root / f"elastic-2-to-1-{launch}")
    pretrain(config(setup, run.name, "model.architecture=bert", *COMMON, "train.resume=auto"))
    assert_same_weights(weights(two), weights(run), atol=1e-5)
    assert_same_weights(weights(one), weights(run), atol=1e-5)
    assert figures(run, "loss") == pytest.approx(figures(two, "loss"), rel=1e-5)


# -- fine-tuning under each engine -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("launch", "aggregation"),
    [
        pytest.param("deepspeed_zero2", "auto", marks=pytest.mark.slow),
        pytest.param("deepspeed_zero3", "attention", marks=pytest.mark.slow),  # 48 s: DeepSpeed's start-up
        ("fsdp", "attention"),
    ],
)
def test_engine_finetunes_like_one_process(tiny, tmp_path, launch, aggregation):  # noqa: F811
    """Classification with windows; attention pooling calls the model outside forward (its pooler and classifier),
    which the sharding engines must gather for too."""
    common = [f"data.aggregation={aggregation}", "train.max_steps=3", "train.eval_every=3", "train.log_every=1"]
    common += [*NO_DROPOUT, "model.classifier_dropout=0"]
    one = finetune(review_config(tiny, tmp_path / "one", *common))
    cfg = review_config(tiny, tmp_path / "two", *common, "train.batch_size=2", "train.grad_accum=2")
    overrides = [f"{k}={v}" for k, v in _flat_overrides(cfg)]
    result = launch_two_processes(
        "finetune", ["configs/finetune/reviews_sentiment.yaml", *overrides], config=f"configs/accelerate/{launch}.yaml"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "global batch 8 = 2 per process x 2 processes x 2 accumulation" in result.stderr
    ours, theirs = step_figures(tmp_path / "two"), step_figures(one.parent)
    assert len(theirs) == 6
    assert ours[0::2] == pytest.approx(theirs[0::2], rel=1e-4)  # losses
    assert ours[1::2] == pytest.approx(theirs[1::2], rel=NORM_REL)  # gradient norms
    final = tmp_path / "two" / "final"
    for name in ("model.safetensors", "window_pooler.safetensors")[: 1 + (aggregation == "attention")]:
        a, b = load_file(str(one / name)), load_file(str(final / name))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)
    results = [json.loads((d / "eval_results.json").read_text()) for d in (one.parent, tmp_path / "two")]
    assert results[0]["validation"]["loss"] == pytest.approx(results[1]["validation"]["loss"], rel=1e-4)
    assert results[0]["test"]["accuracy"] == results[1]["test"]["accuracy"]
    AutoModelForSequenceClassification.from_pretrained(final)


# -- several machines --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_machines_simulated_on_one_host_pretrain_together(setup, fake_hub, monkeypatch, tmp_path):  # noqa: F811
    """Two `accelerate launch --num_machines 2` (machine ranks 0 and 1, one process each) over 127.0.0.1: they
    train as one 2-process run; only the global main process prepares data first, writes the run, the export and
    the upload."""
    import os
    import subprocess
    import sys

    from conftest import HUB_TOKEN

    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
    one = reference(setup, "bert")
    _, base = setup
    run = tmp_path / "two-machines"
    args = ["configs/pretrain/mini_zh.yaml", *base, f"output_dir={run}", *COMMON, "train.batch_size=4"]
    args += [f"data.cache_dir={tmp_path / 'cache'}", "hub.push=true", "hub.repo_id=carol/two-machines"]
    port = free_port()
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        "configs/accelerate/cpu_ddp_2proc.yaml",
    ]
    launch += ["--num_machines", "2", "--num_processes", "2", "--main_process_ip", "127.0.0.1"]
    launch += ["--main_process_port", port]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    machines = [
        subprocess.Popen(
            [*launch, "--machine_rank", str(rank), "-m", "berth", "pretrain", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    logs = [machine.communicate(timeout=600)[1] for machine in machines]
    assert [m.returncode for m in machines] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    assert "global batch 8 = 4 per process x 2 processes x 1 accumulation; DDP" in logs[0]
    assert "global batch" not in logs[1] and "exported" not in logs[1]  # the second machine's process is not main
    assert logs[0].count(f"exported {run / 'final'}") == 1
    assert "reusing tokenized documents" in logs[1]  # prepared once, by the main process, before the other reads it
    assert_same_weights(weights(one), weights(run), atol=1e-5)
    assert figures(run, "loss") == pytest.approx(figures(one, "loss"), rel=1e-5)
    finals = [c for c in fake_hub.commits if c["revision"] == "main"]
    assert len(finals) == 1 and finals[0]["repo"] == "carol/two-machines"


def test_an_installed_deepspeed_prints_nothing_on_stdout():
    """Accelerate imports DeepSpeed wherever it is installed (to unwrap any model), and DeepSpeed then prints its
    device guess to stdout, where `berth predict` writes its JSON lines."""
    import subprocess
    import sys

    code = "from berth.runtime.accel import quiet_deepspeed; quiet_deepspeed(); import deepspeed"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == ""
