"""Every command the documentation tells users to paste runs: each `accelerate launch` and `berth` command in
README.md, docs/ and the comments of the shipped configs. A launch's config file is shipped and its `-m MODULE`
runs; a berth subcommand exists, its options parse, and its config with the command's overrides resolves
(`--print-config`, which refuses unknown keys and dead options)."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.commands.launch import launch_command_parser

from berth.app.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "configs").rglob("*.yaml"))]
STARTS = ("accelerate launch ", "berth ", "python -m berth ")
CONFIG_COMMANDS = {"prepare", "pretrain", "finetune", "tokenizer"}
# Words that stand for something the reader fills in: such a line is a pattern, not a command to paste.
PLACEHOLDERS = re.compile(r"\.\.\.|<[A-Za-z ]+>|\bCONFIG\b|\bN\b|OWNER/NAME")


def logical_lines(text: str) -> list[str]:
    """Lines with backslash continuations joined."""
    out, pending = [], ""
    for line in text.splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append(pending + line)
        pending = ""
    return out


def commands_in(path: Path) -> list[str]:
    """Command lines of a Markdown file (in code blocks, or inline code) or of a YAML file's comments."""
    text = path.read_text(encoding="utf-8")
    found = []
    if path.suffix == ".md":
        fenced = False
        for line in logical_lines(text):
            if line.lstrip().startswith("```"):
                fenced = not fenced
                continue
            candidates = [line.strip()] if fenced else re.findall(r"`([^`]+)`", line)
            for candidate in candidates:
                found += [part.strip() for part in candidate.split("|")]  # echo "..." | berth predict ...
    else:
        comments = [line.split("#", 1)[1] if "#" in line else "" for line in text.splitlines()]
        for comment in logical_lines("\n".join(comments)):
            if comment.startswith("   "):  # an example, indented under the comment's prose
                found.append(comment.strip())
    return [c for c in found if c.startswith(STARTS) and not PLACEHOLDERS.search(c)]


def collected() -> list[tuple[str, str]]:
    pairs = []
    for path in SOURCES:
        for command in commands_in(path):
            pairs.append((str(path.relative_to(ROOT)), command))
    return pairs


COMMANDS = collected()


def words_of(command: str) -> list[str]:
    """The command's words up to a redirection or a comment."""
    words = shlex.split(command, comments=True)
    cut = next((i for i, w in enumerate(words) if w in (">", "<", ">>", "&&", ";")), len(words))
    return words[:cut]


def check_berth(args: list[str], where: str) -> None:
    parser = build_parser()
    if all(re.fullmatch(r"-{0,2}[a-z][a-z-]*", a) for a in args):
        # a subcommand named in prose (`berth predict`, `berth prepare --dump`): it exists
        args = [*(a for a in args if not a.startswith("-")), "--help"]
    try:
        parsed, extra = parser.parse_known_args(args)  # an unknown subcommand or option exits here
    except SystemExit as stop:
        assert stop.code == 0, where  # --help
        return
    assert all("=" in x and not x.startswith("-") for x in extra), (where, extra)
    if parsed.command in CONFIG_COMMANDS:
        assert main([*args, "--print-config"]) == 0, where


def test_the_docs_hold_commands_of_every_kind():
    commands = [c for _, c in COMMANDS]
    assert sum(c.startswith("accelerate launch") for c in commands) >= 10
    for sub in ("tokenizer train", "prepare", "pretrain", "finetune", "predict", "push", "demo"):
        assert any(c.startswith(f"berth {sub}") for c in commands), sub
    assert any(where.startswith("configs/") for where, _ in COMMANDS)


@pytest.mark.parametrize(("where", "command"), COMMANDS, ids=[f"{w}: {c[:60]}" for w, c in COMMANDS])
def test_a_pasted_command_runs(where, command, capsys):
    words = words_of(command)
    if words[:2] == ["accelerate", "launch"]:
        launch = launch_command_parser().parse_args(words[2:])
        if launch.config_file:
            assert (ROOT / launch.config_file).is_file(), f"{where}: {launch.config_file} is not shipped"
        assert launch.module, f"{where}: berth runs as a module (-m berth): {command}"
        assert launch.training_script == "berth", f"{where}: -m {launch.training_script} is not berth's module"
        check_berth(launch.training_script_args, where)
    elif words[:3] == ["python", "-m", "berth"]:
        check_berth(words[3:], where)
    else:
        check_berth(words[1:], where)
    capsys.readouterr()


def test_the_module_a_launch_runs_is_importable_from_any_directory(tmp_path):
    """What `accelerate launch -m berth` runs: `python -m berth`, from a directory that is not the repository."""
    done = subprocess.run([sys.executable, "-m", "berth", "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0 and "pretrain" in done.stdout, done.stderr[-2000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine whose torch has no CUDA")
def test_gpu_check_stops_when_a_gpu_is_present_but_torch_cannot_use_it(tmp_path):
    """`bench/gpu_check.sh` on a GPU machine with the Makefile's CPU build of torch would otherwise run the CPU
    side and pass: a stand-in nvidia-smi that lists a GPU makes it stop, naming the install command."""
    fake = tmp_path / "nvidia-smi"
    fake.write_text('#!/bin/sh\necho "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)"\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "PY": sys.executable}
    done = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 3, done.stdout[-2000:] + done.stderr[-2000:]
    (line,) = done.stderr.strip().splitlines()
    assert "has no CUDA" in line and "pip install torch --index-url https://download.pytorch.org/whl/" in line
    assert "pytest" not in done.stdout  # nothing ran
