"""Issue #46: the config reaches the data package through one door, `DataSpec.from_config`; below it every function
takes the frozen spec and plain arguments (read from the source, so a ConfigDict parameter added later is found)."""

from __future__ import annotations

import ast
import dataclasses
import os

import pytest

from alexnet_jax import default_config
from alexnet_jax.data import DataSpec

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "alexnet_jax", "data")
DOOR = ("spec.py", "DataSpec.from_config")


def config_takers(path: str) -> list[str]:
    """`Class.function` / `function` of the file at `path` that has a parameter annotated as a ConfigDict or named
    `config`."""
    with open(path) as f:
        tree = ast.parse(f.read())
    out = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                args = child.args.posonlyargs + child.args.args + child.args.kwonlyargs
                if any(a.arg == "config" or "ConfigDict" in ast.unparse(a.annotation or ast.Constant(""))
                       for a in args):
                    out.append(f"{prefix}{child.name}")
                visit(child, f"{prefix}{child.name}.")

    visit(tree, "")
    return out


def test_only_the_spec_reads_the_config():
    found = {(f, name) for f in sorted(os.listdir(DATA_DIR)) if f.endswith(".py")
             for name in config_takers(os.path.join(DATA_DIR, f))}
    assert found == {DOOR}


def test_the_checker_finds_a_config_parameter(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("class A:\n    def f(self, c: 'ml_collections.ConfigDict'): ...\ndef g(config): ...\n"
                    "def h(spec): ...\n")
    assert config_takers(str(path)) == ["A.f", "g"]


def test_the_spec_holds_the_configured_values_and_is_frozen():
    config = default_config.get_config()
    config.update(dict(dataset="folder", num_classes=0, rrc_area_range=[0.5, 1.0]))
    spec = DataSpec.from_config(config)
    config.num_classes = 7  # (what the trainer writes back after create_data: the spec does not see it)
    assert spec.num_classes == 0 and spec.rrc_area_range == (0.5, 1.0) and spec.is_photos
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.num_classes = 7  # type: ignore[misc]
