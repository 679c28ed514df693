"""One method in one process: correctness against the float64 reference, peak extra memory, time.

``python -m benchmarks.worker --method M --shape JSON --device D --ref REF.pt --out OUT.json``;
``--method float64`` writes the reference instead (the chunked ``torch`` backend on float64 copies of
the same inputs: it never materializes ``[N, V]`` even in float64; the tests verify it against the
naive float64 autograd reference).

Memory: on CUDA, ``max_memory_allocated`` over one step minus what was allocated before it; on the
CPU, the process's peak resident set (VmHWM, reset through /proc/self/clear_refs) over one step
minus the resident set before it (the CLI pins glibc's mmap threshold so freed blocks leave the
resident set). Both count everything the step allocates, gradients included.
Time: median of ``--repeats`` steps after a warm-up step (CUDA: synchronized around each step).
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import statistics
import time

import torch

from .methods import Unavailable, build
from .workloads import Shape, make_inputs

SAMPLE_ROWS = 1024


def _sample_rows(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randperm(n, generator=g)[: min(n, SAMPLE_ROWS)]


def _compared(grads: dict) -> dict:
    """The gradient views compared with the reference: dhidden whole, sampled rows of dW / dlogits."""
    out = {}
    for k, g in grads.items():
        if g is None:
            continue
        g = g.detach()
        if k in ("weight", "logits"):
            g = g[_sample_rows(g.shape[0]).to(g.device)]
        out[k] = g.float().cpu()
    return out


def _proc_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+)", f.read()).group(1))


class Meter:
    def __init__(self, device: str):
        self.cuda = device == "cuda"

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


def _reset(grads_holder):
    for g in grads_holder:
        g.grad = None


def measure_rates(device: str) -> dict:
    """The two floors' rates, measured in this run (CUDA): a large bf16 matmul (FLOP/s) and a device
    copy (bytes/s, read + write counted)."""
    if device != "cuda":
        return {}
    import triton.testing
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    t_mm = triton.testing.do_bench(lambda: a @ b, warmup=100, rep=500, return_mode="median") * 1e-3
    x = torch.empty(2**28, device="cuda", dtype=torch.bfloat16).normal_()
    y = torch.empty_like(x)
    t_cp = triton.testing.do_bench(lambda: y.copy_(x), warmup=100, rep=500, return_mode="median") * 1e-3
    return {"matmul_flops": 2 * n ** 3 / t_mm, "copy_bytes_per_s": 2 * x.numel() * x.element_size() / t_cp}


def run_reference(shape: Shape, device: str, path: str) -> None:
    import spo_kernels as sk
    inp = make_inputs(shape, device, dtype=torch.float64)
    if shape.workload == "linear":
        h = inp["hidden"].requires_grad_(True)
        W = inp["weight"].requires_grad_(True)
        out = sk.fused_linear_preference_loss(h, W, inp["labels"], ref_hidden=inp["ref_hidden"],
                                              ref_weight=inp["ref_weight"], beta=0.1, backend="torch")
        out.loss.backward()
        grads = {"hidden": h.grad, "weight": W.grad}
    else:
        z = inp["logits"].requires_grad_(True)
        out = sk.preference_loss(z, inp["labels"], cu_seqlens=inp["cu_seqlens"], ref_logps=inp["ref_logps"].double(),
                                 beta=0.1, backend="torch", inplace_backward=False)
        out.loss.backward()
        grads = {"logits": z.grad}
    torch.save({"loss": float(out.loss), "grads": _compared(grads)}, path)


def run_method(method: str, shape: Shape, device: str, ref_path: str, repeats: int) -> dict:
    inp = make_inputs(shape, device)
    try:
        step = build(method, shape.workload, inp, device)
    except Unavailable as e:
        return {"method": method, "status": "unavailable", "reason": str(e)}
    refresh = getattr(step, "refresh", lambda: None)
    leaves = step.leaves
    meter = Meter(device)

    # 1) correctness (this is also the warm-up step: compilation and autotuning happen here).
    res = step()
    ref = torch.load(ref_path)
    errors = {"loss": abs(float(res["loss"]) - ref["loss"]) / max(abs(ref["loss"]), 1e-30)}
    for k, g in _compared(res["grads"]).items():
        r = ref["grads"][k]
        errors[k] = float((g.double() - r.double()).norm() / r.double().norm()) if torch.isfinite(g).all() else float("inf")
    del res
    _reset(leaves)
    refresh()

    # 2) peak extra memory of one step.
    meter.start()
    step()
    peak = meter.peak_extra()
    _reset(leaves)
    refresh()

    # 3) time: median over repeats.
    times = []
    for _ in range(repeats):
        meter.sync()
        t0 = time.perf_counter()
        step()
        meter.sync()
        times.append(time.perf_counter() - t0)
        _reset(leaves)
        refresh()
    return {"method": method, "status": "ok", "errors": errors, "peak_extra_bytes": peak,
            "time_s_median": statistics.median(times), "time_s_all": times}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", required=True)
    ap.add_argument("--shape", required=True, help="JSON of a workloads.Shape")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--ref", required=True)
    ap.add_argument("--out")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    shape = Shape(**{k: v for k, v in json.loads(args.shape).items() if k in Shape.__dataclass_fields__})
    torch.manual_seed(0)
    if args.method == "float64":
        run_reference(shape, args.device, args.ref)
        return 0
    if args.method == "rates":
        with open(args.out, "w") as f:
            json.dump(measure_rates(args.device), f)
        return 0
    result = run_method(args.method, shape, args.device, args.ref, args.repeats)
    with open(args.out, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
