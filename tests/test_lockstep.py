"""Evaluation in lockstep: every process runs as many forward passes as every other (under FSDP2 and ZeRO-3 each
forward pass is a collective), on splits that do not divide evenly and splits smaller than the process count."""

import json
import math

import pytest
from conftest import launch_two_processes
from lockstep_eval import main as evaluate_everything
from test_finetune_train import ner_config, review_config, tiny  # noqa: F401
from test_pretrain_train import config, setup  # noqa: F401

from berth.core.config import save_config
from berth.runtime.lockstep import EvalBatch, lockstep_batches


def test_a_process_with_fewer_rows_runs_filler_batches_of_the_shortest_row():
    lengths = [5, 9, 1, 7, 3]
    # 5 rows over 2 processes at batch 2: rank 0 holds rows 0, 2, 4 (2 batches), rank 1 rows 1, 3 (1 batch + filler)
    assert lockstep_batches(5, 2, 0, 2, lengths) == [EvalBatch([0, 4], 2), EvalBatch([2], 1)]
    assert lockstep_batches(5, 2, 1, 2, lengths) == [EvalBatch([1, 3], 2), EvalBatch([2], 0)]
    assert lockstep_batches(5, 2, 1, 2, lengths)[1].mine == []


@pytest.mark.parametrize(("count", "batch", "processes"), [(0, 8, 2), (1, 8, 2), (3, 8, 2), (17, 8, 2), (17, 4, 8)])
def test_every_process_runs_as_many_batches_and_every_row_once(count, batch, processes):
    shares = [lockstep_batches(count, batch, rank, processes, list(range(count))) for rank in range(processes)]
    assert len({len(share) for share in shares}) == 1
    assert len(shares[0]) == math.ceil(math.ceil(count / processes) / batch)
    own = sorted(row for share in shares for part in share for row in part.mine)
    assert own == list(range(count))
    assert all(part.rows for share in shares for part in share)  # a forward pass needs at least one row


def test_a_limit_caps_every_process_alike():
    shares = [lockstep_batches(40, 4, rank, 2, limit=3) for rank in range(2)]
    assert [len(s) for s in shares] == [3, 3]
    assert shares[1][0] == EvalBatch([1, 3, 5, 7], 4)  # without lengths the order is the rows'


_one_process: dict = {}


def configs(setup, tiny, root):  # noqa: F811
    # a process that ran fewer forward passes would wait in a collective: fail in minutes, not the default 30
    short = "train.dist_timeout=2"
    pretraining = config(setup, "lockstep-pretrain", "data.eval_fraction=0.05", short)
    sentiment = review_config(
        tiny, root / "classification", "data.aggregation=attention", "data.robustness_docs=9", short
    )
    tagging = ner_config(tiny, root / "ner", short)
    paths = []
    for name, cfg in (("pretrain", pretraining), ("classification", sentiment), ("ner", tagging)):
        paths.append(str(save_config(cfg, root / f"config-{name}")))
    return paths


@pytest.mark.parametrize("launch", ["fsdp", pytest.param("deepspeed_zero3", marks=pytest.mark.slow)])
def test_every_evaluation_under_a_sharding_engine_finishes_and_equals_one_process(setup, tiny, tmp_path, launch):  # noqa: F811
    """Pretraining's held-out figures, classification (windows with every aggregation and the attention pooler,
    head/tail truncation, hidden-text robustness documents) and NER windows on 1, 3 and 17 rows at batch 8, with
    2 processes: rank 1 holds no row of a 1-row split."""
    paths = configs(setup, tiny, tmp_path)
    if "reference" not in _one_process:
        _one_process["reference"] = json.loads(json.dumps(evaluate_everything(str(tmp_path / "one.json"), *paths)))
    one = _one_process["reference"]
    args = [str(tmp_path / "two.json"), *paths]
    result = launch_two_processes("tests/lockstep_eval.py", args, f"configs/accelerate/{launch}.yaml", script=True)
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["pretraining"]["1"]["mlm_loss"] > 0
    assert two["classification"]["17"]["metrics"]["long_count"] > 0  # documents longer than one window
    assert two["classification"]["robustness"]["robustness"]["texts"] > 0  # hidden-text documents were evaluated
    _close(two, one)


def _close(a, b, path=""):
    """Nested figures equal within fp32 tolerance (pytest.approx does not descend into nested dicts)."""
    assert type(a) is type(b) or {type(a), type(b)} <= {int, float}, path
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _close(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float | int) and not isinstance(a, bool):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6), path
    else:
        assert a == b, path
