import os

# Tests never touch the network: set the offline switches before datasets or transformers load.
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_var] = "1"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import random  # noqa: E402

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)


@pytest.fixture(autouse=True)
def _isolated_datasets_cache(tmp_path_factory, monkeypatch):
    # One cache per test session, away from the user's ~/.cache, so cache hits in one test cannot hide
    # a reader bug and runs leave nothing behind.
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf-datasets"))


@pytest.fixture(scope="session")
def zh_tokenizer_dir(tmp_path_factory):
    """The tokenizer of configs/tokenizer/zh.yaml, trained once per test session on the embedded corpus."""
    from berth.core.config import load_config
    from berth.tokenizer.config import TokenizerJobConfig
    from berth.tokenizer.train import train_tokenizer

    out = tmp_path_factory.mktemp("zh-tokenizer")
    cfg = load_config(TokenizerJobConfig, "configs/tokenizer/zh.yaml", [f"output_dir={out}"])
    summary = train_tokenizer(cfg, progress=False)
    return cfg, summary, out


HUB_TOKEN = "hf_berth_test_token_0123456789"


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """A loopback server standing in for the hub (HF_ENDPOINT points at it), online, with no token set."""
    import huggingface_hub.constants
    from fake_hub import FakeHub

    from berth.core.hub import OFFLINE_VARS

    for var in OFFLINE_VARS:
        monkeypatch.delenv(var, raising=False)
    # read from the environment when huggingface_hub was first imported (offline, above)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no login cache
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with FakeHub() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        yield server


def free_port() -> str:
    """A TCP port on loopback that nothing listens on now, for a launch's rendezvous."""
    import socket

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        return str(free.getsockname()[1])


def start_two_processes(
    command: str, args: list[str], config: str = "configs/accelerate/cpu_ddp_2proc.yaml", script: bool = False, **popen
):
    """`accelerate launch -m berth command args` (with `script`: `accelerate launch command args`, command a
    Python file) on two CPU processes through the shipped config (plain `--cpu --num_processes 2` would run
    one), started: the launcher's Popen."""
    import subprocess
    import sys

    argv = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        config,
        "--num_processes",
        "2",
        "--main_process_port",
        free_port(),
        *([command] if script else ["-m", "berth", command]),
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(argv, env=env, text=True, **popen)


def launch_two_processes(
    command: str, args: list[str], config: str = "configs/accelerate/cpu_ddp_2proc.yaml", script: bool = False
):
    """The same, run to its end (the launcher and its ranks killed after 10 minutes). Returns the finished
    process."""
    import subprocess

    launcher = start_two_processes(command, args, config, script, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        stdout, stderr = launcher.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        kill_tree(launcher.pid)
        raise
    return subprocess.CompletedProcess(launcher.args, launcher.returncode, stdout, stderr)


def kill_tree(pid: int) -> None:
    """SIGKILL a launcher and every process under it: torch's elastic agent starts each rank in its own session,
    so killing the launcher (or its process group) leaves the ranks running."""
    import contextlib

    import psutil

    try:
        parent = psutil.Process(pid)
        family = [*parent.children(recursive=True), parent]
    except psutil.NoSuchProcess:
        return
    for process in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(family, timeout=30)
