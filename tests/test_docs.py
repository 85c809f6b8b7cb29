"""The commands the README and docs/ show work as written: each `python -m alexnet_jax.*` line parses (absl's
`--only_check_args`: its flags, its `--config` file and every `--config.key` override, without running), each
`python scripts/*.py` line names a script and only options its `--help` lists; `scripts/demo.sh` takes overrides
with or without a WORKDIR and says when Python is too old; `predict --output` writes one row per file."""

from __future__ import annotations

import csv
import glob
import json
import os
import re
import shlex
import subprocess

import forkserver
import numpy as np
import pytest
from conftest import FAST_COMPILE, REPO
from PIL import Image

DOCS = ["README.md", *sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))]
PROGRAM = re.compile(r"(?:^|\s)(?:\S*/)?python3?\s+(-m\s+alexnet_jax[\w.]*|scripts/\w+\.py)(\s|$)")


def shell_lines(text: str) -> list[str]:
    """The lines of the fenced bash/sh/untyped code blocks and of 4-space indented blocks, continuations
    joined, comments dropped."""
    lines, in_fence, fence_ok = [], False, False
    for line in text.splitlines():
        if line.startswith("```"):
            in_fence, fence_ok = (not in_fence), line.strip("`").strip() in ("", "bash", "sh", "shell", "console")
            continue
        if (in_fence and fence_ok) or (not in_fence and line.startswith("    ")):
            lines.append(line)
    joined, out = "", []
    for line in lines:
        if line.rstrip().endswith("\\"):
            joined += line.rstrip()[:-1] + " "
            continue
        out.append((joined + line).strip())
        joined = ""
    return out


def documented_commands() -> list[tuple[str, list[str]]]:
    """(where, argv from `python` on) of every documented alexnet_jax / scripts command."""
    found = []
    for path in DOCS:
        full = os.path.join(REPO, path)
        for line in shell_lines(open(full).read()):
            m = PROGRAM.search(line)
            if not m:
                continue
            command = line[m.start(1):]
            command = re.sub(r"\s#.*$", "", command)  # a trailing comment
            command = re.sub(r"\[([^\]]*)\]", r"\1", command)  # optional parts, shown as [--flag=...]
            command = command.split(" | ")[0].split(" && ")[0].split(" ; ")[0]
            command = re.sub(r"=([^\s|]+)(\|[^\s|]+)+", r"=\1", command)  # alternatives: raw|jpeg, 1|2|10
            if command.count('"') % 2:  # the end of a quoted --command="... python ..." (gcloud ssh)
                command = command[::-1].replace('"', "", 1)[::-1]
            command = re.sub(r"\$\{?\w+\}?", "1", command)  # shell variables ($i in a loop): a value
            command = re.sub(r"(--[\w.]+[= ])([A-Z])(?=\s|$)", r"\g<1>1", command)  # --step N, process_id=I
            try:
                argv = shlex.split(command)
            except ValueError:
                argv = command.split()
            found.append((f"{os.path.relpath(full, REPO)}: {line[:90]}", argv))
    return found


def _env() -> dict:
    return {**os.environ, "XLA_FLAGS": FAST_COMPILE, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}


def check_absl(python: str, argv: list[str]) -> str:
    """'' if the entry point parses argv (flags, config file, overrides), else why not."""
    module = argv[1]
    if not os.path.exists(os.path.join(REPO, *module.split("."))) and \
            not os.path.exists(os.path.join(REPO, *module.split(".")) + ".py"):
        return f"no module {module}"
    proc = forkserver.run([python, *argv, "--only_check_args"], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=120)
    if proc.returncode != 0:
        return " | ".join(proc.stderr.strip().splitlines()[-2:])[:400] or "(no message)"
    return ""


_SCRIPT_OPTIONS: dict[str, set[str]] = {}


def check_script(python: str, argv: list[str]) -> str:
    script = argv[0]
    if not os.path.isfile(os.path.join(REPO, script)):
        return f"no script {script}"
    if script not in _SCRIPT_OPTIONS:
        proc = forkserver.run([python, script, "--help"], cwd=REPO, env=_env(), capture_output=True, text=True,
                              timeout=120)
        _SCRIPT_OPTIONS[script] = set(re.findall(r"(--[\w-]+)", proc.stdout))
        if proc.returncode != 0 or not _SCRIPT_OPTIONS[script]:
            return f"{script} --help failed: {proc.stderr[-300:]}"
    unknown = [a.split("=")[0] for a in argv[1:] if a.startswith("--") and a.split("=")[0] not in
               _SCRIPT_OPTIONS[script]]
    return f"{script} has no option(s) {unknown}" if unknown else ""


def check(python: str, argv: list[str]) -> str:
    return check_absl(python, argv) if argv[0] == "-m" else check_script(python, argv)


def test_every_documented_command_parses(python):
    commands = documented_commands()
    assert len(commands) > 40 and {a[1] for _, a in commands if a[0] == "-m"} >= {
        "alexnet_jax.main", "alexnet_jax.evaluate", "alexnet_jax.predict", "alexnet_jax.data.prepare"}
    unique: dict[tuple[str, ...], str] = {}
    for where, argv in commands:  # each distinct command line once
        unique.setdefault(tuple(argv), where)
    failures = [f"{where}\n    -> {why}" for argv, where in unique.items() if (why := check(python, list(argv)))]
    assert not failures, "\n".join(failures)


def test_the_check_fails_on_a_made_up_flag(python):
    good = ["-m", "alexnet_jax.main", "--config", "configs/folder.py", "--config.folder=/photos", "--workdir", "w"]
    assert check(python, good) == ""
    assert "no_such_key" in check(python, [*good, "--config.no_such_key=1"])
    assert check(python, [*good[:-2], "--workdirr", "w"])
    assert check(python, ["-m", "alexnet_jax.nope", "--workdir", "w"]) == "no module alexnet_jax.nope"
    assert "--made-up" in check(python, ["scripts/make_photo_folder.py", "/tmp/p", "--made-up", "3"])
    assert check(python, ["scripts/make_photo_folder.py", "/tmp/p", "--per-class", "3"]) == ""
    lines = shell_lines("```bash\npython -m alexnet_jax.main --config c.py \\\n  --workdir w  # note\n```\n")
    assert [ln.split() for ln in lines] == [["python", "-m", "alexnet_jax.main", "--config", "c.py", "--workdir",
                                             "w", "#", "note"]]


def _demo_copy(tmp_path) -> str:
    """scripts/demo.sh in an empty checkout-like folder (no .venv there)."""
    os.makedirs(tmp_path / "repo" / "scripts")
    dst = str(tmp_path / "repo" / "scripts" / "demo.sh")
    with open(os.path.join(REPO, "scripts", "demo.sh")) as f, open(dst, "w") as g:
        g.write(f.read())
    os.chmod(dst, 0o755)
    return dst


def test_demo_takes_overrides_with_or_without_a_workdir(tmp_path):
    demo = _demo_copy(tmp_path)
    env = {**os.environ, "ALEXNET_DEMO_TRAIN_ONLY": "1"}
    out = subprocess.run([demo, "--config.num_epochs=1"], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["python", "-m", "alexnet_jax.main", "--config", "configs/fashion_mnist.py",
                                  "--workdir", "runs/fashion_mnist", "--config.num_epochs=1"]
    out = subprocess.run([demo, "/tmp/w", "--config.num_epochs=1"], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.split()[-3:] == ["--workdir", "/tmp/w", "--config.num_epochs=1"]
    old = tmp_path / "python3.9"
    old.write_text("#!/bin/sh\n[ \"$1\" = -V ] && echo 'Python 3.9.2' && exit 0\nexit 1\n")  # too old for -c
    old.chmod(0o755)
    proc = subprocess.run([demo], env={**os.environ, "PYTHON": str(old)}, capture_output=True, text=True)
    assert proc.returncode == 1 and not (tmp_path / "repo" / ".venv").exists()
    assert proc.stderr.strip() == (f"scripts/demo.sh: error: alexnet_jax needs Python >= 3.11; {old} is Python "
                                   "3.9.2. Install a newer Python and run PYTHON=python3.11 scripts/demo.sh")


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> str:
    """A workdir with a 1-step checkpoint of the small net on a generated folder of 2 classes."""
    from test_photos import _folder_config

    from alexnet_jax import train

    root = tmp_path_factory.mktemp("pred")
    for cls in ("ant", "bee"):
        os.makedirs(root / "photos" / cls)
        for k in range(8):
            Image.fromarray(np.full((40, 48, 3), 15 * k + (120 if cls == "bee" else 0), np.uint8)).save(
                root / "photos" / cls / f"{k}.png")
    config = _folder_config(str(root / "photos"), str(root / "tfds"), num_train_steps=1, batch_size=8,
                            eval_batch_size=8, eval_crops=1)
    train.train_and_evaluate(config, str(root / "run"))
    return str(root)


@pytest.mark.parametrize("ext", ["csv", "json"])
def test_predict_output_has_one_row_per_file_and_bad_files_with_their_reason(small_run, python, ext):
    root = small_run
    new = os.path.join(root, f"new_{ext}")
    os.makedirs(new)
    for k in range(3):
        Image.fromarray(np.full((30, 30, 3), 60 * k, np.uint8)).save(os.path.join(new, f"p{k}.jpg"))
    open(os.path.join(new, "broken.jpg"), "w").write("not a photo")
    out = os.path.join(root, f"preds.{ext}")
    proc = forkserver.run([python, "-m", "alexnet_jax.predict", "--workdir", os.path.join(root, "run"),
                           "--top_k", "2", "--output", out, new], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]  # a file could not be read
    assert f"wrote {out}: 3 image(s) classified, 1 unreadable" in proc.stdout
    files = sorted(os.path.join(new, f) for f in ("broken.jpg", "p0.jpg", "p1.jpg", "p2.jpg"))
    expected = _constant_image_top2(os.path.join(root, "run"), files[1:])
    if ext == "json":
        rows = json.load(open(out))
        assert [r["file"] for r in rows] == files
        assert rows[0]["top"] == [] and "not a readable image (not an image)" in rows[0]["error"]
        got = [[(t["class"], t["probability"]) for t in r["top"]] for r in rows[1:]]
        assert all(r["error"] is None for r in rows[1:])
    else:
        rows = list(csv.DictReader(open(out)))
        assert [r["file"] for r in rows] == files
        assert list(rows[0]) == ["file", "error", "class_1", "probability_1", "class_2", "probability_2"]
        assert "not a readable image" in rows[0]["error"] and rows[0]["class_1"] == ""
        got = [[(r[f"class_{k}"], float(r[f"probability_{k}"])) for k in (1, 2)] for r in rows[1:]]
        assert all(r["error"] == "" for r in rows[1:])
    for g, e in zip(got, expected, strict=True):  # the classes in the independent order, the probabilities equal
        assert [c for c, _ in g] == [c for c, _ in e], (got, expected)
        np.testing.assert_allclose([p for _, p in g], [p for _, p in e], atol=2e-5)


def _constant_image_top2(workdir: str, paths: list[str]) -> list[list[tuple[str, float]]]:
    """The top-2 of each one-colour photo computed without predict's preprocessing: any resize or crop of a
    one-colour image is that colour, so the network's input is the decoded colour normalised by the recorded
    channel mean and std, everywhere; softmax and ranking in NumPy float64."""
    from alexnet_jax import inference

    loaded = inference.load(workdir, mesh=inference.mesh_of_one_device(), inference=True)
    norm = loaded.normalisation
    assert norm.kind == "channel"
    x = []
    for path in paths:
        pixels = np.asarray(Image.open(path).convert("RGB"), np.float64)
        assert (pixels == pixels[0, 0]).all()  # a one-colour JPEG decodes to one colour
        x.append(np.broadcast_to((pixels[0, 0] - norm.mean) / norm.std, loaded.image_shape))
    logits = np.asarray(loaded.model.apply(loaded.variables, np.asarray(x, np.float32), train=False), np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    names = loaded.meta["class_names"]
    return [[(names[j], float(row[j])) for j in np.argsort(-row, kind="stable")[:2]] for row in p]


def test_predict_reads_images_before_jax_by_the_checkpoints_json_and_again_when_it_was_not_the_one(
        small_run, monkeypatch):
    """`classify` starts reading images by `checkpoint_files.peek_saved` (the JSON files, before JAX and orbax are
    imported); peek_saved reads what orbax reads. Each file is preprocessed once when the guess is orbax's answer,
    and the results are the same whether the guess was right, wrong (another normalisation: every early read is
    redone) or missing."""
    from alexnet_jax import checkpoint_files, predict

    workdir = os.path.join(small_run, "run")
    assert checkpoint_files.peek_saved(workdir) == checkpoint_files.read_saved(workdir)
    assert checkpoint_files.peek_saved(os.path.join(small_run, "nothing")) is None
    assert checkpoint_files.peek_saved(workdir, step=12345) is None
    files = sorted(glob.glob(os.path.join(small_run, "photos", "*", "*.png")))
    step, config, meta = checkpoint_files.read_saved(workdir)
    other = json.loads(json.dumps(meta))
    other["normalisation"]["mean"] = [m + 50.0 for m in other["normalisation"]["mean"]]
    calls = []
    preprocess = predict.preprocess
    monkeypatch.setattr(predict, "preprocess", lambda *a, **k: calls.append(a[2].mean.tolist()) or preprocess(*a, **k))
    outcomes = {}
    for name, guess in (("right", (step, config, meta)), ("wrong", (step, config, other)), ("none", None)):
        monkeypatch.setattr(checkpoint_files, "peek_saved", lambda *a, guess=guess: guess)
        calls.clear()
        outcomes[name] = [(r.path, r.top) for r in predict.classify(workdir, files, top_k=2)]
        if name == "right":
            assert len(calls) == len(files)
        if name == "wrong":
            assert len(calls) > len(files) and other["normalisation"]["mean"] in calls  # read early, then again
    assert outcomes["right"] == outcomes["wrong"] == outcomes["none"] and len(outcomes["right"]) == len(files)


def test_a_second_predict_compiles_nothing_and_batches_do_not_change_results(small_run, python, tmp_path):
    """`predict` keeps its compiled network in ~/.cache/alexnet_jax ($XDG_CACHE_HOME here): a second run finds it
    (JAX's 'cache hit' line); `--batch_size 3` on 5 files (the last batch padded) prints the same results."""
    new = os.path.join(small_run, "new_batches")
    os.makedirs(new)
    for k in range(5):
        Image.fromarray(np.full((30, 34, 3), 40 * k, np.uint8)).save(os.path.join(new, f"q{k}.png"))
    env = {k: v for k, v in _env().items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(XDG_CACHE_HOME=str(tmp_path / "xdg"), JAX_LOG_COMPILES="1")
    cmd = [python, "-m", "alexnet_jax.predict", "--workdir", os.path.join(small_run, "run"), new]
    # (the first two are real processes: JAX reads its cache settings when imported; the third, forked, need not be)
    runs = [forkserver.run(cmd + extra, cwd=REPO, env=run_env, capture_output=True, text=True, timeout=300)
            for extra, run_env in (([], env), ([], env), (["--batch_size", "3"], _env()))]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-2000:]
    assert "Persistent compilation cache hit" not in runs[0].stderr
    assert "Persistent compilation cache hit for 'jit_forward" in runs[1].stderr, runs[1].stderr[-2000:]
    assert os.listdir(tmp_path / "xdg" / "alexnet_jax" / "jax")
    assert runs[0].stdout == runs[1].stdout == runs[2].stdout and runs[0].stdout.count(".png") == 5


# --- The documents themselves: reference without history, links that resolve, one quick-start figure. ---

REFERENCE_DOCS = [os.path.relpath(os.path.join(REPO, p), REPO) for p in DOCS]  # DOCS, as repository paths
# Wording that belongs to a measurement's history, not to a reference (docs/notes/ holds the frozen history).
HISTORY_WORDS = re.compile(r"this round|later session|issue #|before this work|a previous session|earlier session|"
                           r"this session|the previous session|earlier round", re.I)


def history_lines(paths: list[str]) -> list[str]:
    """'file:line: text' of every line of `paths` (relative to the repository) with history wording."""
    found = []
    for path in paths:
        with open(os.path.join(REPO, path)) as f:
            found += [f"{path}:{n}: {line.strip()[:100]}" for n, line in enumerate(f, 1) if HISTORY_WORDS.search(line)]
    return found


def test_reference_docs_carry_no_history_wording():
    """README.md and docs/*.md are reference: no "this round", "a later session", "issue #N" (docs/notes/ is not
    scanned: it holds the frozen history)."""
    assert "docs/notes" not in " ".join(REFERENCE_DOCS) and "docs/reference.md" in REFERENCE_DOCS
    found = history_lines(REFERENCE_DOCS)
    assert not found, "history wording in the reference docs (move it to docs/notes/ or drop it):\n" + "\n".join(found)


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def relative_links(text: str) -> list[tuple[int, str]]:
    """(line, target) of every Markdown link or image outside code that is not a URL or an anchor."""
    found, in_fence = [], False
    for n, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):
            if not re.match(r"^([a-z][a-z0-9+.-]*:|#)", target, re.I):
                found.append((n, target))
    return found


def test_every_relative_link_resolves():
    """Every relative link of README.md and docs/**/*.md names a file or folder that exists (an anchor after `#`
    is not checked)."""
    paths = ["README.md", *sorted(os.path.relpath(p, REPO) for p in
                                  glob.glob(os.path.join(REPO, "docs", "**", "*.md"), recursive=True))]
    assert any(p.startswith(os.path.join("docs", "notes")) for p in paths)
    broken, count = [], 0
    for path in paths:
        with open(os.path.join(REPO, path)) as f:
            for n, target in relative_links(f.read()):
                count += 1
                file = target.split("#")[0]
                if not os.path.exists(os.path.normpath(os.path.join(REPO, os.path.dirname(path), file))):
                    broken.append(f"{path}:{n}: {target}")
    assert count > 50, count
    assert not broken, "links to files that do not exist:\n" + "\n".join(broken)
    assert relative_links("[a](b.md#x) ![i](f.png) [u](https://x.org) [h](#y) `[c](d)`\n```\n[e](f)\n```\n") == [
        (1, "b.md#x"), (1, "f.png")]


# The quick start's figures are quoted in three places, which must agree:
# - README.md's results table: the row naming `configs/fashion_mnist.py`, columns "top-1" (e.g. "91.67%") and
#   "training time" (e.g. "227 s" or "3.8 min");
# - configs/fashion_mnist.py's module docstring, first line: "... 91.67% top-1 in 227 s ..." (or "in 3.8 min");
# - notebooks/alexnet_colab.ipynb's first cell: the same form.
# Accuracies must be equal to the digit; times are equal within each quote's rounding (6.7 min is 399-405 s).
QUOTE = re.compile(r"(\d+(?:\.\d+)?)% top-1 in (\d+(?:\.\d+)?) ?(s|min)\b")


def seconds(value: str, unit: str) -> tuple[float, float]:
    """The interval of seconds that `value unit` (e.g. '6.7', 'min') rounds from."""
    half = 0.5 * 10.0 ** -(len(value.split(".")[1]) if "." in value else 0)
    scale = 60.0 if unit == "min" else 1.0
    return (float(value) - half) * scale, (float(value) + half) * scale


def readme_quick_start() -> tuple[str, str, str]:
    """(top-1, value, unit) of README.md's results-table row for configs/fashion_mnist.py."""
    lines = open(os.path.join(REPO, "README.md")).read().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("|") and "top-1" in line and "training time"
                  in line)
    cells = [c.strip() for c in lines[header].strip("|").split("|")]
    row = next(line for line in lines[header + 2:] if "`configs/fashion_mnist.py`" in line)
    values = [c.strip() for c in row.strip("|").split("|")]
    top1, time = values[cells.index("top-1")], values[cells.index("training time")]
    m_acc, m_time = re.fullmatch(r"(\d+(?:\.\d+)?)%", top1), re.fullmatch(r"(\d+(?:\.\d+)?) ?(s|min)", time)
    assert m_acc and m_time, f"README.md's quick-start row: top-1 {top1!r}, training time {time!r}"
    return m_acc.group(1), m_time.group(1), m_time.group(2)


def quoted_quick_start(text: str, where: str) -> tuple[str, str, str]:
    m = QUOTE.search(text)
    assert m, f"{where}: no '<acc>% top-1 in <N> s|min' quote"
    return m.group(1), m.group(2), m.group(3)


def quick_start_quotes() -> dict[str, tuple[str, str, str]]:
    import ast

    config = ast.get_docstring(ast.parse(open(os.path.join(REPO, "configs", "fashion_mnist.py")).read()))
    notebook = json.load(open(os.path.join(REPO, "notebooks", "alexnet_colab.ipynb")))
    first_cell = "".join(notebook["cells"][0]["source"])
    return {"README.md results table": readme_quick_start(),
            "configs/fashion_mnist.py docstring": quoted_quick_start(config.splitlines()[0] if config else "",
                                                                     "configs/fashion_mnist.py's first line"),
            "notebook's first cell": quoted_quick_start(first_cell, "notebooks/alexnet_colab.ipynb's first cell")}


def disagreements(quotes: dict[str, tuple[str, str, str]]) -> list[str]:
    """Why the quotes disagree: accuracies that differ, or times whose rounding intervals do not overlap."""
    out = []
    (first, (acc, value, unit)), *others = quotes.items()
    lo, hi = seconds(value, unit)
    for where, (a, v, u) in others:
        if a != acc:
            out.append(f"top-1: {first} says {acc}%, {where} {a}%")
        o_lo, o_hi = seconds(v, u)
        if o_hi < lo or o_lo > hi:
            out.append(f"time: {first} says {value} {unit}, {where} {v} {u}")
    return out


def test_quick_start_figures_agree_in_readme_config_and_notebook():
    quotes = quick_start_quotes()
    found = disagreements(quotes)
    assert not found, f"{found}: update all three together ({quotes})"
    assert disagreements({"a": ("91.41", "401", "s"), "b": ("91.41", "6.7", "min")}) == []
    assert disagreements({"a": ("91.41", "401", "s"), "b": ("91.41", "6.9", "min")}) == [
        "time: a says 401 s, b 6.9 min"]
    assert disagreements({"a": ("91.41", "401", "s"), "b": ("91.40", "401", "s")}) == [
        "top-1: a says 91.41%, b 91.40%"]
