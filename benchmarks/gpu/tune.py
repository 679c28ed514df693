"""The ``tune`` step: sweep the Triton kernels' launch parameters on a GPU and write ``tuned_configs.json``.

    python3 -m benchmarks.gpu tune                                  # through the harness
    python3 -m benchmarks.gpu.tune --out-dir DIR [--budget-s 420] [--shapes G1,G2] [--dry-run]

What it measures, one kernel at a time, coordinate-wise from the built-in defaults (the tuning table is
switched off while it runs, so the defaults are the code's own):

- at **G1** (16 sequences x 2048 tokens, N = 32768 rows, the second half of each sequence completion:
  Nc = 16384, H = 4096, V = 128256, bf16, trainable head, no bias): the fused-linear forward
  (``linear_fwd``: the whole ``linear_forward``), and on one (all tokens x vocabulary range) block of
  the backward's own plan (8192 columns at G1, what each of phase 1's ranges runs): dz
  (``linear_dz``, ``_grad_logits_kernel``), the dW GEMM (``linear_dw``) and the dhidden GEMM
  (``linear_dh``), launched through ``linear_logprobs.BlockLaunches`` like ``linear_backward`` does;
- at **G2** (logits ``[32768, 128256]`` bf16, the same plan, packed): ``logits_forward`` (``logits_fwd``)
  and ``logits_backward`` out of place (``logits_bwd``).

Candidates (:data:`CANDIDATES`): for each kernel a few axes, tried in order; each value of an axis is
tried against the best so far, which a candidate replaces only when it is at least 1% faster (medians
within noise keep the earlier, simpler choice). Tile axes first, then warps, then stages:

- linear_fwd / linear_dz: tiles (block_n, block_v, block_h) in (128,256,64), (256,128,64),
  (128,128,32), (128,128,128) (+ (64,128,64) for the forward: dz tiles must stay multiples of the GEMMs'
  m/k tiles), then num_warps 4, then num_stages 2, 4: 8-9 candidates each, with the default;
- linear_dw / linear_dh: (block_m, block_n, block_k) in (128,256,64), (64,256,64), (128,128,128),
  (128,128,32), (64,128,64), then num_warps 4, then num_stages 2, 4, 5: 10 each;
- logits_fwd: block_v 1024, 2048, 8192, then num_warps 4, 16, then prefetch 0: 7;
- logits_bwd: block_v 1024, 2048, 8192, then num_warps 4, 16: 6.

A candidate that does not fit the others (GEMM tiles that do not divide the dz tile) is recorded as
``invalid`` without a launch. Every candidate first runs once and its output is compared with the
default config's (relative error in norm: forward log-probs / LSE below 1e-4, backward outputs below
2e-3, i.e. 10x under SPEC 7's bf16 gradient tolerance; NaN fails); a compile error, an out-of-resources
launch (shared memory) or different numbers are recorded as such and the candidate is skipped. Then it
is timed with ``triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")``. Inputs are
drawn on the GPU (random normal hidden states, head, logits and upstream gradients; never zeros).

Outputs in ``--out-dir``: ``tune.jsonl``, one JSON line per candidate appended (flushed, fsynced) the
moment it is measured, plus one ``"status": "chosen"`` line per kernel; and ``tuned_configs.json``,
written after each kernel and at the end in exactly the committed table's format
(``spo_kernels/kernels/tuning.py``), merged with the committed table: copy it over
``spo_kernels/kernels/tuned_configs.json`` as is. ``--budget-s`` (default 420): no candidate starts after
that many seconds; what was measured is still written (the best so far of an unfinished kernel
included).

Estimated time on a fresh H100 (not yet run on one): 50 candidates (defaults included), of which 37
compile a wgmma kernel and 13 a small streaming kernel. Offline sm_90 compiles of these kernels take
0.5-1.1 s each with triton 3.6 (tests/compile_for_gpu.py on a 2-core CPU); counting 1-3 s per
candidate for the compile and the first launch: 1-2.5 min. Timing: 0.2-0.5 s per candidate (the G1
forward is ~30 ms a call, a backward block ~2 ms, a G2 pass ~5 ms), ~20 s. Inputs (G2's 8.2 GB of
logits, ~25 GB of buffers in all, drawn on the GPU) and the default outputs ~15 s; process start, CUDA
and torch ~20 s: **about 2.5-3.5 min**, with the 420 s budget as the hard stop inside the 8 min window.

``--dry-run``: the same code on the CPU through the Triton interpreter at tiny shapes (G1: 4 x 12
tokens, H = 40, V = 257; G2: [48, 257]) with 2 candidates per kernel besides the default, timed with a
wall clock instead of ``do_bench``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

GATE_FWD = 1e-4  # forward outputs (fp32 log-probs / LSE from bf16 inputs): only the summation order differs
GATE_BWD = 2e-3  # backward outputs (bf16 dz / dW, fp32 dhidden partial): 10x under SPEC 7's 2e-2
IMPROVE = 0.99  # a candidate must be at least 1% faster than the best so far to replace it

SHAPES = {  # (sequences, tokens per sequence, H, V); the second half of every sequence is completion
    "G1": dict(S=16, T=2048, H=4096, V=128256),
    "G2": dict(S=16, T=2048, V=128256),
}
DRY_SHAPES = {
    "G1": dict(S=4, T=12, H=40, V=257),
    "G2": dict(S=4, T=12, V=257),
}
KERNELS_OF = {"G1": ("linear_fwd", "linear_dz", "linear_dw", "linear_dh"), "G2": ("logits_fwd", "logits_bwd")}

_T = [(128, 256, 64), (256, 128, 64), (128, 128, 32), (128, 128, 128)]
CANDIDATES = {  # kernel -> axes; an axis is a list of parameter updates tried against the best so far
    "linear_fwd": [[dict(block_n=a, block_v=b, block_h=c) for a, b, c in _T + [(64, 128, 64)]],
                   [dict(num_warps=4)], [dict(num_stages=2), dict(num_stages=4)]],
    "linear_dz": [[dict(block_n=a, block_v=b, block_h=c) for a, b, c in _T],
                  [dict(num_warps=4)], [dict(num_stages=2), dict(num_stages=4)]],
    "linear_dw": [[dict(block_m=a, block_n=b, block_k=c) for a, b, c in
                   [(128, 256, 64), (64, 256, 64), (128, 128, 128), (128, 128, 32), (64, 128, 64)]],
                  [dict(num_warps=4)], [dict(num_stages=2), dict(num_stages=4), dict(num_stages=5)]],
    "logits_fwd": [[dict(block_v=1024), dict(block_v=2048), dict(block_v=8192)],
                   [dict(num_warps=4), dict(num_warps=16)], [dict(prefetch=0)]],
    "logits_bwd": [[dict(block_v=1024), dict(block_v=2048), dict(block_v=8192)],
                   [dict(num_warps=4), dict(num_warps=16)]],
}
CANDIDATES["linear_dh"] = CANDIDATES["linear_dw"]
DRY_CANDIDATES = {  # interpreter defaults: tiles 32 (dz, forward), GEMM m/k 32, n 64
    "linear_fwd": [[dict(block_n=16, block_v=64, block_h=16)], [dict(num_warps=2)]],
    "linear_dz": [[dict(block_n=64, block_v=32)], [dict(block_h=16)]],
    "linear_dw": [[dict(block_m=16, block_k=16)], [dict(block_n=32)]],
    "linear_dh": [[dict(block_m=16, block_n=32)], [dict(block_k=16)]],
    "logits_fwd": [[dict(block_v=64)], [dict(prefetch=0)]],
    "logits_bwd": [[dict(block_v=32)], [dict(num_warps=2)]],
}


def _interpreted(fn) -> bool:
    return type(fn).__name__ == "InterpretedFunction"


class Results:
    """``tune.jsonl`` (one line per candidate, flushed and fsynced) and the table, rewritten as it grows."""

    def __init__(self, out_dir: str, tuning, gpu: str):
        self.dir, self.tuning, self.gpu = out_dir, tuning, gpu
        os.makedirs(out_dir, exist_ok=True)
        self.jsonl = os.path.join(out_dir, "tune.jsonl")
        self.table_path = os.path.join(out_dir, "tuned_configs.json")
        self.base = tuning.load_table(tuning.DEFAULT_PATH)  # the committed table (validated)
        self.new = tuning.empty_table(f"Entries measured by benchmarks/gpu/tune.py (each entry's 'measured' says "
                                      f"when and with what); last run on {gpu}.")

    def line(self, rec: dict) -> None:
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def entry(self, dtype: str, kernel: str, cls: str, params: dict, measured: dict) -> None:
        self.tuning.set_entry(self.new, self.gpu, dtype, kernel, cls, params, measured)
        self.write()

    def write(self) -> None:
        self.tuning.write_table(self.table_path, self.tuning.merge_tables(self.base, self.new))


def _rel_err(a, b) -> float:
    """Relative error in norm, in float64 over chunks (G2's outputs have 4.2e9 elements); NaN/inf: inf."""
    import torch
    a, b = a.reshape(-1), b.reshape(-1)
    num = den = 0.0
    step = 1 << 25
    for i in range(0, a.numel(), step):
        x, y = a[i:i + step].double(), b[i:i + step].double()
        if not bool(torch.isfinite(x).all()) or not bool(torch.isfinite(y).all()):
            return float("inf")
        num += float(((x - y) ** 2).sum())
        den += float((y * y).sum())
    return (num / den) ** 0.5 if den > 0 else (0.0 if num == 0 else float("inf"))


class Tuner:
    def __init__(self, args, log):
        import torch
        import triton
        import triton.testing  # noqa: F401 - do_bench
        from spo_kernels.kernels import linear_logprobs as LL
        from spo_kernels.kernels import logits_logprobs as LG
        from spo_kernels.kernels import tuning
        from spo_kernels.kernels.types import KernelOptions, LogitTransform
        self.KernelOptions, self.LogitTransform = KernelOptions, LogitTransform
        self.torch, self.triton, self.LL, self.LG, self.tuning = torch, triton, LL, LG, tuning
        self.args, self.log = args, log
        self.dry = args.dry_run
        self.device = torch.device("cpu" if self.dry else "cuda")
        self.gpu = "CPU interpreter" if self.dry else tuning.normalise_gpu_name(
            torch.cuda.get_device_name(self.device))
        self.dtype = torch.bfloat16
        self.t0 = time.monotonic()
        self.results = Results(args.out_dir, tuning, self.gpu)
        self.candidates = DRY_CANDIDATES if self.dry else CANDIDATES
        self.best: dict = {}  # kernel -> params chosen so far (the fused-linear kernels depend on each other)
        self.out_of_budget = False
        self.context_lost = False

    # -- bookkeeping -------------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def over_budget(self) -> bool:
        if self.elapsed() > self.args.budget_s:
            if not self.out_of_budget:
                self.log(f"budget of {self.args.budget_s:.0f} s spent after {self.elapsed():.0f} s: no new candidates")
            self.out_of_budget = True
        return self.out_of_budget

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def bench(self, fn) -> float:
        """Time of ``fn`` in ms: do_bench's median on a GPU, the faster of two wall-clock runs on a CPU."""
        if self.device.type == "cuda":
            return float(self.triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
        times = []
        for _ in range(2):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return sorted(times)[0]

    # -- defaults and configs ----------------------------------------------------------------------------
    def linear_cfg(self, kernel=None, params=None, Nc=0, H=0):
        """The fused-linear config with every kernel at its best so far and ``kernel`` at ``params``
        (through CONFIG_OVERRIDES, validated by ``kernel_config``)."""
        LL = self.LL
        LL.CONFIG_OVERRIDES = {}
        defaults = LL.kernel_config(self.dtype, device=self.device, Nc=Nc, H=H)
        over = {}
        for k in self.tuning.LINEAR_KERNELS:  # every kernel's fields explicit: none falls back to another's
            p = params if k == kernel else self.best.get(k, defaults.params(k))
            over.update({LL._TABLE_FIELDS[k][n]: v for n, v in p.items()})
        LL.CONFIG_OVERRIDES = over
        return LL.kernel_config(self.dtype, device=self.device, Nc=Nc, H=H)

    def default_params(self, kernel: str, **shape) -> dict:
        if kernel in self.tuning.LINEAR_KERNELS:
            self.LL.CONFIG_OVERRIDES = {}
            return self.LL.kernel_config(self.dtype, device=self.device, **shape).params(kernel)
        self.LG.CONFIG_OVERRIDES = {}
        return self.LG.launch_params(kernel, self.dtype, shape["V"], self.device)

    # -- one kernel ----------------------------------------------------------------------------------------
    def sweep(self, shape_name: str, kernel: str, cls: str, make_run, gate: float, shape_info: dict) -> None:
        """Coordinate-wise sweep of one kernel. ``make_run(params)`` returns a callable that launches the
        kernel with those parameters and returns its output tensor(s) (raises ValueError if the params do
        not fit the other kernels' choices)."""
        torch = self.torch
        base = {"shape": shape_name, "kernel": kernel, "class": cls, "gpu": self.gpu, "dtype": "bfloat16",
                "triton": self.triton.__version__, "torch": torch.__version__.split("+")[0]}
        default = self.default_params(kernel, **shape_info)
        tried: dict = {}
        ref = None
        best, best_ms, default_ms = None, None, None
        n_ok = 0

        def measure(params: dict, is_default: bool):
            nonlocal ref
            rec = dict(base, params=params, default=is_default, status="ok", ms=None, rel_err=None,
                       first_call_s=None, error=None)
            try:
                run = make_run(params)
            except ValueError as e:  # does not fit the other kernels' tiles: nothing launched
                rec.update(status="invalid", error=str(e)[:500])
                return rec
            try:
                t = time.perf_counter()
                out = run()
                self.sync()
                rec["first_call_s"] = round(time.perf_counter() - t, 3)  # includes the compile
                outs = out if isinstance(out, (tuple, list)) else (out,)
                outs = [o for o in outs if o is not None]  # a LogprobResult without statistics
                if is_default:
                    ref = [o.clone() for o in outs]
                    err = max(_rel_err(o, o) for o in outs)  # NaN / inf in the default itself
                else:
                    err = max(_rel_err(o, r) for o, r in zip(outs, ref))
                rec["rel_err"] = err if err < float("inf") else "inf"  # strict JSON: no Infinity / NaN
                if not err <= gate:
                    rec["status"] = "mismatch"
                    return rec
                del out, outs
                rec["ms"] = round(self.bench(run), 5)
            except Exception as e:  # noqa: BLE001 - compile error, out of resources, ...: recorded, skipped
                rec.update(status="error", error=f"{type(e).__name__}: {str(e)[:1500]}")
                if self.device.type == "cuda":
                    try:
                        torch.cuda.synchronize()
                    except Exception:  # noqa: BLE001
                        self.context_lost = True
            return rec

        for axis in [[{}]] + self.candidates[kernel]:
            for update in axis:
                if self.context_lost or self.over_budget():
                    break
                params = dict(best if best is not None else default, **update)
                key = json.dumps(params, sort_keys=True)
                if key in tried:
                    continue
                is_default = best is None
                rec = measure(params, is_default)
                rec["t"] = round(self.elapsed(), 1)
                tried[key] = rec
                self.results.line(rec)
                ms = rec["ms"]
                self.log(f"  {kernel:10s} {rec['status']:8s} {'' if ms is None else f'{ms:9.4f} ms'} "
                         f"{params}{'  (default)' if is_default else ''}"
                         f"{'  ' + rec['error'][:160] if rec['error'] else ''}")
                if rec["status"] != "ok":
                    if is_default:
                        self.log(f"  {kernel}: the default config fails ({rec['status']}): no entry")
                        return
                    continue
                n_ok += 1
                if is_default:
                    best, best_ms, default_ms = params, ms, ms
                elif ms < IMPROVE * best_ms:
                    best, best_ms = params, ms
        if best is None:
            return
        self.best[kernel] = best
        measured = {"ms": best_ms, "default_ms": default_ms, "speedup": round(default_ms / best_ms, 4),
                    "shape": shape_name, "shape_info": shape_info, "candidates_ok": n_ok,
                    "candidates_tried": len(tried), "complete": not (self.out_of_budget or self.context_lost),
                    "triton": base["triton"], "torch": base["torch"], "date": time.strftime("%Y-%m-%d")}
        self.results.line(dict(base, status="chosen", params=best, ms=best_ms, default_ms=default_ms,
                               t=round(self.elapsed(), 1)))
        self.results.entry("bfloat16", kernel, cls, best, measured)
        self.log(f"  {kernel}: chose {best}: {best_ms:.4f} ms (default {default_ms:.4f} ms)")

    # -- shapes --------------------------------------------------------------------------------------------
    def plan(self, S, T, V, packed=False):
        torch = self.torch
        from spo_kernels.layout import build_plan
        g = torch.Generator().manual_seed(1)
        labels = torch.randint(0, V, (S, T), generator=g)
        labels[:, : T // 2] = -100
        labels = labels.to(self.device)
        if packed:
            cu = torch.arange(0, S + 1, dtype=torch.int32, device=self.device) * T
            return build_plan(labels.reshape(-1), V, -100, (S * T,), self.device, cu)
        return build_plan(labels, V, -100, labels.shape, self.device)

    def randn(self, *shape, scale=1.0):
        torch = self.torch
        g = torch.Generator(device=self.device).manual_seed(len(shape) * 7919 + shape[-1])
        x = torch.randn(*shape, device=self.device, dtype=self.dtype, generator=g)
        return x.mul_(scale) if scale != 1.0 else x

    def run_g1(self) -> None:
        torch, LL = self.torch, self.LL
        LogitTransform, KernelOptions = self.LogitTransform, self.KernelOptions
        s = (DRY_SHAPES if self.dry else SHAPES)["G1"]
        S, T, H, V = s["S"], s["T"], s["H"], s["V"]
        plan = self.plan(S, T, V)
        N, Nc = S * T, plan.num_tokens
        self.log(f"G1: N={N} Nc={Nc} H={H} V={V} bf16 ({self.elapsed():.0f} s)")
        hidden = self.randn(N, H)
        weight = self.randn(V, H, scale=2.0 / H ** 0.5)  # logits of std ~2
        grad_seq = torch.randn(S, device=self.device, generator=torch.Generator(device=self.device).manual_seed(2))
        info = {"Nc": Nc, "H": H}
        cfg0 = self.linear_cfg(Nc=Nc, H=H)
        _, lse, _ = LL.linear_forward(hidden, weight, None, plan, transform=LogitTransform(), options=KernelOptions(),
                                      save_lse=True)
        # One block of the backward's own plan: all tokens x the first vocabulary range.
        bp = LL.plan_backward(N, Nc, V, H, self.dtype, self.dtype, None, True, True, False, cfg0, False,
                              LL._num_sms(self.device))
        width, stride = bp.v_blocks[0][1], bp.stride_dz
        dz0 = torch.empty((Nc, stride), dtype=self.dtype, device=self.device)
        LL.BlockLaunches(cfg0, hidden, weight, None, plan, LogitTransform(), lse, grad_seq, 0.0, dz0, dz0).grad_logits(
            dz0, stride, 0, Nc, 0, width, False)
        self.sync()
        self.log(f"  backward block: {Nc} tokens x {width} columns (of the plan's {len(bp.v_blocks)} ranges)")
        dz = torch.empty_like(dz0)
        dw_out = torch.empty((width, H), dtype=self.dtype, device=self.device)
        dh_acc = torch.empty((Nc, H), dtype=torch.float32, device=self.device)
        dh_out = torch.empty((N, H), dtype=self.dtype, device=self.device)  # not written (STORE_OUT=False)

        def launches(kernel, params):
            cfg = self.linear_cfg(kernel, params, Nc=Nc, H=H)
            return LL.BlockLaunches(cfg, hidden, weight, None, plan, LogitTransform(), lse, grad_seq, 0.0, dz0, dz0)

        def make_fwd(params):
            self.linear_cfg("linear_fwd", params, Nc=Nc, H=H)  # validates; the launcher reads the overrides
            over = dict(LL.CONFIG_OVERRIDES)

            def run():
                LL.CONFIG_OVERRIDES = over
                return LL.linear_forward(hidden, weight, None, plan, transform=LogitTransform(),
                                         options=KernelOptions(), save_lse=True)
            return run

        def make_dz(params):
            b = launches("linear_dz", params)
            return lambda: (b.grad_logits(dz, stride, 0, Nc, 0, width, False), dz[:, :width])[1]

        def make_dw(params):
            b = launches("linear_dw", params)
            return lambda: (b.dw_gemm(dz0, stride, dw_out, dw_out, 0, Nc, 0, width, False, True), dw_out)[1]

        def make_dh(params):
            b = launches("linear_dh", params)
            return lambda: (b.dh_gemm(dz0, stride, dh_acc, dh_out, 0, Nc, 0, width, False, False, False),
                            dh_acc)[1]

        makers = {"linear_fwd": (make_fwd, GATE_FWD), "linear_dz": (make_dz, GATE_BWD),
                  "linear_dw": (make_dw, GATE_BWD), "linear_dh": (make_dh, GATE_BWD)}
        try:
            for kernel in KERNELS_OF["G1"]:
                if self.context_lost or self.over_budget():
                    break
                make, gate = makers[kernel]
                self.sweep("G1", kernel, self.tuning.shape_class(kernel, H=H, Nc=Nc), make, gate, info)
        finally:
            LL.CONFIG_OVERRIDES = {}
            del hidden, weight, dz0, dz, dw_out, dh_acc, dh_out
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def run_g2(self) -> None:
        torch, LG = self.torch, self.LG
        LogitTransform, KernelOptions = self.LogitTransform, self.KernelOptions
        s = (DRY_SHAPES if self.dry else SHAPES)["G2"]
        S, T, V = s["S"], s["T"], s["V"]
        plan = self.plan(S, T, V, packed=True)
        N = S * T
        self.log(f"G2: logits [{N}, {V}] bf16, Nc={plan.num_tokens} ({self.elapsed():.0f} s)")
        logits = self.randn(N, V, scale=3.0)
        grad_seq = torch.randn(S, device=self.device, generator=torch.Generator(device=self.device).manual_seed(3))
        LG.CONFIG_OVERRIDES = {}
        _, lse, _ = LG.logits_forward(logits, plan, transform=LogitTransform(), options=KernelOptions())
        out = torch.empty_like(logits)
        info = {"V": V}

        def make(kernel):
            def maker(params):
                over = {kernel: dict(params)}
                if kernel == "logits_fwd":
                    def run():
                        LG.CONFIG_OVERRIDES = over
                        return LG.logits_forward(logits, plan, transform=LogitTransform(), options=KernelOptions())
                else:
                    def run():
                        LG.CONFIG_OVERRIDES = over
                        LG.logits_backward(logits, plan, transform=LogitTransform(), lse=lse, grad_seq=grad_seq,
                                           out=out)
                        return out
                return run
            return maker

        try:
            for kernel in KERNELS_OF["G2"]:
                if self.context_lost or self.over_budget():
                    break
                gate = GATE_FWD if kernel == "logits_fwd" else GATE_BWD
                self.sweep("G2", kernel, self.tuning.shape_class(kernel, V=V), make(kernel), gate, info)
        finally:
            LG.CONFIG_OVERRIDES = {}
            del logits, out
            if self.device.type == "cuda":
                torch.cuda.empty_cache()


def main(argv: list) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks/gpu/tune.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", required=True, help="tune.jsonl and tuned_configs.json go here")
    ap.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    ap.add_argument("--budget-s", type=float, default=420.0, help="no candidate starts after this (s)")
    ap.add_argument("--shapes", default="G1,G2", help="comma-separated: G1 (fused-linear), G2 (logits)")
    args = ap.parse_args(argv)
    shapes = [s for s in args.shapes.split(",") if s]
    bad = sorted(set(shapes) - set(SHAPES))
    if bad:
        ap.error(f"unknown shapes {bad} (known: G1, G2)")

    if args.dry_run and os.environ.get("TRITON_INTERPRET") != "1":
        if "spo_kernels.kernels.linear_logprobs" in sys.modules or "spo_kernels.kernels.logits_logprobs" in sys.modules:
            # The kernels were already defined for a GPU: run the dry run in a fresh interpreter process.
            env = dict(os.environ, TRITON_INTERPRET="1")
            root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            return subprocess.call([sys.executable, "-m", "benchmarks.gpu.tune", *argv], env=env, cwd=root)
        os.environ["TRITON_INTERPRET"] = "1"
    from spo_kernels.kernels import linear_logprobs as LL
    from spo_kernels.kernels import tuning
    if args.dry_run and not _interpreted(LL._forward_partials_kernel):
        print("tune --dry-run: the kernels are not interpreted (TRITON_INTERPRET=1 was set too late)")
        return 2
    import torch
    if not args.dry_run and not torch.cuda.is_available():
        print("tune: no CUDA device (use --dry-run on a CPU)")
        return 2

    os.makedirs(args.out_dir, exist_ok=True)
    log_f = open(os.path.join(args.out_dir, "tune.log"), "a", buffering=1)

    def log(msg: str = "") -> None:
        print(msg, flush=True)
        log_f.write(msg + "\n")

    saved_env = os.environ.get(tuning.ENV_PATH)
    os.environ[tuning.ENV_PATH] = "off"  # sweep from the code's own defaults, never from an older table
    try:
        tuner = Tuner(args, log)
        log(f"tune on {tuner.gpu}{' (dry run)' if args.dry_run else ''}: shapes {shapes}, budget "
            f"{args.budget_s:.0f} s, triton {tuner.triton.__version__}, torch {torch.__version__}")
        tuner.results.write()  # a loadable table from the start (the committed one)
        for shape in shapes:
            if tuner.context_lost or tuner.over_budget():
                break
            (tuner.run_g1 if shape == "G1" else tuner.run_g2)()
        tuner.results.write()
        log(f"tune done in {tuner.elapsed():.0f} s: {tuner.results.table_path}"
            f"{' (budget spent: partial)' if tuner.out_of_budget else ''}"
            f"{' (CUDA context lost: stopped)' if tuner.context_lost else ''}")
        return 1 if tuner.context_lost else 0
    finally:
        if saved_env is None:
            os.environ.pop(tuning.ENV_PATH, None)
        else:
            os.environ[tuning.ENV_PATH] = saved_env
        log_f.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
