"""XLA flags added only where the running jaxlib knows them.

XLA reads XLA_FLAGS once, when its first backend starts, and an unknown flag there is fatal: LOG(FATAL)
("Unknown flag in XLA_FLAGS"), SIGABRT, before any Python code can react. Flags come and go between jaxlib
releases (`--xla_cpu_use_fusion_emitters` is gone from jaxlib 0.11; the YNNPACK flag the entry points set is
marked experimental). So every flag alexnet_jax or its tests add goes through `add`: it is asked of the running
jaxlib first, in a throwaway process that starts XLA's CPU backend with just those flags, once per jaxlib version
(the answers are cached in ~/.cache/alexnet_jax/xla_flags.json, or $XDG_CACHE_HOME/alexnet_jax), and a flag
jaxlib does not know is left out with one line saying what that costs. JAX has no public API that lists XLA's
flags, and XLA offers no way to make an unknown flag a warning: asking in another process is the only safe test.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from importlib import metadata

# Starts XLA's CPU backend, which parses XLA_FLAGS (and dies on an unknown flag, naming it).
_PROBE = "import jax; jax.devices('cpu')"
_UNKNOWN = re.compile(r"Unknown flags? in XLA_FLAGS:\s*(.*)")
PROBE_TIMEOUT_S = 180


def jaxlib_version() -> str:
    try:
        return metadata.version("jaxlib")
    except metadata.PackageNotFoundError:
        return ""


def _cache_path() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "alexnet_jax", "xla_flags.json")


def _read_cache() -> dict[str, dict[str, bool]]:
    try:
        with open(_cache_path()) as f:
            cache = json.load(f)
        return cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(version: str, answers: Mapping[str, bool]) -> None:
    """Merge `answers` into the cache file atomically (several processes may write it at once); an unwritable
    home only means asking again next time."""
    path = _cache_path()
    cache = _read_cache()
    cache[version] = {**cache.get(version, {}), **answers}
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(cache, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass


def _probe(flags: Sequence[str]) -> tuple[bool, set[str]]:
    """Start XLA's CPU backend with just `flags`: (whether it started, the flags it named as unknown)."""
    env = {**os.environ, "XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
    try:
        done = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
                              timeout=PROBE_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return False, set()
    named = {token for m in _UNKNOWN.finditer(done.stderr) for token in m.group(1).split()}
    return done.returncode == 0, {f for f in flags if f in named or f.split("=", 1)[0] in named}


def known(flags: Sequence[str]) -> dict[str, bool]:
    """For each 'name=value' in `flags`: does the running jaxlib accept it? Asked once per jaxlib version and flag
    (cached). A flag that could not be asked about (no jaxlib, the probe crashed) counts as unknown and is not
    cached: adding it could abort the process."""
    version = jaxlib_version()
    if not version:
        return dict.fromkeys(flags, False)
    cached = _read_cache().get(version, {})
    answers = {f: cached[f] for f in flags if f in cached}
    todo = [f for f in flags if f not in answers]
    while todo:
        started, unknown = _probe(todo)
        if started:
            answers.update(dict.fromkeys(todo, True))
            break
        if not unknown:  # it failed without naming a flag: ask about each alone
            if len(todo) == 1:
                return {**answers, todo[0]: False}  # not cached: the failure may have another cause
            alone = {f: known([f])[f] for f in todo}
            answers.update(alone)
            break
        answers.update(dict.fromkeys(unknown, False))
        todo = [f for f in todo if f not in unknown]
    _write_cache(version, {f: answers[f] for f in flags if f in answers})
    return {f: answers.get(f, False) for f in flags}


def set_flags(env_flags: str) -> dict[str, str]:
    """'--name=value' pairs of an XLA_FLAGS string, by name (a later one wins, as in XLA)."""
    out = {}
    for item in env_flags.split():
        name, _, value = item.partition("=")
        out[name] = value
    return out


def add(wanted: Mapping[str, str], costs: Mapping[str, str] | None = None, *, quiet: bool = False) -> list[str]:
    """Append `wanted` ({'--name': 'value'}) to XLA_FLAGS, each only where XLA_FLAGS does not set it already and
    the running jaxlib knows it; before JAX starts a backend. For a flag left out, one line on stderr naming it
    and what leaving it out costs (`costs[name]`). Returns the flags added."""
    present = set_flags(os.environ.get("XLA_FLAGS", ""))
    candidates = [f"{name}={value}" for name, value in wanted.items() if name not in present]
    if not candidates:
        return []
    answers = known(candidates)
    added = [f for f in candidates if answers[f]]
    for flag in candidates:
        if not answers[flag] and not quiet:
            name = flag.split("=", 1)[0]
            cost = (costs or {}).get(name, "")
            print(f"alexnet_jax: note: jaxlib {jaxlib_version() or '(not installed)'} does not know the XLA flag "
                  f"{flag}; running without it" + (f" ({cost})" if cost else ""), file=sys.stderr, flush=True)
    if added:
        os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *added]).strip()
    return added
