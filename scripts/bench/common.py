"""What every mode shares: the repository, loading scripts and configs, timing, the load check and recording.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# XLA_FLAGS as the user's shell has them, before the harness adds the entry points' flags for its own process
# (`cli.set_xla_cpu_flags`): the whole commands it times (`--mode predict`) start from these, as a user's do.
USER_XLA_FLAGS = os.environ.get("XLA_FLAGS")


def load_script(name: str, folder: str = "scripts"):
    """The module `REPO/folder/name.py`, loaded by path (scripts/ and tests/ are not packages)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, folder, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timed(fn, warmup_fn=None) -> dict[str, float]:
    if warmup_fn:
        warmup_fn()
    w0, c0 = time.perf_counter(), time.process_time()
    n = fn()
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    return {"images": n, "wall_s": wall, "cpu_s": cpu, "images_per_s": n / wall, "images_per_cpu_s": n / cpu}


def load_config(config_path: str, batch: int, overrides: list[str]):
    """`config_path` with `--set key=value` overrides, parsed by the project's own command line (`cli`), at
    `batch`."""
    from alexnet_jax import cli
    from alexnet_jax.errors import UserError

    try:
        config = cli.load_config(os.path.join(REPO, config_path), overrides)
    except UserError as e:
        raise SystemExit(f"error: --set: {e}") from None
    config.batch_size = batch
    return config


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def cost_flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


RESULTS_BEGIN, RESULTS_END = "<!-- results:begin -->", "<!-- results:end -->"


def results_row(out: dict, argv: list[str]) -> str:
    """One markdown row: date, command, load at start/end, JAX and torch ms per step, the ratio."""
    ts = out["train_step"]
    args = " ".join(x for x in argv if x != "--record")
    torch_ms = f"{ts['torch_ms_per_step']:.0f}" if "torch_ms_per_step" in ts else "-"
    ratio = f"**{ts['jax_over_torch']:.2f}**" if "jax_over_torch" in ts else "-"
    return (f"| {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} | `{args}` | {out['load_avg_start']:.2f} / "
            f"{out['load_avg_end']:.2f} | {ts['ms_per_step']:.0f} | {torch_ms} | {ratio} |")


def is_quiet(out: dict) -> bool:
    """Neither load average (start, end) above the core count."""
    return max(out["load_avg_start"], out["load_avg_end"]) <= (out["cpu_count"] or 1)


def record(out: dict, argv: list[str], path: str) -> bool:
    """Append the result to `path`'s results table, unless the machine was busy (then say so and keep the file)."""
    row = results_row(out, argv)
    if not is_quiet(out):
        print(f"warning: not recorded in {path}: load average above the {out['cpu_count']} cores\n{row}",
              file=sys.stderr)
        return False
    record_row(path, row)
    print(f"recorded in {path}:\n{row}", file=sys.stderr)
    return True


def record_row(path: str, row: str) -> None:
    """Append `row` to the table between the results markers of `path` (the table's header stays first)."""
    with open(path) as f:
        text = f.read()
    if RESULTS_BEGIN not in text or RESULTS_END not in text:
        raise SystemExit(f"error: {path} has no {RESULTS_BEGIN} ... {RESULTS_END} section to record into")
    head, rest = text.split(RESULTS_BEGIN, 1)
    table, tail = rest.split(RESULTS_END, 1)
    with open(path, "w") as f:
        f.write(head + RESULTS_BEGIN + table.rstrip("\n") + "\n" + row + "\n" + RESULTS_END + tail)
