"""What every benchmark script shares, written once.

- timing: :func:`compile_timed` (trace + lower + XLA compile, timed on its own, with the
  compiled scratch memory), :func:`calls_per_batch` / :func:`timed_batch` (synchronised with
  ``jax.block_until_ready``; fast calls are batched), :func:`time_call` (median, and
  optionally the fastest and the process CPU time, of repeated batches after a warm-up),
  :func:`timed_call` (wall and process CPU time of one synchronised call), :func:`quartiles`;
- memory: :func:`peak_rss_mb`, :func:`temp_bytes` (``memory_analysis().temp_size_in_bytes``);
- the machine and versions: :func:`machine_info`, :func:`machine_md`;
- output: :func:`write_csv`, :func:`read_csv`, :func:`md_table`, :func:`log`;
- the benchmark/test MLP noise model: :func:`init_mlp` and :func:`mlp_eps_fn` (one definition
  for ``bench_gradient.py``, ``bench_sample.py``, ``problems.py`` and ``compare_versions.py``).

This module imports ``jadeis`` only inside :func:`machine_info`, so that
``compare_versions.py`` can put a chosen source tree on ``sys.path`` first.
"""

from __future__ import annotations

import csv
import math
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def log(*a):
    print(*a, flush=True)


# ----------------------------------------------------------------------------------------
# Timing


def compile_timed(fn, args):
    """``(compiled, seconds, temp_bytes)``: ``jax.jit(fn)`` traced, lowered and compiled for
    ``args``, the seconds that took, and XLA's scratch memory (-1 where the backend has no
    memory analysis)."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    seconds = time.perf_counter() - t0
    return compiled, seconds, temp_bytes(compiled)


def temp_bytes(compiled) -> int:
    """``temp_size_in_bytes`` of a compiled executable (-1 if not available)."""
    try:
        analysis = compiled.memory_analysis()
        return -1 if analysis is None else int(analysis.temp_size_in_bytes)
    except Exception:  # noqa: BLE001 - backend without memory analysis
        return -1


def calls_per_batch(fn, args, min_batch_s: float, max_calls: int | None = None) -> int:
    """After a warm-up call, the number of calls that makes one timed batch last
    ``min_batch_s`` (at least 1, at most ``max_calls``)."""
    jax.block_until_ready(fn(*args))  # warm-up
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    one = max(time.perf_counter() - t0, 1e-7)
    calls = max(1, math.ceil(min_batch_s / one))
    return calls if max_calls is None else min(calls, max_calls)


def timed_batch(fn, args, calls: int) -> float:
    """Seconds per call of ``calls`` back-to-back calls, synchronised once at the end."""
    t0 = time.perf_counter()
    for _ in range(calls):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / calls


def time_call(
    fn, args, reps: int, min_batch_s: float = 0.08, with_min: bool = False,
    with_cpu: bool = False,
):
    """Median seconds per call over ``reps`` batches, after a warm-up call; fast calls are
    batched (each batch runs >= ``min_batch_s``, at most 100 calls). With ``with_min``,
    also the fastest batch; with ``with_cpu``, also the median process CPU time per call
    over the same batches (every thread of the process: on a core shared with other
    processes it counts only this process's work, so it moves far less with their load
    than the wall time does)."""
    calls = calls_per_batch(fn, args, min_batch_s, max_calls=100)
    samples, cpu = [], []
    for _ in range(reps):
        c0 = time.process_time()
        samples.append(timed_batch(fn, args, calls))
        cpu.append((time.process_time() - c0) / calls)
    out = (statistics.median(samples),)
    if with_min:
        out += (min(samples),)
    if with_cpu:
        out += (statistics.median(cpu),)
    return out if len(out) > 1 else out[0]


def timed_call(fn, *args) -> tuple[float, float]:
    """``(wall, process CPU)`` seconds of one call synchronised with ``block_until_ready``."""
    c0, t0 = time.process_time(), time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0, time.process_time() - c0


def quartiles(samples: Sequence[float]) -> tuple[float, float, float]:
    """(q1, median, q3) of the samples (``statistics.quantiles``, exclusive method)."""
    if len(samples) < 2:
        v = float(samples[0])
        return v, v, v
    q1, _, q3 = statistics.quantiles(samples, n=4)
    return q1, statistics.median(samples), q3


# ----------------------------------------------------------------------------------------
# Memory


def peak_rss_mb() -> float:
    """Peak resident set size of this process (MiB; Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ----------------------------------------------------------------------------------------
# Machine and versions


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:  # noqa: BLE001 - optional dependency
        return None
    return getattr(mod, "__version__", "?")


def machine_info(t_start: float | None = None, **extra) -> dict:
    """The machine, the load and the versions of everything a benchmark depends on.

    Keys as in ``benchmarks/results/machine.json`` (``date_utc``, ``cpu``, ``cpu_count``,
    ``load_average_at_start``, ``platform``, ``python``, ``jax``, ``jaxlib``,
    ``jax_backend``, ``devices``, ``jadeis``, ``numpy``, and ``diffrax``/``equinox``/``optax``
    where installed), then ``extra``."""
    import jadeis  # noqa: PLC0415 - after a caller's sys.path set-up

    t = time.time() if t_start is None else t_start
    info = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": _version("jaxlib"),
        "jax_backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "jadeis": jadeis.__version__,
        "jadeis_path": str(Path(jadeis.__file__).resolve().parent),
        "numpy": np.__version__,
    }
    for name in ("diffrax", "equinox", "optax"):
        v = _version(name)
        if v is not None:
            info[name] = v
    info.update(extra)
    return info


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def machine_md(info: dict) -> str:
    """The machine information as a Markdown bullet list."""

    def fmt(v):
        return ", ".join(str(x) for x in v) if isinstance(v, (list, tuple)) else str(v)

    return "\n".join(f"- {k}: {fmt(v)}" for k, v in info.items())


# ----------------------------------------------------------------------------------------
# CSV and Markdown


def write_csv(path, rows: Sequence[dict], float_format: str | None = None) -> None:
    """Rows (dicts) to a CSV file; the columns are the union of the rows' keys, in order of
    first appearance. ``float_format`` (e.g. ``".6g"``) formats float cells. No rows: no
    file."""
    if not rows:
        return
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            if float_format is not None:
                r = {
                    k: (format(v, float_format) if isinstance(v, float) else v)
                    for k, v in r.items()
                }
            w.writerow(r)


def read_csv(path) -> list[dict]:
    """A CSV file as rows of int, float or str cells (missing file: no rows)."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    with open(path) as f:
        for r in csv.DictReader(f):
            row = {}
            for k, v in r.items():
                try:
                    row[k] = int(v)
                except ValueError:
                    try:
                        row[k] = float(v)
                    except ValueError:
                        row[k] = v
            out.append(row)
    return out


def md_table(header: Sequence[str], rows: Iterable[Sequence]) -> list[str]:
    """A Markdown table as a list of lines (cells are ``str()``-ed)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


# ----------------------------------------------------------------------------------------
# The benchmark/test MLP noise model


def init_mlp(key, sizes: Sequence[int], dtype=jnp.float32, freqs=None) -> dict:
    """Parameters ``{"layers": [(w, b), ...]}`` of dense layers ``sizes[i] -> sizes[i+1]``:
    w ~ N(0, 1/sizes[i]) (drawn in float32 from ``fold_in(key, i)``, then cast), b = 0.
    With ``freqs``, also ``"freqs"``: trainable frequencies of the time embedding."""
    layers = []
    for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:])):
        k = jax.random.fold_in(key, i)
        w = jax.random.normal(k, (m, n), jnp.float32) / np.sqrt(m)
        layers.append((w.astype(dtype), jnp.zeros((n,), dtype)))
    params = {"layers": layers}
    if freqs is not None:
        params["freqs"] = jnp.asarray(freqs).astype(dtype)
    return params


def mlp_eps_fn(time_map: Callable | None = None, freqs=None, raw_time: bool = False):
    """The noise model ``eps(params, x, t, z)`` of the benchmarks: dense layers with SiLU
    between them on ``[x, time features, z]`` (rows of ``x`` are samples).

    Time features of ``u = t`` (or ``u = time_map(t)`` in ``x``'s dtype):
    ``[u] (with raw_time) + sin(u freqs) + cos(u freqs)``, where ``freqs`` is the fixed
    argument or, when it is ``None``, ``params["freqs"]``. ``z`` (``None``: left out) is one
    vector for all rows or one per row."""

    def eps(params, x, t, z):
        u = t if time_map is None else time_map(t).astype(x.dtype)
        f = params["freqs"] if freqs is None else jnp.asarray(freqs, x.dtype)
        phase = u * f
        feats = [jnp.sin(phase), jnp.cos(phase)]
        if raw_time:
            feats.insert(0, jnp.reshape(u, (1,)))
        emb = jnp.concatenate(feats)
        batch = x.shape[0]
        parts = [x, jnp.broadcast_to(emb, (batch,) + emb.shape)]
        if z is not None:
            parts.append(jnp.broadcast_to(z, (batch,) + jnp.shape(z)[-1:]))
        h = jnp.concatenate(parts, axis=1)
        layers = params["layers"]
        for i, (w, b) in enumerate(layers):
            h = h @ w + b
            if i < len(layers) - 1:
                h = jax.nn.silu(h)
        return h

    return eps


# the default: time embedding sin/cos(t * params["freqs"]), no fixed frequencies
mlp_eps = mlp_eps_fn()


def time_embedding_freqs(emb: int, top: float, scale=1.0, dtype=jnp.float32):
    """``emb // 2`` log-spaced frequencies ``exp(linspace(0, top)) * scale``."""
    return (jnp.exp(jnp.linspace(0.0, top, emb // 2)) * scale).astype(dtype)


def import_path_first(src: str | os.PathLike | None) -> None:
    """Put a source tree (a folder holding ``jadeis/``) first on ``sys.path``."""
    if src is not None:
        sys.path.insert(0, str(Path(src).resolve()))
