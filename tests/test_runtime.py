import math

import pytest
import torch
from torch import nn

from berth.runtime.checkpoint import config_differences
from berth.runtime.optim import Lamb, build_optimizer, parameter_groups
from berth.runtime.schedules import lr_multiplier, planned_curve


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        # warm-up 4 of 10 steps: 1/4, 2/4, 3/4, 4/4, then decay over the 6 remaining
        ("linear", [0.25, 0.5, 0.75, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6, 0.0]),
        ("constant", [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
        ("noam", [0.25, 0.5, 0.75, 1.0, *(math.sqrt(4 / d) for d in range(5, 11))]),
        ("cosine", [0.25, 0.5, 0.75, 1.0, *(0.5 * (1 + math.cos(math.pi * p / 6)) for p in range(1, 7))]),
        # warm-up 4, flat, then linear decay over the last 20% (2 of 10 steps)
        ("wsd", [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.0]),
    ],
)
def test_schedules_exact(schedule, expected):
    f = lr_multiplier(schedule, warmup_steps=4, total_steps=10)
    assert [f(s) for s in range(10)] == pytest.approx(expected)


def test_wsd_decays_over_its_share_and_never_into_the_warmup():
    f = lr_multiplier("wsd", warmup_steps=0, total_steps=10, min_ratio=0.1, decay_fraction=0.4)
    assert [f(s) for s in range(10)] == pytest.approx([1.0] * 6 + [0.775, 0.55, 0.325, 0.1])
    whole, linear = lr_multiplier("wsd", 4, 10, decay_fraction=1.0), lr_multiplier("linear", 4, 10)
    assert [whole(s) for s in range(10)] == pytest.approx([linear(s) for s in range(10)])


def test_a_refitted_schedule_stretches_its_rest_onto_each_new_count():
    # linear from 1 to 0 over 10 steps; after step 4 refitted to 16 (the rest stretched 2x), after step 10 to 13
    f = lr_multiplier("linear", warmup_steps=0, total_steps=10, refits=[(4, 16), (10, 13)])
    head = [0.9, 0.8, 0.7, 0.6]  # the first plan's
    stretched = [0.55, 0.5, 0.45, 0.4, 0.35, 0.3]  # half the slope: 0.6 down to 0 over 12 steps
    squeezed = [0.2, 0.1, 0.0]  # what was left at step 10 (0.3 over 6 steps) in 3
    assert [f(s) for s in range(13)] == pytest.approx(head + stretched + squeezed)
    # wsd: the stable part stays at the peak; the decay is stretched with the rest (2 of 5 steps left, then 6 of 15)
    wsd = lr_multiplier("wsd", warmup_steps=0, total_steps=10, refits=[(5, 20)])
    assert [wsd(s) for s in range(20)] == pytest.approx([1.0] * 14 + [5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6, 0.0])
    # cosine: the refit step's LR is kept and the last step still reaches min_ratio
    cos, plain = lr_multiplier("cosine", 2, 10, 0.1, refits=[(6, 9)]), lr_multiplier("cosine", 2, 10, 0.1)
    assert [cos(s) for s in range(6)] == [plain(s) for s in range(6)] and cos(8) == pytest.approx(0.1)
    # the count does not shape these: a refit only moves where they stop
    for schedule in ("constant", "noam"):
        refitted, plain = lr_multiplier(schedule, 2, 10, refits=[(5, 30)]), lr_multiplier(schedule, 2, 10)
        assert [refitted(s) for s in range(30)] == [plain(s) for s in range(30)]


def test_decay_fraction_is_refused_where_it_does_nothing():
    from berth.runtime.config import TrainConfig

    assert TrainConfig(schedule="wsd", decay_fraction=0.1).decay_fraction == 0.1
    with pytest.raises(ValueError, match=r"decay_fraction=0\.1 does nothing with schedule=linear"):
        TrainConfig(decay_fraction=0.1)
    with pytest.raises(ValueError, match=r"decay_fraction must be in \(0, 1\]"):
        TrainConfig(schedule="wsd", decay_fraction=0.0)


def test_min_lr_ratio_and_no_warmup():
    f = lr_multiplier("linear", warmup_steps=0, total_steps=4, min_ratio=0.1)
    assert [f(s) for s in range(4)] == pytest.approx([0.775, 0.55, 0.325, 0.1])


def test_planned_curve_names_warmup_end_and_last_step():
    curve = dict(planned_curve(1e-3, "linear", warmup_steps=10, total_steps=100))
    assert curve[9] == pytest.approx(1e-3)
    assert curve[0] == pytest.approx(1e-4)
    assert curve[99] == pytest.approx(0.0)


def test_no_weight_decay_on_biases_and_layer_norms():
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    decay, no_decay = parameter_groups(model, 0.01)
    assert [p.shape for p in decay["params"]] == [torch.Size([3, 4])]
    assert sorted(p.numel() for p in no_decay["params"]) == [3, 3, 3]
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.01, 0.0)


def test_lamb_step_matches_the_formula():
    w = nn.Parameter(torch.tensor([3.0, 4.0]))
    w.grad = torch.tensor([0.5, -1.0])
    Lamb([w], lr=0.1, betas=(0.9, 0.999), eps=0.0, weight_decay=0.0).step()
    # step 1: m_hat = g, v_hat = g^2, update = sign(g); trust = ||w|| / ||update|| = 5 / sqrt(2)
    expected = torch.tensor([3.0, 4.0]) - 0.1 * (5 / math.sqrt(2)) * torch.tensor([1.0, -1.0])
    assert torch.allclose(w.detach(), expected)


def test_build_optimizer_names():
    model = nn.Linear(2, 2)
    assert isinstance(build_optimizer(model, "adamw", 1e-3, 0.01), torch.optim.AdamW)
    assert isinstance(build_optimizer(model, "lamb", 1e-3, 0.01), Lamb)


def test_mfu_peak_is_looked_up_by_whole_name_parts():
    from berth.pretrain.train import peak_tflops_of

    assert peak_tflops_of("NVIDIA L4") == 121.0
    assert peak_tflops_of("NVIDIA L40S") == 362.0  # not an L4
    assert peak_tflops_of("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops_of("NVIDIA A10") == 125.0  # not an A100
    assert peak_tflops_of("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops_of("NVIDIA GeForce RTX 4090") == 165.0
    assert peak_tflops_of("Tesla T4") == 0.0


def test_wandb_is_offline_unless_logged_in(monkeypatch, tmp_path):
    from berth.runtime.tracking import configure_wandb

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    assert configure_wandb() == "offline"
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert configure_wandb() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert configure_wandb() == "disabled"  # the user's choice stands


def test_metrics_log_drops_lines_past_a_resumed_step(tmp_path):
    from berth.runtime.tracking import MetricsLog, read_metrics

    log = MetricsLog(tmp_path)
    for step in (1, 2, 3, 4):
        log.write({"step": step, "loss": float("nan") if step == 4 else 1.0 / step})
    assert read_metrics(tmp_path)[-1] == {"step": 4, "loss": None}  # JSON has no NaN
    MetricsLog(tmp_path, resume_step=2)
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2]


def test_config_differences_name_section_keys_and_top_level_values():
    saved = "task: ner\nmodel:\n  init: a\n  size: mini\ndata:\n  max_seq_len: 128\ntrain:\n  lr: 0.1\n"
    current = {"task": "classification", "model": {"init": "b", "size": "mini"}, "data": {}, "train": {"lr": 0.2}}
    assert config_differences(saved, current, ("task", "model", "data")) == [
        "task: 'ner' -> 'classification'",
        "model.init: 'a' -> 'b'",
        "data.max_seq_len: 128 -> None",
    ]


def test_a_cut_last_line_of_the_metrics_log_is_skipped_and_dropped_on_resume(tmp_path, caplog):
    from berth.core.errors import BerthError
    from berth.runtime.tracking import METRICS_FILE, MetricsLog, read_metrics

    log = MetricsLog(tmp_path)
    for step in (1, 2, 3):
        log.write({"step": step, "loss": 1.0})
    with (tmp_path / METRICS_FILE).open("a") as handle:
        handle.write('{"step": 4, "lo')  # killed mid-write
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2, 3]
    assert "skipping its last line, cut short (15 characters)" in caplog.text
    MetricsLog(tmp_path, resume_step=3).write({"step": 4, "loss": 0.5})
    assert (tmp_path / METRICS_FILE).read_text().splitlines()[-2:] == [
        '{"step": 3, "loss": 1.0}',
        '{"step": 4, "loss": 0.5}',
    ]
    assert not (tmp_path / f"{METRICS_FILE}.tmp").exists() and not list(tmp_path.glob("*.tmp"))

    (tmp_path / METRICS_FILE).write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(BerthError, match=r"metrics.jsonl line 2: not a JSON record; the metrics log is damaged"):
        read_metrics(tmp_path)


@pytest.mark.parametrize("atomic_exchange", [True, False])
def test_replacing_a_directory_keeps_one_whole_version(tmp_path, monkeypatch, atomic_exchange):
    from berth.core import files

    if not atomic_exchange:
        monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    target = tmp_path / "best"
    target.mkdir()
    (target / "weights").write_text("old")
    new = files.temporary_sibling(target)
    new.mkdir()
    (new / "weights").write_text("new")
    files.replace_dir(new, target)
    assert (target / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_recover_puts_back_a_version_moved_aside_and_removes_temporary_ones(tmp_path):
    from berth.core import files

    # a kill between moving best/ aside and renaming the new one in: only the old one and the new temporary exist
    (tmp_path / ".old-best-17").mkdir()
    (tmp_path / ".old-best-17" / "weights").write_text("old")
    (tmp_path / ".tmp-best-18").mkdir()
    (tmp_path / "final").mkdir()
    (tmp_path / ".old-final-19").mkdir()  # final/ is in place: the aside copy is only left over
    files.recover(tmp_path)
    assert (tmp_path / "best" / "weights").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "final"]


def test_a_launch_of_several_processes_that_accelerate_sets_up_as_one_is_refused(monkeypatch, tmp_path):
    from berth.core.errors import BerthError
    from berth.runtime import accel

    class OneProcess:  # what Accelerate gives every rank of a launch it did not recognise
        num_processes = 1

        def __init__(self, **kwargs):
            pass

    monkeypatch.setattr(accel, "Accelerator", OneProcess)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(BerthError, match=r"^the launcher started 2 processes \(WORLD_SIZE\) but Accelerate set up 1"):
        accel.build_accelerator("fp32", (), str(tmp_path), find_unused=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert isinstance(accel.build_accelerator("fp32", (), str(tmp_path), find_unused=False), OneProcess)


def test_the_collective_timeout_reaches_the_process_group_set_up(monkeypatch, tmp_path):
    from datetime import timedelta

    from accelerate.utils import InitProcessGroupKwargs

    from berth.runtime import accel

    seen = {}

    class Recording:
        num_processes = 1

        def __init__(self, **kwargs):
            seen.update(kwargs)

    monkeypatch.setattr(accel, "Accelerator", Recording)
    accel.build_accelerator("fp32", (), str(tmp_path), find_unused=False, dist_timeout=7)
    (group,) = [h for h in seen["kwargs_handlers"] if isinstance(h, InitProcessGroupKwargs)]
    assert group.to_kwargs()["timeout"] == timedelta(minutes=7)


def test_a_collective_timeout_below_a_minute_is_refused():
    from berth.runtime.config import TrainConfig

    with pytest.raises(ValueError, match=r"^dist_timeout must be at least 1; got 0"):
        TrainConfig(dist_timeout=0)


def test_a_deepspeed_checkpoint_on_another_process_count_is_refused_in_one_line(tmp_path):
    """DeepSpeed's checkpoints hold one optimizer shard per process: resuming on another count is refused before
    anything is loaded, naming both counts and what to do."""
    from types import SimpleNamespace

    from berth.core.errors import BerthError
    from berth.runtime.checkpoint import load_checkpoint

    for name in ("config.yaml", "rng-0.json", "rng-1.json"):
        (tmp_path / name).write_text("{}")
    engine = SimpleNamespace(name="DeepSpeed ZeRO-3", elastic=False)
    acc = SimpleNamespace(num_processes=1, process_index=0, is_main_process=True)
    with pytest.raises(BerthError, match=r"^refusing to resume from .*: DeepSpeed ZeRO-3 wrote it with 2 processes"):
        load_checkpoint(acc, engine, tmp_path, {}, {}, ())
    (tmp_path / "rng-1.json").unlink()
    (tmp_path / "rng-2.json").write_text("{}")
    with pytest.raises(BerthError, match=r"its RNG files are not rng-0 \.\. rng-1"):
        load_checkpoint(acc, engine, tmp_path, {}, {}, ())


class _Rank1Of2:
    """What a second machine's process sees of a launch of 2: not the main process; `reduce` sums over both, the
    main process (which wrote the marker in its own directory) counting 1."""

    num_processes, process_index, is_main_process, device = 2, 1, False, "cpu"

    def reduce(self, tensor, reduction):
        return tensor + 1

    def wait_for_everyone(self):
        pass


def test_an_output_dir_that_another_machine_cannot_see_is_refused_in_one_line(monkeypatch, tmp_path):
    from berth.core.errors import BerthError
    from berth.runtime import collective

    monkeypatch.setattr(collective, "broadcast_object_list", lambda token: token.__setitem__(0, "abc"))
    with pytest.raises(BerthError, match=r"^output_dir .* is not shared by every machine of this launch"):
        collective.check_output_shared(_Rank1Of2(), tmp_path)  # the main process wrote its marker elsewhere
    (tmp_path / ".berth-shared-abc").write_text("")  # where the directory is shared, the marker is here
    collective.check_output_shared(_Rank1Of2(), tmp_path)


# A process that logs a last line into a buffering handler (written when handlers are flushed), leaves its stdout
# tail unflushed (a pipe is block-buffered), registers an atexit hook (run only by Python's finalization) and ends
# the way berth's command line does.
_ENDING = """
import atexit, logging, logging.handlers, sys
from berth.core.process import end_launched_process
atexit.register(lambda: print("finalized", flush=True))
target = logging.StreamHandler(sys.stderr)
target.setFormatter(logging.Formatter("%(levelname)s:%(name)s:%(message)s"))
logging.getLogger().addHandler(logging.handlers.MemoryHandler(100, flushLevel=logging.CRITICAL, target=target))
logging.getLogger("run").warning("last line")
sys.stdout.write("unflushed tail;")
end_launched_process(7)
print("returned")
"""


@pytest.mark.parametrize("world_size", ["2", None])
def test_a_launched_process_ends_flushed_and_without_finalization(world_size):
    """One of several launched processes ends in end_launched_process, with its status, its output flushed and
    Python's finalization skipped (where gloo's worker threads can abort it); a process alone goes on."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "PYTHONUNBUFFERED")}
    if world_size:
        env["WORLD_SIZE"] = world_size
    ran = subprocess.run([sys.executable, "-c", _ENDING], env=env, capture_output=True, text=True, timeout=300)
    assert "WARNING:run:last line" in ran.stderr
    if world_size == "2":
        assert (ran.returncode, ran.stdout) == (7, "unflushed tail;"), ran.stderr[-2000:]
    else:
        assert (ran.returncode, ran.stdout) == (0, "unflushed tail;returned\nfinalized\n"), ran.stderr[-2000:]
