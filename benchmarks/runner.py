"""Runs methods side by side, each in its own process, and appends every result to a JSON-lines file.

Order: the ceilings (CUDA only: a bf16 matmul and a device copy), the float64 reference of every shape
(one process, cached on disk by shape), then one process per method over all shapes (a method
compiles once). A method that is still running when the run's time budget ends is killed and its
missing shapes are recorded as ``error``; methods that did not start are recorded as ``skipped``, so
the table always says what happened to each one. ``resume=True`` skips what the file already holds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Callable, List, Optional

from .methods import METHODS, unknown_method
from .worker import append_line, ref_path
from .workloads import Shape

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_lines(path: str) -> List[dict]:
    """The JSON lines of a results file; a torn last line (a killed writer) is skipped."""
    out = []
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def _worker(args, env, timeout):
    # A fixed glibc mmap threshold: large blocks are returned to the OS when freed, so the CPU peak
    # RSS tracks what a method holds (as CUDA's allocator statistics do) rather than what glibc's
    # adaptive threshold happened to keep in the heap. Same setting for every method.
    env = dict(env, MALLOC_MMAP_THRESHOLD_="131072")
    cmd = [sys.executable, "-m", "benchmarks.worker"] + args
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(1.0, timeout), env=env, cwd=ROOT,
                              start_new_session=True)
        return proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        return None, err + f"\n(killed after {timeout:.0f} s: the run's time budget)"


def _key(shape_dict: dict) -> str:
    return Shape.from_dict(shape_dict).key


def run(shapes: List[Shape], methods: List[str], device: str, jsonl: str, ref_dir: str, repeats: int = 5,
        tag: str = "", budget_s: Optional[float] = None, resume: bool = False, env: Optional[dict] = None,
        log: Callable[[str], None] = print) -> List[dict]:
    """Measure ``methods`` on ``shapes``; returns every line of ``jsonl`` afterwards."""
    t_start = time.monotonic()
    jsonl, ref_dir = os.path.abspath(jsonl), os.path.abspath(ref_dir)  # the workers run in the repository root
    env = dict(os.environ if env is None else env)
    os.makedirs(ref_dir, exist_ok=True)
    os.makedirs(os.path.dirname(os.path.abspath(jsonl)), exist_ok=True)
    if not resume and os.path.exists(jsonl):
        os.remove(jsonl)

    def left():
        return float("inf") if budget_s is None else budget_s - (time.monotonic() - t_start)

    def worker(args, timeout, budgeted=True):
        return _worker(args + ["--device", device, "--jsonl", jsonl, "--tag", tag], env,
                       min(timeout, left()) if budgeted else timeout)

    sj = json.dumps([s.to_dict() for s in shapes])
    if device == "cuda" and not any(r.get("kind") == "rates" for r in read_lines(jsonl)):
        log("ceilings: bf16 matmul and device copy ...")
        rc, err = worker(["--method", "rates"], 300)
        if rc != 0:
            log(f"  rates failed: {err.strip().splitlines()[-1:] or ''}")

    missing = [s for s in shapes if not os.path.exists(ref_path(ref_dir, s))]
    if missing:
        log(f"float64 reference of {len(missing)} shape(s) ...")
        rc, err = worker(["--method", "reference", "--shapes", json.dumps([s.to_dict() for s in missing]),
                          "--ref-dir", ref_dir], 1800, budgeted=False)  # nothing is checked without it
        if rc != 0:
            raise RuntimeError(f"the float64 reference failed:\n{err[-4000:]}")
    else:
        log("float64 reference: cached")

    def measured(m):  # this method's result lines, by shape
        return {_key(r["shape"]): r for r in read_lines(jsonl) if r.get("kind") == "result" and r["method"] == m}

    def not_measured(m, shape, status, reason, **more):
        rec = dict(kind="result", tag=tag, device=device, method=m, label=m, shape=shape.to_dict(), status=status,
                   reason=reason, **more)
        append_line(jsonl, rec)
        return rec

    for m in methods:
        todo = [s for s in shapes if s.key not in measured(m)]
        if not todo:
            log(f"{m}: already measured")
            continue
        if m not in METHODS:  # said without starting a worker
            for s in todo:
                log("  " + one_line(not_measured(m, s, "unavailable", unknown_method(m, s.workload))))
            continue
        if left() <= 5:
            for s in todo:
                not_measured(m, s, "skipped", "the run's time budget ran out")
            log(f"{m}: skipped (time budget)")
            continue
        log(f"{m} on {len(todo)} shape(s) ...")
        t0 = time.monotonic()
        rc, err = worker(["--method", m, "--shapes", json.dumps([s.to_dict() for s in todo]), "--ref-dir", ref_dir,
                          "--repeats", str(repeats)], 3600)
        got = measured(m)
        for s in todo:
            if s.key not in got:  # the worker died (or was killed) before writing this shape's line
                tail = [ln for ln in err.strip().splitlines() if ln.strip()][-1:] or ["(no output)"]
                got[s.key] = not_measured(m, s, "error", f"worker exited with {rc}: {tail[0][:300]}",
                                          stderr_tail=err[-3000:])
            log("  " + one_line(got[s.key]))
        log(f"  ({time.monotonic() - t0:.0f} s)")
    return read_lines(jsonl)


def one_line(r: dict) -> str:
    s = Shape.from_dict(r["shape"])
    head = f"{r.get('label', r['method']):16s} {s.workload} {s.dist:6s}"
    if "time_s_median" in r:
        return (f"{head} {r['status']:5s} {r['time_s_median'] * 1e3:9.2f} ms  {r['peak_extra_bytes'] / 2**20:9.1f} MiB  "
                f"loss err {r['errors']['loss']:.1e}  grad err {r['max_grad_err']:.1e}")
    return f"{head} {r['status']}: {r.get('reason', '')[:120]}"
