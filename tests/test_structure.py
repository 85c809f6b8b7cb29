"""The house rules of issue #12, read from the source: who may import whom, no cycles, no oversized modules.

Every `import` / `from ... import` of an `alexnet_jax` module counts, including those inside functions: an
import cycle hidden in a function is still a cycle.
"""

from __future__ import annotations

import ast
import os

import pytest

PACKAGE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "alexnet_jax")
MAX_LINES = 420  # "no module over ~400 lines"

# (importer prefix, forbidden prefixes): the dependencies point one way,
# entry points -> train -> model / data / sharding / checkpointing -> config.
RULES = [
    # the model may read sharding's placement table, not the compiled-HLO report
    ("alexnet_jax.model", ("alexnet_jax.data", "alexnet_jax.train", "alexnet_jax.checkpointing",
                           "alexnet_jax.collectives", "alexnet_jax.inference", "alexnet_jax.optim")),
    ("alexnet_jax.data", ("alexnet_jax.model", "alexnet_jax.train", "alexnet_jax.checkpointing",
                          "alexnet_jax.sharding", "alexnet_jax.collectives", "alexnet_jax.inference",
                          "alexnet_jax.optim")),
    ("alexnet_jax.checkpointing", ("alexnet_jax.train", "alexnet_jax.data", "alexnet_jax.model",
                                   "alexnet_jax.inference")),
    ("alexnet_jax.checkpoint_files", ("alexnet_jax.train", "alexnet_jax.data", "alexnet_jax.model",
                                      "alexnet_jax.inference", "alexnet_jax.checkpointing")),
    ("alexnet_jax.checkpoint_recovery", ("alexnet_jax.train", "alexnet_jax.data", "alexnet_jax.model",
                                         "alexnet_jax.inference", "alexnet_jax.checkpointing")),
    ("alexnet_jax.sharding", ("alexnet_jax.train", "alexnet_jax.data", "alexnet_jax.checkpointing",
                              "alexnet_jax.collectives", "alexnet_jax.inference")),
    ("alexnet_jax.preemption", ("alexnet_jax.train", "alexnet_jax.data", "alexnet_jax.model")),
    ("alexnet_jax.inference", ("alexnet_jax.train", "alexnet_jax.optim")),
    ("alexnet_jax.errors", ("alexnet_jax.",)),
    # the writer lock knows nothing of what is written: the workdir, the OS's lock, one-line errors
    ("alexnet_jax.workdir_lock", ("alexnet_jax.train", "alexnet_jax.data", "alexnet_jax.model",
                                  "alexnet_jax.checkpointing", "alexnet_jax.checkpoint_files", "alexnet_jax.sharding",
                                  "alexnet_jax.inference", "alexnet_jax.config")),
    ("alexnet_jax.train", ("alexnet_jax.main", "alexnet_jax.evaluate", "alexnet_jax.predict",
                           "alexnet_jax.convert", "alexnet_jax.figures", "alexnet_jax.collectives")),
]


def _modules() -> dict[str, str]:
    """Module name -> file path for every module of the package."""
    out = {}
    for root, _dirs, files in os.walk(PACKAGE_DIR):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                rel = os.path.relpath(path, os.path.dirname(PACKAGE_DIR))[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = path
    return out


def imports_of(name: str, path: str, known: set[str]) -> set[str]:
    """The package's modules `name` imports anywhere in its file (module level or inside functions)."""
    with open(path) as f:
        tree = ast.parse(f.read())
    package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known and "." in t:  # `import alexnet_jax.model.ops` -> that module
                t = t.rsplit(".", 1)[0]
            if t in known and t != name:
                found.add(t)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def _is(module: str, prefix: str) -> bool:
    return module == prefix.rstrip(".") or module.startswith(prefix if prefix.endswith(".") else prefix + ".")


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycles():
    graph = _graph()
    # a package's __init__ re-exporting its own modules is not a cycle of concerns: drop package -> own module
    graph = {m: {t for t in deps if not _is(t, m)} for m, deps in graph.items()}
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


@pytest.mark.parametrize("importer,forbidden", RULES, ids=[r[0] for r in RULES])
def test_dependencies_point_one_way(importer, forbidden):
    graph = _graph()
    bad = sorted(f"{m} imports {t}" for m, deps in graph.items() if _is(m, importer)
                 for t in deps if any(_is(t, f) for f in forbidden) and not _is(t, importer))
    assert not bad, "; ".join(bad)


def test_no_module_over_the_size_limit():
    sizes = {name: sum(1 for _ in open(path)) for name, path in _modules().items()}
    assert {n: s for n, s in sizes.items() if s > MAX_LINES} == {}


def test_the_checker_sees_function_level_imports_and_cycles(tmp_path):
    """The checker itself: a cycle through a function-level import is found."""
    pkg = tmp_path / "alexnet_jax"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from alexnet_jax import b\n")
    (pkg / "b.py").write_text("def f():\n    from alexnet_jax.a import x\n    return x\n")
    known = {"alexnet_jax", "alexnet_jax.a", "alexnet_jax.b"}
    graph = {m: imports_of(m, str(pkg / (m.split(".")[-1] + ".py")), known) for m in known - {"alexnet_jax"}}
    assert graph == {"alexnet_jax.a": {"alexnet_jax.b"}, "alexnet_jax.b": {"alexnet_jax.a"}}
    assert find_cycle(graph) == ["alexnet_jax.a", "alexnet_jax.b", "alexnet_jax.a"]


def private_uses(path: str, known: set[str]) -> list[str]:
    """`from alexnet_jax.x import _y` and `x._y` where `x` names one of the package's modules: a private name used
    from another module (dunders excepted)."""
    with open(path) as f:
        tree = ast.parse(f.read())
    modules: set[str] = set()  # local names bound to the package's modules
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("alexnet_jax"):
            for a in node.names:
                if a.name.startswith("_") and not a.name.startswith("__"):
                    out.append(f"from {node.module} import {a.name}")
                if f"{node.module}.{a.name}" in known:
                    modules.add(a.asname or a.name)
        elif isinstance(node, ast.Import):
            modules.update(a.asname or a.name for a in node.names if a.name.startswith("alexnet_jax"))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            out.append(f"{node.value.id}.{node.attr}")
    return out


def test_no_private_name_is_used_from_another_module():
    mods = _modules()
    bad = {name: private_uses(path, set(mods)) for name, path in mods.items()}
    assert {k: v for k, v in bad.items() if v} == {}


def test_the_private_name_check_finds_both_spellings(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("from alexnet_jax.data import imagenet\nfrom alexnet_jax.data.photos import _parser\n"
                    "def f():\n    return imagenet._guard\n")
    assert private_uses(str(path), {"alexnet_jax.data.imagenet", "alexnet_jax.data.photos"}) == [
        "from alexnet_jax.data.photos import _parser", "imagenet._guard"]


# The model reads as the paper's Figure 2 (issue #45): its forward pass fits one screen, and nothing in the model
# package carries state from one layer to the next behind the reader's back.
CALL_BUDGET = 40  # lines of `AlexNet.__call__`, signature and docstring included (flax's ResNet.__call__: 35)
MODEL_DIR = os.path.join(PACKAGE_DIR, "model")


def method_lines(path: str, cls: str, method: str) -> int:
    """Lines of `cls.method` in the file at `path` (its decorators excluded)."""
    with open(path) as f:
        tree = ast.parse(f.read())
    node = next(n for c in tree.body if isinstance(c, ast.ClassDef) and c.name == cls
                for n in c.body if isinstance(n, ast.FunctionDef) and n.name == method)
    return node.end_lineno - node.lineno + 1


def mutable_closures(path: str) -> list[str]:
    """`nonlocal` / `global` statements (a closure or function rebinding state outside itself) and functions defined
    inside `__call__` methods, in the file at `path`: where each is."""
    with open(path) as f:
        tree = ast.parse(f.read())
    out = [f"{os.path.basename(path)}:{n.lineno} {type(n).__name__.lower()} {', '.join(n.names)}"
           for n in ast.walk(tree) if isinstance(n, ast.Nonlocal | ast.Global)]
    for call in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "__call__"):
        out += [f"{os.path.basename(path)}:{n.lineno} def {n.name} inside __call__" for n in ast.walk(call)
                if n is not call and isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)]
    return out


def test_alexnet_forward_fits_its_line_budget():
    lines = method_lines(os.path.join(MODEL_DIR, "alexnet.py"), "AlexNet", "__call__")
    assert lines <= CALL_BUDGET, f"AlexNet.__call__ is {lines} lines; the budget is {CALL_BUDGET}"


def test_no_closure_in_the_model_holds_mutable_state():
    found = [line for f in sorted(os.listdir(MODEL_DIR)) if f.endswith(".py")
             for line in mutable_closures(os.path.join(MODEL_DIR, f))]
    assert found == []


def test_the_model_checks_find_what_they_guard(tmp_path):
    """The checks themselves, on the old forward's shape: a long `__call__` threading a spec through a closure."""
    body = "\n".join(f"        x = x + {i}" for i in range(45))
    path = tmp_path / "alexnet.py"
    path.write_text("class AlexNet:\n    @staticmethod\n    def __call__(x):\n        spec = 0\n\n"
                    "        def conv(y):\n            nonlocal spec\n            spec += 1\n            return y\n"
                    f"{body}\n        return conv(x)\n")
    assert method_lines(str(path), "AlexNet", "__call__") == 53 > CALL_BUDGET
    assert mutable_closures(str(path)) == ["alexnet.py:7 nonlocal spec", "alexnet.py:6 def conv inside __call__"]


# The code flows one way (issue #46): the config is read once, at the door, into each concern's frozen spec; no
# function below the doors takes the whole ConfigDict, none is over a screen, and config.py sits at the bottom.
MAX_FUNCTION_LINES = 60  # flax's ImageNet `train_and_evaluate` is ~100; a screen is ~60
LONG_FUNCTIONS_ALLOWED = {"alexnet_jax.default_config:get_config"}  # a table of every key and its default
# Modules run as commands (`python -m alexnet_jax.X`), the library's doors (a training run's
# `train.train_and_evaluate(config, ...)`; a checkpoint's `inference.load`, which reads its saved config into the
# same specs), the config's own module and the spec builders (`X.from_config`) read the config; nothing else does.
CONFIG_DOORS = {"alexnet_jax.train:train_and_evaluate", "alexnet_jax.inference:load"}
CONFIG_MODULES = {"alexnet_jax.config", "alexnet_jax.default_config"}
CONFIG_ALLOWED_IMPORTS = {"alexnet_jax.errors", "alexnet_jax.default_config"}


def _functions(tree: ast.AST):
    return (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef))


def is_command(tree: ast.Module) -> bool:
    """A module with an `if __name__ == "__main__":` block: run as `python -m ...`, a door of its own."""
    return any(isinstance(n, ast.If) and "__main__" in ast.unparse(n.test) for n in tree.body)


def config_takers(name: str, source: str) -> list[str]:
    """`module:function(arg)` for every parameter named `config` or annotated as a ConfigDict, outside the doors."""
    tree = ast.parse(source)
    if name in CONFIG_MODULES or is_command(tree):
        return []
    out = []
    for fn in _functions(tree):
        if fn.name == "from_config" or f"{name}:{fn.name}" in CONFIG_DOORS:
            continue
        a = fn.args
        for arg in [*a.posonlyargs, *a.args, *a.kwonlyargs]:
            hint = ast.unparse(arg.annotation) if arg.annotation is not None else ""
            if arg.arg == "config" or "ConfigDict" in hint:
                out.append(f"{name}:{fn.name}({arg.arg})")
    return out


def long_functions(name: str, source: str, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """`module:function N lines` for every function (method, nested function) longer than `limit` lines."""
    return [f"{name}:{fn.name} {fn.end_lineno - fn.lineno + 1} lines" for fn in _functions(ast.parse(source))
            if fn.end_lineno - fn.lineno + 1 > limit and f"{name}:{fn.name}" not in LONG_FUNCTIONS_ALLOWED]


def _sources() -> dict[str, str]:
    return {name: open(path).read() for name, path in _modules().items()}


def test_nothing_below_the_doors_takes_the_whole_config():
    found = [hit for name, source in sorted(_sources().items()) for hit in config_takers(name, source)]
    assert found == [], "read the config into a spec at the door (X.from_config) and pass that: " + ", ".join(found)


def test_no_function_is_over_a_screen():
    found = [hit for name, source in sorted(_sources().items()) for hit in long_functions(name, source)]
    assert found == [], f"split into named parts (<= {MAX_FUNCTION_LINES} lines): " + ", ".join(found)


def test_config_imports_nothing_above_it():
    mods = _modules()
    found = imports_of("alexnet_jax.config", mods["alexnet_jax.config"], set(mods))
    assert found <= CONFIG_ALLOWED_IMPORTS, f"config.py imports {sorted(found - CONFIG_ALLOWED_IMPORTS)}"


def test_the_flow_checks_find_what_they_guard(tmp_path):
    """Each of the three rules above, broken once: a leaf taking the config (by name and by annotation, and the
    doors that may), a 61-line function, and config.py importing the model."""
    leaf = ("import ml_collections\ndef strategy_of(config):\n    return config.sharding\n"
            "def groups(c: ml_collections.ConfigDict) -> int:\n    return c.groups\n"
            "class Spec:\n    @classmethod\n    def from_config(cls, config):\n        return cls()\n")
    assert config_takers("alexnet_jax.sharding", leaf) == ["alexnet_jax.sharding:strategy_of(config)",
                                                           "alexnet_jax.sharding:groups(c)"]
    assert config_takers("alexnet_jax.main", leaf + "if __name__ == '__main__':\n    pass\n") == []
    long = "def f():\n" + "\n".join(f"    x{i} = {i}" for i in range(59)) + "\n    return 0\n"
    assert long_functions("alexnet_jax.m", long) == ["alexnet_jax.m:f 61 lines"]
    assert long_functions("alexnet_jax.m", long.replace("    x0 = 0\n", "")) == []
    pkg = tmp_path / "alexnet_jax"
    pkg.mkdir()
    (pkg / "config.py").write_text("from alexnet_jax import default_config, model\nfrom alexnet_jax.errors import E\n")
    known = {"alexnet_jax.config", "alexnet_jax.default_config", "alexnet_jax.model", "alexnet_jax.errors"}
    found = imports_of("alexnet_jax.config", str(pkg / "config.py"), known)
    assert found - CONFIG_ALLOWED_IMPORTS == {"alexnet_jax.model"}
