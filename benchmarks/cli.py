"""``python -m benchmarks``: every method side by side in one run, each in its own process.

Examples (from the repository root):
    python -m benchmarks --preset cpu-linear-v32k                     # fused-linear, V=32000, fp32, CPU
    python -m benchmarks --preset llama3-8b-linear --device cuda      # G1: the Llama-3-8B head, bf16
    python -m benchmarks --workload linear --P 2 --T 128 --H 256 --V 4096 --methods eager,spo_torch

Correctness comes first: each method's loss and gradients are compared with a float64 reference of the
same inputs, and a method outside SPEC 7's tolerances is marked WRONG; then its peak extra memory, then
the median time. Every method asked for gets a row, with the reason when it could not run.

Writes ``<out-dir>/<name>.jsonl`` (one line per measurement, written as it is measured),
``<name>.json`` (device, versions, command, tables), ``<name>.md`` and ``<name>.png``. The default
out-dir is ``runs/bench`` under the current directory and the default name carries the preset (or
shape), the device and the time, so runs never overwrite each other or the committed results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace

import torch

from . import report, runner
from .workloads import ALIASES, DISTS, PRESETS, Shape, preset

# Every method of a workload; the ones that cannot run here get a row that says why.
METHODS = {
    "linear": ["spo", "eager", "compile", "liger", "cce_exact", "cce", "trl", "flce", "flce_chunked"],
    "logits": ["spo", "eager", "compile"],
}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("triton", "liger-kernel", "cut-cross-entropy", "trl", "transformers", "spo-kernels"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def device_name(device: str) -> str:
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        return f"{p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB"
    return (f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, "
            f"torch threads {torch.get_num_threads()}")


def write_outputs(lines, out_dir: str, name: str, title: str, device: str, command: str, log=print) -> list:
    """Tables (stdout, markdown, JSON) and the plot from whatever lines exist; returns the tables."""
    ts = report.tables(lines)
    for t in ts:
        log(f"\n{t['shape'].describe()}")
        log(report.text_table(t))
        for desc, value, limit, verdict in report.goals(t):
            log(f"  goal: {desc}: {'-' if value is None else f'{value:.3f}'} ({verdict})")
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(report.markdown(ts, title, device, command))
    serial = [dict(t, shape=t["shape"].to_dict()) for t in ts]
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump({"device": device, "versions": versions(), "command": command, "tables": serial}, f, indent=1)
    png = os.path.join(out_dir, f"{name}.png")
    if os.path.exists(png):
        os.remove(png)  # a plot from an earlier run of the same name would no longer match the tables
    try:
        report.plot(ts, png, f"{title}: {device}")
    except ImportError as e:  # matplotlib is optional (the bench extra): the tables above are the results
        log(f"(plot skipped: matplotlib is not installed ({e}); pip install matplotlib, or \"spo-kernels[bench]\")")
    return ts


def claim_default_name(out_dir: str, stem: str) -> str:
    """``{stem}-{YYYYmmdd-HHMMSS}``, with ``-2``, ``-3``, ... when a run of the same second has it: the name's
    JSON-lines file is created here exclusively, so two runs, even concurrent ones, never share a name."""
    base = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    for n in range(1, 10_000):
        name = base if n == 1 else f"{base}-{n}"
        try:
            os.close(os.open(os.path.join(out_dir, f"{name}.jsonl"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return name
        except FileExistsError:
            continue
    raise RuntimeError(f"no free output name for {base} in {out_dir}")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", help=f"one of {', '.join(sorted(PRESETS))} (aliases: "
                                     f"{', '.join(f'{a}={b}' for a, b in ALIASES.items())})")
    ap.add_argument("--workload", choices=["linear", "logits"], default="linear")
    for k in ("P", "T", "H", "V"):
        ap.add_argument(f"--{k}", type=int)
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--dist", choices=DISTS, help="input distribution (default: the preset's, else random)")
    ap.add_argument("--methods", help="comma-separated (default: every method of the workload: "
                                      + "; ".join(f"{w}: {','.join(m)}" for w, m in METHODS.items())
                                      + "); spo_torch / spo_cpu / spo_triton pick a backend")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out-dir", default=os.path.join("runs", "bench"))
    ap.add_argument("--name", help="output file stem (default: preset or shape, device and time)")
    args = ap.parse_args(argv)

    if args.preset:
        shapes = preset(args.preset)
    else:
        shapes = [Shape(args.workload, P=args.P or 2, T=args.T or 128, H=args.H or 256, V=args.V or 4096)]
    overrides = {k: getattr(args, k) for k in ("P", "T", "H", "V", "dtype", "dist") if getattr(args, k) is not None}
    if overrides:
        shapes = list(dict.fromkeys(replace(s, **overrides) for s in shapes))
    methods = args.methods.split(",") if args.methods else None  # None: each workload's own list

    os.makedirs(args.out_dir, exist_ok=True)
    name = args.name or claim_default_name(args.out_dir, f"{args.preset or shapes[0].key}-{args.device}")
    jsonl = os.path.join(args.out_dir, f"{name}.jsonl")
    if args.name and os.path.exists(jsonl):
        os.remove(jsonl)  # an explicit --name that exists: this run replaces it
    ref_dir = os.path.join(args.out_dir, f".ref-{name}")
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    lines = []
    try:
        # Shapes that run the same methods share the workers (a method list may not fit both workloads: by
        # default each workload runs its own).
        groups = {}
        for s in shapes:
            groups.setdefault(tuple(methods or METHODS[s.workload]), []).append(s)
        for ms, group in groups.items():
            lines = runner.run(group, list(ms), args.device, jsonl, ref_dir, args.repeats, tag=name, resume=True,
                               log=log)
    finally:
        import shutil
        shutil.rmtree(ref_dir, ignore_errors=True)
    device = device_name(args.device)
    command = "python -m benchmarks " + " ".join(argv)
    write_outputs(lines, args.out_dir, name, name, device, command, log=print)
    stem = os.path.join(args.out_dir, name)
    print(f"\ndevice: {device}\nwrote {stem}.jsonl / .json / .md" + (" / .png" if os.path.exists(stem + ".png") else ""))
    bad = [r["method"] for r in lines if r.get("kind") == "result" and r["status"] in ("WRONG", "error")]
    return 1 if any(m.startswith("spo") for m in bad) else 0
