"""Fault injection: pretraining killed with SIGKILL at seeded random moments, inside checkpoint saves too, then
resumed with train.resume=auto, ends with the weights of an uninterrupted run every time."""

import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from berth.corpora.embedded import peoples_daily

TRIALS = 20
# Run inside the child: the process kills itself at the n-th call of one step of a checkpoint save, before or
# after that step.
KILL_INSIDE = """
import importlib, os, signal, sys
where, when, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
module, name = where.rsplit(".", 1)
target = importlib.import_module(module)
real, calls = getattr(target, name), []
def dying(*args, **kwargs):
    calls.append(1)
    if len(calls) == n and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    out = real(*args, **kwargs)
    if len(calls) == n:
        os.kill(os.getpid(), signal.SIGKILL)
    return out
setattr(target, name, dying)
from berth.app.cli import main
sys.exit(main(sys.argv[4:]))
"""
# Moments inside a save: before the weights are written (RNG files only), once every file is written but before
# the rename into place, after the rename but before older checkpoints are pruned.
SAVE_STEPS = (
    ("berth.runtime.engines.save_model", "before"),
    ("berth.runtime.checkpoint.replace_dir", "before"),
    ("berth.runtime.checkpoint.replace_dir", "after"),
)


@pytest.fixture(scope="module")
def base(zh_tokenizer_dir, tmp_path_factory):
    _, _, tok_dir = zh_tokenizer_dir
    root = tmp_path_factory.mktemp("faults")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(peoples_daily(unit="paragraph")["text"][:600]) + "\n", encoding="utf-8")
    args = [
        "pretrain",
        "configs/pretrain/mini_zh.yaml",
        f"tokenizer.path={tok_dir}",
        f"corpus.sources=[{corpus}]",
        f"data.cache_dir={root / 'cache'}",
        "data.max_seq_len=64",
        "data.num_proc=1",
        "model.size=tiny",
        "train.batch_size=8",
        "train.max_steps=10",
        "train.warmup_steps=2",
        "train.precision=fp32",
        "train.log_every=2",
        "train.eval_every=5",
        "train.eval_batches=2",
        "train.save_every=1",
        "train.keep_checkpoints=2",
        "train.progress_bar=false",
    ]
    reference = root / "reference"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "berth", "-q", *args, f"output_dir={reference}"], capture_output=True)
    seconds = time.perf_counter() - start  # how long a whole run takes here: kill times are drawn inside it
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    return root, args, load_file(str(reference / "final" / "model.safetensors")), seconds


def killed_run(command: list[str], delay: float) -> int:
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        return child.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        child.send_signal(signal.SIGKILL)
        return child.wait()


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_gives_the_uninterrupted_weights(base):
    root, args, reference, seconds = base
    rng = random.Random(0)
    kinds = []
    for trial in range(TRIALS):
        out = root / f"trial-{trial}"
        run = [*args, f"output_dir={out}"]
        if trial % 2:  # inside a save: at one of its steps, in one of the ten saves
            (step, when), nth = rng.choice(SAVE_STEPS), rng.randint(1, 10)
            code = subprocess.run([sys.executable, "-c", KILL_INSIDE, step, when, str(nth), *run]).returncode
            kinds.append((f"{when} {step}", nth, code))
        else:  # at a random moment of the run, start-up included
            start = time.perf_counter()
            code = killed_run([sys.executable, "-m", "berth", "-q", *run], rng.uniform(1.0, 0.95 * seconds))
            kinds.append(("time", round(time.perf_counter() - start, 1), code))
        # resume until the run is over (a kill before the first checkpoint leaves nothing to resume)
        resume = "train.resume=auto" if (out / "checkpoints").is_dir() else "train.resume="
        finished = subprocess.run([sys.executable, "-m", "berth", "-q", *run, resume], capture_output=True, text=True)
        assert finished.returncode == 0, (trial, kinds[-1], finished.stderr[-2000:])
        weights = load_file(str(out / "final" / "model.safetensors"))
        assert weights.keys() == reference.keys()
        for key in reference:
            assert torch.equal(weights[key], reference[key]), (trial, kinds[-1], key)
        assert not [p.name for p in out.rglob(".tmp-*")] and not [p.name for p in out.rglob(".old-*")]
    killed = [k for k in kinds if k[2] == -signal.SIGKILL]
    assert len(killed) >= TRIALS * 3 // 4, kinds  # most trials were really killed mid-run
    assert all(k[2] == -signal.SIGKILL for k in kinds if k[0] != "time"), kinds  # every save kill happened


@pytest.mark.slow
def test_a_sigkilled_fsdp2_launch_resumes_to_the_uninterrupted_weights(base, tmp_path):
    """Two processes under FSDP2, the launcher and both ranks killed with SIGKILL (each rank runs in its own
    session, so the whole process tree is killed) once the first checkpoint is in place; train.resume=auto then
    ends with the weights of the same launch run without a stop, bit for bit."""
    from conftest import kill_tree, launch_two_processes, start_two_processes

    _, args, _, _ = base
    config = "configs/accelerate/fsdp.yaml"
    common = [*args[1:], "train.batch_size=4", "train.save_every=2"]
    reference = tmp_path / "uninterrupted"
    done = launch_two_processes("pretrain", [*common, f"output_dir={reference}"], config)
    assert done.returncode == 0, done.stderr[-3000:]

    run = tmp_path / "killed"
    launcher = start_two_processes(
        "pretrain", [*common, f"output_dir={run}"], config, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    while not list((run / "checkpoints").glob("step-*")) and launcher.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint after 5 minutes"
        time.sleep(0.2)
    assert launcher.poll() is None, "the run ended before it could be killed"
    kill_tree(launcher.pid)
    assert not (run / "final").exists()
    resumed = launch_two_processes("pretrain", [*common, f"output_dir={run}", "train.resume=auto"], config)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stderr.count("resumed from") == 1
    expected = load_file(str(reference / "final" / "model.safetensors"))
    weights = load_file(str(run / "final" / "model.safetensors"))
    assert weights.keys() == expected.keys()
    for key in expected:
        assert torch.equal(weights[key], expected[key]), key
