"""The GPU harness, one step per command, each sized to finish in under 8 minutes on a fresh H100:

    python3 -m benchmarks.gpu tests [--part logits|linear|all]  # the GPU tests (pytest -m gpu)
    python3 -m benchmarks.gpu g2                                # logits path, G2 shape, every method
    python3 -m benchmarks.gpu g1                                # fused-linear, G1 shape, every peer
    python3 -m benchmarks.gpu tune                              # tile / warp / stage sweep -> tuned_configs.json
    python3 -m benchmarks.gpu e2e                               # full DPO step on a Qwen2.5-0.5B shape: spo, trl, eager
    python3 -m benchmarks.gpu report                            # tables and plots from what finished

Run from the repository root with the image's python3 (torch 2.11, triton 3.6): the package is imported
from the working tree, nothing is built. Peer wheels (trl, liger-kernel, cut-cross-entropy; see
``benchmarks/gpu/fetch_wheels.sh``) are installed from ``.whl/`` into a private folder when present; a
peer that is missing gets a row saying so.

Every step writes into ``--out-dir`` (default ``$OUT`` when set, else ``runs/gpu``), at most 8 files:
its log (everything it printed, tee'd), a JSON-lines file with one line per measurement appended the
moment it is measured, and the tables/plots drawn from whatever finished. A killed step keeps every
finished line; ``--resume`` continues it, skipping what is there; ``report`` redraws the tables.
Steps stop starting new methods when ``--budget-s`` (default 450 s) is spent and say so in the table.

``--dry-run`` runs the same code on the CPU at tiny shapes (Triton through the interpreter): input
drawing, the float64 reference, the correctness gate, result writing and every peer adapter that runs
on a CPU (``compile`` through torch.compile's ``aot_eager`` backend: inductor would build C++ on a CPU, not
the Triton code a GPU run measures). CI runs each step's dry run (tests/test_gpu_harness.py).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time
from dataclasses import replace

from .. import runner
from ..workloads import Shape, preset

ROOT = runner.ROOT
PEERS_DIR = "/tmp/spo-kernels-peers"

# Ours first, then the peers in order of interest: a step cut by its budget still has the key rows.
STEP_METHODS = {
    "g1": ["spo_triton", "cce_exact", "trl", "eager", "liger", "cce", "compile", "flce", "flce_chunked"],
    "g2": ["spo_triton", "eager", "compile"],
}
STEP_NAMES = {"g1": "G1", "g2": "G2"}
DRY_SHAPES = {  # odd sizes: every mask of the kernels runs
    "g1": [Shape("linear", P=1, T=16, H=40, V=97, dtype="bf16"),
           Shape("linear", P=1, T=16, H=40, V=97, dtype="bf16", dist="peaked")],
    "g2": [Shape("logits", P=1, T=16, V=97, dtype="bf16"),
           Shape("logits", P=1, T=16, V=97, dtype="bf16", dist="peaked")],
}


class Tee:
    """Print to stdout and append to the step's log file (flushed per line: survives a kill)."""

    def __init__(self, path: str):
        self.f = open(path, "a", buffering=1)

    def __call__(self, msg: str = "") -> None:
        print(msg, flush=True)
        self.f.write(msg + "\n")
        self.f.flush()


def _env(dry_run: bool, log) -> dict:
    env = dict(os.environ)
    paths = [ROOT]
    if dry_run:
        env["TRITON_INTERPRET"] = "1"
        env.setdefault("CUDA_VISIBLE_DEVICES", "")
        env.setdefault("SPO_BENCH_COMPILE_BACKEND", "aot_eager")  # benchmarks/methods.py says why
    else:
        env.pop("TRITON_INTERPRET", None)
        wheels = sorted(glob.glob(os.path.join(ROOT, ".whl", "*.whl")))
        marker = os.path.join(PEERS_DIR, ".installed")
        if wheels and not os.path.exists(marker):
            log(f"installing {len(wheels)} peer wheels from .whl/ into {PEERS_DIR} ...")
            proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                   "--no-compile", "--no-cache-dir", "--upgrade", "--target", PEERS_DIR] + wheels,
                                  capture_output=True, text=True)
            if proc.returncode == 0:
                open(marker, "w").close()
            else:
                log(f"  peer wheels failed to install (their rows will say 'not installed'):\n{proc.stderr[-2000:]}")
        if os.path.exists(marker):
            paths.append(PEERS_DIR)
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def _environment_record(device: str) -> dict:
    from ..cli import device_name, versions
    rec = {"time": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": device_name(device), "versions": versions()}
    if device == "cuda":
        try:
            rec["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm", "--format=csv"],
                capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as e:
            rec["nvidia_smi"] = f"unavailable: {e}"
    return rec


def step_bench(step: str, args, log) -> int:
    device = "cpu" if args.dry_run else "cuda"
    name = STEP_NAMES[step] + ("-dry" if args.dry_run else "")
    shapes = DRY_SHAPES[step] if args.dry_run else preset(STEP_NAMES[step])
    methods = args.methods.split(",") if args.methods else STEP_METHODS[step]
    env = _env(args.dry_run, log)
    if not args.dry_run:
        import torch
        if not torch.cuda.is_available():
            log("no CUDA device: use --dry-run on a CPU")
            return 2
    envrec = _environment_record(device)
    log(f"{name}: {envrec['device']}; {json.dumps(envrec['versions'])}")
    jsonl = os.path.join(args.out_dir, f"{name}.jsonl")
    if not args.resume and os.path.exists(jsonl):
        os.remove(jsonl)
    runner.append_line(jsonl, dict(kind="environment", tag=name, **envrec))
    ref_dir = os.path.join(args.ref_dir or os.path.join(ROOT, "runs", "gpu-ref"), name)
    try:
        runner.run(shapes, methods, device, jsonl, ref_dir, repeats=args.repeats or (3 if args.dry_run else 10),
                   tag=name, budget_s=args.budget_s - (time.monotonic() - T0), resume=True, env=env, log=log)
    finally:
        write_report(name, args.out_dir, log)
    return 0


def write_report(name: str, out_dir: str, log) -> None:
    from ..cli import write_outputs
    jsonl = os.path.join(out_dir, f"{name}.jsonl")
    lines = runner.read_lines(jsonl)
    env = next((r for r in lines if r.get("kind") == "environment"), {})
    write_outputs(lines, out_dir, name, f"{name} ({'dry run, CPU' if name.endswith('-dry') else 'GPU'})",
                  env.get("device", ""), f"python3 -m benchmarks.gpu {name.split('-')[0].lower()}", log=log)
    log(f"wrote {os.path.join(out_dir, name)}.jsonl / .md / .json / .png")


def step_tests(args, log) -> int:
    parts = {"logits": ["tests/test_gpu_logits.py"], "linear": ["tests/test_gpu_linear.py"]}
    files = parts["logits"] + parts["linear"] if args.part == "all" else parts[args.part]
    env = _env(args.dry_run, log)
    stem = f"gpu-tests-{args.part}" + ("-dry" if args.dry_run else "")
    log_path = os.path.join(args.out_dir, f"{stem}.log")
    if args.dry_run:
        # On a CPU the GPU tests skip; their own dry runs exercise the same checks in the interpreter.
        cmds = [[sys.executable, "-m", "pytest", "-q", "--collect-only", "-m", "gpu"] + files]
        for f in files:
            mod = os.path.splitext(os.path.basename(f))[0]
            cmds.append([sys.executable, "-c", f"import sys; sys.path[:0] = ['tests']; import {mod} as t; t._dry_run()"])
    else:
        cmds = [[sys.executable, "-m", "pytest", "-q", "-rP", "-m", "gpu", "-p", "no:cacheprovider",
                 f"--junitxml={os.path.join(args.out_dir, stem + '.xml')}"] + files]
    rc_all = 0
    for cmd in cmds:
        log("$ " + " ".join(cmd))
        left = args.budget_s - (time.monotonic() - T0)
        with open(log_path, "a") as f:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, start_new_session=True)
            try:
                for line in proc.stdout:
                    sys.stdout.write(line)
                    f.write(line)
                    f.flush()
                    if time.monotonic() - T0 > args.budget_s:
                        raise subprocess.TimeoutExpired(cmd, left)
                rc = proc.wait()
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                rc = 124
                f.write(f"\n(stopped: the step's budget of {args.budget_s:.0f} s ran out)\n")
                log(f"stopped: the step's budget of {args.budget_s:.0f} s ran out")
        rc_all = rc_all or rc
    log(f"wrote {log_path}")
    return rc_all


def step_tune(args, log) -> int:
    from . import tune
    argv = ["--out-dir", args.out_dir, "--budget-s", str(max(30.0, args.budget_s - (time.monotonic() - T0)))]
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
        argv.append("--dry-run")
    return tune.main(argv)


def main(argv=None) -> int:
    global T0
    T0 = time.monotonic()
    ap = argparse.ArgumentParser(prog="python3 -m benchmarks.gpu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=["tests", "g1", "g2", "tune", "e2e", "report"])
    ap.add_argument("--out-dir", default=os.environ.get("OUT") or os.path.join("runs", "gpu"))
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU through the same code")
    ap.add_argument("--budget-s", type=float, default=450.0, help="stop starting new work after this (s)")
    ap.add_argument("--resume", action="store_true", help="keep the results file and skip what it holds")
    ap.add_argument("--methods", help="comma-separated subset (g1, g2, e2e)")
    ap.add_argument("--mem-budget-gib", type=float, default=40.0,
                    help="e2e: the memory budget of the longest-sequence search (GiB, CUDA)")
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="e2e: recompute the policy's decoder layers in backward (results E2E-gc.*)")
    ap.add_argument("--repeats", type=int, help="timed steps per method (default 10; 3 in a dry run)")
    ap.add_argument("--part", choices=["logits", "linear", "all"], default="all", help="tests: which file(s)")
    ap.add_argument("--ref-dir", help="where float64 references are cached (default runs/gpu-ref)")
    args = ap.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    if args.step == "report":
        log = print
        names = sorted({os.path.basename(p)[:-6] for p in glob.glob(os.path.join(args.out_dir, "*.jsonl"))
                        if os.path.basename(p)[:-6] in ("G1", "G2", "G1-dry", "G2-dry")})
        for name in names:
            write_report(name, args.out_dir, log)
        from . import e2e
        for name in ("E2E", "E2E-gc", "E2E-dry", "E2E-gc-dry"):
            if os.path.exists(os.path.join(args.out_dir, f"{name}.jsonl")):
                e2e.write_report(name, args.out_dir, log)
                names.append(name)
        if not names:
            print(f"no G1/G2 results in {args.out_dir}")
        return 0
    log = Tee(os.path.join(args.out_dir, f"{args.step}{'-dry' if args.dry_run else ''}.log"))
    log(f"== step {args.step}{' (dry run)' if args.dry_run else ''}, {time.strftime('%Y-%m-%d %H:%M:%S')}, "
        f"budget {args.budget_s:.0f} s")
    if args.step == "tests":
        rc = step_tests(args, log)
    elif args.step == "tune":
        rc = step_tune(args, log)
    elif args.step == "e2e":
        from . import e2e
        rc = e2e.run_step(args, _env(args.dry_run, log), log, T0)
    else:
        rc = step_bench(args.step, args, log)
    log(f"== step {args.step} done in {time.monotonic() - T0:.0f} s (rc {rc})")
    return rc


T0 = time.monotonic()

if __name__ == "__main__":
    raise SystemExit(main())
