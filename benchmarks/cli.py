"""``python -m benchmarks``: every method side by side in one run, each in its own process.

Examples:
    python -m benchmarks --preset cpu-issue2                  # issue 2's CPU shape
    python -m benchmarks --preset G1 --device cuda            # fused-linear, Llama-3-8B head
    python -m benchmarks --workload linear --P 2 --T 128 --H 256 --V 4096 --methods eager,spo_torch

Prints a table, writes ``<out-dir>/<name>.json`` (device, versions, shapes, every timing) and
``<name>.png``. Correctness comes first: each method's loss and gradients are compared with a float64
reference on the same inputs, and a method outside the SPEC 7 tolerances is marked WRONG.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import replace

import torch

from .workloads import PRESETS, Shape

DEFAULT_METHODS = {
    "linear": ["eager", "compile", "liger", "cce_exact", "cce", "spo"],
    "logits": ["eager", "compile", "spo"],
}
TOLERANCES = {  # SPEC 7: (loss rel, gradient rel-norm)
    "fp32": (1e-5, 1e-4), "fp64": (1e-5, 1e-4), "bf16": (1e-3, 2e-2), "fp16": (1e-3, 2e-2),
}


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("triton", "liger-kernel", "cut-cross-entropy", "transformers", "spo-kernels"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def _worker(args, env=None, timeout=1800):
    # A fixed glibc mmap threshold: large blocks are returned to the OS when freed, so the CPU peak
    # RSS tracks what a method holds (as CUDA's allocator statistics do) rather than what glibc's
    # adaptive threshold happened to keep in the heap. Same setting for every method.
    env = dict(os.environ if env is None else env, MALLOC_MMAP_THRESHOLD_="131072")
    cmd = [sys.executable, "-m", "benchmarks.worker"] + args
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return proc


def floors(shape: Shape, rates: dict) -> dict:
    """The two floors (METHOD.md) of one step at the rates measured in this run.

    linear: FLOPs ``8 Nc V H`` (policy: forward, recompute, dhidden, dW) ``+ 2 Nc V H`` (reference fwd).
    logits: bytes that must move: completion rows read in forward, read and written in backward, the
    other rows written once (the in-place gradient's zeros).
    """
    if not rates:
        return {}
    Nc, V = shape.completion_tokens, shape.V
    elt = {"bf16": 2, "fp16": 2, "fp32": 4}[shape.dtype]
    if shape.workload == "linear":
        flops = 10 * Nc * V * shape.H
        return {"flops": flops, "floor_s": flops / rates["matmul_flops"]}
    nbytes = (3 * Nc + (shape.N - Nc)) * V * elt
    return {"bytes": nbytes, "floor_s": nbytes / rates["copy_bytes_per_s"]}


def memory_lower_bound(shape: Shape) -> int:
    """linear: the gradients a fwd+bwd must return, dhidden ``[N, H]`` + dW ``[V, H]`` in the input dtype
    (issue 4's lower bound, without its O(N) term); logits: 0 (no bound reported)."""
    if shape.workload != "linear":
        return 0
    elt = {"bf16": 2, "fp16": 2, "fp32": 4}[shape.dtype]
    return (shape.N + shape.V) * shape.H * elt


def run_shape(shape: Shape, methods, device: str, repeats: int, log=print) -> dict:
    """Reference first, then each method in its own process; returns the result record."""
    with tempfile.TemporaryDirectory() as tmp:
        ref = os.path.join(tmp, "ref.pt")
        sj = json.dumps(shape.to_dict())
        log(f"[{shape.describe()}] float64 reference ...")
        proc = _worker(["--method", "float64", "--shape", sj, "--device", device, "--ref", ref])
        if proc.returncode != 0:
            raise RuntimeError(f"reference failed:\n{proc.stderr[-4000:]}")
        rates = {}
        if device == "cuda":
            rp = os.path.join(tmp, "rates.json")
            if _worker(["--method", "rates", "--shape", sj, "--device", device, "--ref", ref, "--out", rp]).returncode == 0:
                with open(rp) as f:
                    rates = json.load(f)
        results = []
        for m in methods:
            log(f"[{shape.describe()}] {m} ...")
            out = os.path.join(tmp, f"{m}.json")
            proc = _worker(["--method", m, "--shape", sj, "--device", device, "--ref", ref, "--out", out,
                            "--repeats", str(repeats)])
            if proc.returncode != 0:
                tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
                results.append({"method": m, "status": "error", "reason": tail[0][:300],
                                "stderr_tail": proc.stderr[-3000:]})
                continue
            with open(out) as f:
                results.append(json.load(f))
    loss_tol, grad_tol = TOLERANCES[shape.dtype]
    for r in results:
        if r["status"] == "ok":
            e = r["errors"]
            grad_err = max((v for k, v in e.items() if k != "loss"), default=0.0)
            r["max_grad_err"] = grad_err
            if not (e["loss"] <= loss_tol and grad_err <= grad_tol):
                r["status"] = "WRONG"
    base = next((r for r in results if r["method"] == "eager" and r["status"] in ("ok", "WRONG")), None)
    for r in results:
        if base is not None and "time_s_median" in r:
            r["time_vs_eager"] = r["time_s_median"] / base["time_s_median"]
            r["memory_vs_eager"] = r["peak_extra_bytes"] / max(base["peak_extra_bytes"], 1)
    fl = floors(shape, rates)
    bound = memory_lower_bound(shape)
    for r in results:
        if bound and "peak_extra_bytes" in r:
            r["memory_vs_bound"] = r["peak_extra_bytes"] / bound
    for r in results:
        if fl and "time_s_median" in r:
            r["time_vs_floor"] = r["time_s_median"] / fl["floor_s"]
    return {"shape": shape.to_dict(), "results": results, "tolerances": {"loss": loss_tol, "grad": grad_tol},
            "rates": rates, "floor": fl, "memory_lower_bound_bytes": bound}


def format_table(record: dict) -> str:
    rows = [("method", "time ms", "x eager", "x floor", "peak extra MB", "x eager", "x bound", "loss err", "grad err",
             "status")]
    for r in record["results"]:
        if "time_s_median" in r:
            rows.append((r["method"], f"{r['time_s_median'] * 1e3:.1f}", f"{r.get('time_vs_eager', float('nan')):.3f}",
                         f"{r['time_vs_floor']:.2f}" if "time_vs_floor" in r else "-",
                         f"{r['peak_extra_bytes'] / 2**20:.1f}", f"{r.get('memory_vs_eager', float('nan')):.3f}",
                         f"{r['memory_vs_bound']:.3f}" if "memory_vs_bound" in r else "-",
                         f"{r['errors']['loss']:.1e}", f"{r['max_grad_err']:.1e}", r["status"]))
        else:
            rows.append((r["method"], "-", "-", "-", "-", "-", "-", "-", "-", f"{r['status']}: {r.get('reason', '')[:60]}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot(records, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = len(records)
    fig, axes = plt.subplots(n, 2, figsize=(11, 2.2 + 0.45 * max(len(r["results"]) for r in records) * n),
                             squeeze=False)
    for i, rec in enumerate(records):
        ok = [r for r in rec["results"] if "time_s_median" in r]
        names = [r["method"] + ("" if r["status"] == "ok" else f" ({r['status']})") for r in ok]
        axes[i][0].barh(names, [r["time_s_median"] * 1e3 for r in ok], color="tab:blue")
        axes[i][0].set_xlabel("fwd+bwd time, ms (median)")
        axes[i][1].barh(names, [r["peak_extra_bytes"] / 2**20 for r in ok], color="tab:orange")
        axes[i][1].set_xlabel("peak extra memory, MiB")
        s = rec["shape"]
        axes[i][0].set_title(f"{s['workload']} P={s['P']} T={s['T']} H={s['H']} V={s['V']} {s['dtype']}", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS))
    ap.add_argument("--workload", choices=["linear", "logits"], default="linear")
    for k in ("P", "T", "H", "V"):
        ap.add_argument(f"--{k}", type=int)
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--methods", help="comma-separated; default: every method of the workload "
                                      "(eager, compile, liger, cce_exact, cce, spo[_torch|_cpu|_triton])")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--name", help="output file stem (default: preset or shape, and device)")
    args = ap.parse_args(argv)

    if args.preset:
        shapes = PRESETS[args.preset]
    else:
        shapes = [Shape(args.workload, P=args.P or 2, T=args.T or 128, H=args.H or 256, V=args.V or 4096)]
    overrides = {k: getattr(args, k) for k in ("P", "T", "H", "V", "dtype") if getattr(args, k) is not None}
    if args.preset and overrides:
        shapes = [replace(s, **overrides) for s in shapes]
    elif args.dtype:
        shapes = [replace(s, dtype=args.dtype) for s in shapes]

    records = []
    for shape in shapes:
        methods = args.methods.split(",") if args.methods else DEFAULT_METHODS[shape.workload]
        if args.device == "cpu" and not args.methods:
            methods = [m for m in methods if m not in ("compile", "cce", "cce_exact")]  # GPU peers
        records.append(run_shape(shape, methods, args.device, args.repeats, log=lambda m: print(m, file=sys.stderr)))

    device = _device_name(args.device)
    name = args.name or f"{args.preset or 'custom'}-{args.device}"
    os.makedirs(args.out_dir, exist_ok=True)
    report = {"device": device, "versions": _versions(), "repeats": args.repeats,
              "command": "python -m benchmarks " + " ".join(argv if argv is not None else sys.argv[1:]),
              "records": records}
    with open(os.path.join(args.out_dir, f"{name}.json"), "w") as f:
        json.dump(report, f, indent=1)
    plot(records, os.path.join(args.out_dir, f"{name}.png"), f"{name}: {device}")
    print(f"device: {device}")
    for rec in records:
        print(f"\n{Shape(**{k: v for k, v in rec['shape'].items() if k in Shape.__dataclass_fields__}).describe()}")
        print(format_table(rec))
    print(f"\nwrote {os.path.join(args.out_dir, name)}.json / .png")
    bad = [r["method"] for rec in records for r in rec["results"] if r["status"] in ("WRONG", "error")]
    return 1 if any(m.startswith("spo") for m in bad) else 0
