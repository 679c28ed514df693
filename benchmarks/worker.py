"""One method in one process, over one or more shapes; each result is appended to a JSON-lines file the
moment it is measured (a killed run keeps every finished line).

    python -m benchmarks.worker --method M --shapes JSON --device D --ref-dir DIR --jsonl FILE [--repeats R]
    python -m benchmarks.worker --method reference --shapes JSON --device D --ref-dir DIR --jsonl FILE
    python -m benchmarks.worker --method rates --device cuda --jsonl FILE

Per shape, in this order:
1. correctness: one step on fresh inputs (also the warm-up: compilation and autotuning happen here),
   compared with the float64 reference of the same inputs (:mod:`benchmarks.reference`, cached in
   ``--ref-dir`` by the ``reference`` method); outside SPEC 7's tolerances the line says ``WRONG``;
2. peak extra memory of one step: on CUDA ``max_memory_allocated`` minus what was allocated before it;
   on the CPU the process's peak resident set (VmHWM, reset through /proc/self/clear_refs) minus the
   resident set before it (the runner pins glibc's mmap threshold so freed blocks leave the resident
   set). Both count everything the step allocates, gradients included;
3. time: the median of ``--repeats`` steps (CUDA: synchronized around each step; inputs restored
   outside the timed region).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import time
import traceback

import torch

from . import reference as reference_mod
from .methods import Unavailable, build
from .workloads import Shape, make_inputs, refill_logits

TOLERANCES = {  # SPEC 7: (loss rel, gradient rel-norm)
    "fp32": (1e-5, 1e-4), "fp64": (1e-5, 1e-4), "bf16": (1e-3, 2e-2), "fp16": (1e-3, 2e-2),
}


def append_line(path: str, record: dict) -> None:
    """Append one JSON line with a single write, flushed to disk (survives a kill of this process)."""
    data = (json.dumps(record) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def method_label(method: str, device: str) -> str:
    """What ran: ``spo`` names the backend it resolved to."""
    if method == "spo":
        from spo_kernels.backends import resolve_backend_name
        return f"spo ({resolve_backend_name(None, torch.device(device))})"
    if method.startswith("spo_"):
        return f"spo ({method[4:]})"
    return method


def _proc_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+)", f.read()).group(1))


class Meter:
    def __init__(self, device: str):
        self.cuda = torch.device(device).type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def start(self):
        gc.collect()
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
            self.base = _proc_kb("VmRSS") * 1024

    def peak_extra(self) -> int:
        self.sync()
        if self.cuda:
            return torch.cuda.max_memory_allocated() - self.base
        return _proc_kb("VmHWM") * 1024 - self.base


def measure_rates(device: str) -> dict:
    """The two ceilings measured in this run (CUDA): a large bf16 matmul (FLOP/s) and a device copy
    (bytes/s, read + write counted), random data, medians of ``triton.testing.do_bench``."""
    import triton.testing
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    t_mm = triton.testing.do_bench(lambda: a @ b, warmup=100, rep=500, return_mode="median") * 1e-3
    x = torch.empty(2**28, device="cuda", dtype=torch.bfloat16).normal_()
    y = torch.empty_like(x)
    t_cp = triton.testing.do_bench(lambda: y.copy_(x), warmup=100, rep=500, return_mode="median") * 1e-3
    return {"matmul_flops": 2 * n ** 3 / t_mm, "copy_bytes_per_s": 2 * x.numel() * x.element_size() / t_cp}


def ref_path(ref_dir: str, shape: Shape) -> str:
    return os.path.join(ref_dir, f"{shape.key}.pt")


def run_reference(shape: Shape, device: str, ref_dir: str) -> dict:
    ref = reference_mod.compute(shape, device)
    torch.save(ref, ref_path(ref_dir, shape))
    return {"loss": ref["loss"], "top_prob_share": ref["top_prob_share"], "seconds": ref["seconds"]}


def _restore(step, shape, device):
    """Reset the leaves' gradients; draw the logits again where an in-place backward overwrote them."""
    for t in step.leaves:
        t.grad = None
    if getattr(step, "refresh", None) is not None:
        step.refresh()
    elif getattr(step, "inplace", False):
        refill_logits(shape, device, step.logits)


def run_method(method: str, shape: Shape, device: str, ref_dir: str, repeats: int) -> dict:
    inp = make_inputs(shape, device)
    try:
        step = build(method, shape.workload, inp, device)
    except Unavailable as e:
        return {"status": "unavailable", "reason": str(e)}
    meter = Meter(device)
    loss_tol, grad_tol = TOLERANCES[shape.dtype]

    # 1) correctness against the float64 reference (and the warm-up step).
    res = step()
    ref = torch.load(ref_path(ref_dir, shape))
    errors = reference_mod.compare(float(res["loss"]), res["grads"], ref)
    del res
    _restore(step, shape, device)
    max_grad = max((v for k, v in errors.items() if k != "loss"), default=0.0)
    status = "ok" if errors["loss"] <= loss_tol and max_grad <= grad_tol else "WRONG"

    # 2) peak extra memory of one step.
    meter.start()
    step()
    peak = meter.peak_extra()
    _restore(step, shape, device)

    # 3) time: median over repeats.
    times = []
    for _ in range(repeats):
        meter.sync()
        t0 = time.perf_counter()
        step()
        meter.sync()
        times.append(time.perf_counter() - t0)
        _restore(step, shape, device)
    return {"status": status, "errors": errors, "max_grad_err": max_grad, "peak_extra_bytes": peak,
            "time_s_median": statistics.median(times), "time_s_all": times,
            "tolerances": {"loss": loss_tol, "grad": grad_tol}}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", required=True)
    ap.add_argument("--shapes", default="[]", help="JSON list of workloads.Shape dicts")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--ref-dir")
    ap.add_argument("--jsonl", required=True)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tag", default="", help="a free-form tag copied into every line (e.g. the step)")
    args = ap.parse_args(argv)
    shapes = [Shape.from_dict(d) for d in json.loads(args.shapes)]
    torch.manual_seed(0)
    base = {"tag": args.tag, "device": args.device}

    if args.method == "rates":
        append_line(args.jsonl, dict(base, kind="rates", **measure_rates(args.device)))
        return 0
    for shape in shapes:
        t0 = time.perf_counter()
        if args.method == "reference":
            rec = dict(base, kind="reference", shape=shape.to_dict(), **run_reference(shape, args.device, args.ref_dir))
        else:
            rec = dict(base, kind="result", method=args.method, shape=shape.to_dict())
            try:
                rec["label"] = method_label(args.method, args.device)
                rec.update(run_method(args.method, shape, args.device, args.ref_dir, args.repeats))
            except Exception as e:  # noqa: BLE001 - one shape's failure (e.g. out of memory) is a result too
                rec.update(status="error", reason=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}",
                           traceback=traceback.format_exc()[-3000:])
            rec.setdefault("label", args.method)
        rec["seconds"] = time.perf_counter() - t0
        append_line(args.jsonl, rec)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
