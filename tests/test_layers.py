"""The package's shape: one import name, and imports that run one way (foundations < corpora < runtime < stages < app).

Read from the source with `ast`, so the test fails on an import that has not run yet: a new module that reaches up
a layer or into another stage fails here first.
"""

import ast
import importlib.util
from pathlib import Path

import pytest

import berth

# Where each layer's modules live, as (import-name prefix, layer). The longest prefix wins.
LAYERS = {
    "berth": 0,  # berth/__init__.py: the version and BerthError
    "berth.core": 0,
    "berth.configs": 0,
    "berth.corpora": 1,
    "berth.runtime": 2,
    "berth.tokenizer": 3,
    "berth.pretrain": 3,
    "berth.finetune": 3,
    "berth.app": 4,
    "berth.__main__": 4,
}
STAGES = ("berth.tokenizer", "berth.pretrain", "berth.finetune")
# The command line imports each stage inside its command, on purpose: the stages load datasets and transformers,
# which read the offline switches at import time (see berth.app.cli's docstring).
LAZY_ALLOWED = {"berth.app.cli"}


def package_of(module: str) -> str:
    return max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)


def berth_modules() -> dict[str, Path]:
    """Every module of the package, by import name, wherever its folder sits in the repository."""
    found = {}
    for package in LAYERS:
        spec = importlib.util.find_spec(package)
        if spec is None or spec.submodule_search_locations is None:
            continue
        for root in spec.submodule_search_locations:
            for path in Path(root).rglob("*.py"):
                parts = path.relative_to(root).with_suffix("").parts
                name = ".".join((package, *parts)).removesuffix(".__init__")
                if package_of(name) == package:
                    found[name] = path
    return found


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) for every berth import in the file."""
    tree = ast.parse(path.read_text(), str(path))
    top = set(map(id, tree.body))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            if name == "berth" or name.startswith("berth."):
                out.append((name, node.lineno, id(node) in top))
    return out


MODULES = berth_modules()


def test_every_module_is_found_under_the_one_import_name():
    # the stage folders at the top of the repository are mapped into berth (pyproject's package-dir)
    assert {"berth.app.cli", "berth.runtime.loop", "berth.pretrain.train", "berth.finetune.train"} <= set(MODULES)
    assert MODULES["berth.pretrain.train"].parent.name == "pretrain"
    assert Path(berth.__file__).parent.name == "berth"
    assert importlib.util.find_spec("runtime") is None and importlib.util.find_spec("corpora") is None


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_run_one_way(module):
    here = package_of(module)
    wrong: list[str] = []
    for target, line, top_level in imports(MODULES[module]):
        there = package_of(target)
        if LAYERS[there] > LAYERS[here]:
            wrong.append(f"line {line}: {there} is a higher layer")
        elif LAYERS[there] == 3 == LAYERS[here] and there != here:
            wrong.append(f"line {line}: {there} is another stage; move what both need below them")
        elif not top_level and module not in LAZY_ALLOWED:
            wrong.append(f"line {line}: {target} imported inside a function")
    assert not wrong, f"{module}: " + "; ".join(dict.fromkeys(wrong))


def test_the_layer_check_catches_an_upward_and_a_sideways_import(tmp_path):
    upward = tmp_path / "up.py"
    upward.write_text("from berth.app.cli import main\n\ndef f():\n    from berth.core.config import load_config\n")
    assert [(t, top) for t, _, top in imports(upward)] == [
        ("berth.app.cli", True),
        ("berth.app.cli.main", True),
        ("berth.core.config", False),
        ("berth.core.config.load_config", False),
    ]
    assert LAYERS[package_of("berth.app.cli")] > LAYERS[package_of("berth.runtime.loop")]
    assert package_of("berth.finetune.export") != package_of("berth.pretrain.export")
