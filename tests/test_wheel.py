"""The installed artefact: a wheel puts exactly one import name into site-packages, and the shipped configs travel
inside it, so the documented commands run from any directory, away from the repository."""

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel built from this checkout, installed without dependencies into a fresh virtual environment that
    borrows the test environment's libraries (torch, transformers, ...) through a .pth file."""
    root = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", root / "dist", ROOT],
        check=True,
        capture_output=True,
    )
    (wheel,) = (root / "dist").glob("berth-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    # The test environment's libraries, but not its editable berth (whose finder is a .pth of its own).
    (site / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, wheel], check=True)
    return wheel, python, site


def run_elsewhere(python: Path, where: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [python, "-m", "berth", *args], cwd=where, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_the_wheel_holds_one_import_name_with_the_configs_inside(installed):
    wheel, _, site = installed
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"berth"}
    assert {"berth/configs/pretrain/mini_zh.yaml", "berth/pretrain/train.py", "berth/runtime/loop.py"} <= set(names)
    importable = [p.name for p in site.iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()]
    assert importable == ["berth"]


@pytest.mark.slow
def test_a_shipped_config_resolves_from_an_empty_directory(installed, tmp_path):
    _, python, site = installed
    result = run_elsewhere(python, tmp_path, "pretrain", "configs/pretrain/mini_zh.yaml", "--print-config")
    assert result.returncode == 0, result.stderr
    assert "architecture: modernbert" in result.stdout
    where = run_elsewhere(python, tmp_path, "--help")
    assert where.returncode == 0
    located = subprocess.run(
        [python, "-c", "import berth.pretrain.train as m; print(m.__file__)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert located.stdout.strip().startswith(str(site))  # the installed copy, not the checkout


@pytest.mark.slow
def test_the_quick_demo_runs_from_the_installed_wheel(installed, tmp_path):
    _, python, _ = installed
    result = run_elsewhere(python, tmp_path, "demo", "--quick", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "runs" / "demo-quick" / "report.md").is_file()
    assert (tmp_path / "runs" / "demo-quick" / "ner" / "final" / "model.safetensors").is_file()
