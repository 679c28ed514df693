"""Compile every kernel variant the host launchers use, for a real NVIDIA GPU, on a machine without one.

The interpreter (``TRITON_INTERPRET=1``) checks the kernels' arithmetic but not that the compiler accepts
them: it is lenient about dtypes in ``tl.dot``, layouts, shared-memory use and constexpr handling. This
script runs the host launchers (``linear_forward``/``linear_backward``, ``logits_forward``/``backward``,
``loss_step``) on CPU tensors with every kernel replaced by a recorder, then compiles each distinct
recorded launch (signature, constexprs, num_warps/num_stages) with Triton's NVIDIA backend for sm_90
(H100/H200): front end, TTIR -> TTGIR -> LLVM -> PTX, then ptxas to cubin. No kernel runs.

Usage: ``python tests/compile_for_gpu.py [--quick]`` (``--quick``: one dtype per op). Prints one line per
variant and exits non-zero on the first compile error. ``tests/test_compile_for_gpu.py`` runs it.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # must be unset before triton is imported: real JITFunctions

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from spo_kernels.config import LOSS_TYPES, PreferenceLossConfig  # noqa: E402
from spo_kernels.kernels import linear_logprobs as LL  # noqa: E402
from spo_kernels.kernels import logits_logprobs as LG  # noqa: E402
from spo_kernels.kernels import loss_step as LS  # noqa: E402
from spo_kernels.layout import build_plan  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
_PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float64: "*fp64",
        torch.int64: "*i64", torch.int32: "*i32", torch.int8: "*i8"}
LAUNCHES: dict = {}  # variant key -> (kernel, signature, constexprs, options)


class Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` records the launch."""

    def __init__(self, fn):
        self.fn = fn
        self.constexpr_names = [p.name for p in fn.params if p.is_constexpr]

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
            bound = dict(zip(self.fn.arg_names, args))
            bound.update(kwargs)
            sig, consts = {}, {}
            for name in self.fn.arg_names:
                v = bound[name]
                if name in self.constexpr_names:
                    sig[name], consts[name] = "constexpr", v
                elif isinstance(v, torch.Tensor):
                    sig[name] = _PTR[v.dtype]
                elif isinstance(v, bool):
                    sig[name] = "i1"
                elif isinstance(v, int):
                    sig[name] = "i32" if -2**31 <= v < 2**31 else "i64"
                elif isinstance(v, float):
                    sig[name] = "fp32"
                else:
                    raise TypeError(f"{self.fn.__name__}: argument {name} of type {type(v)}")
            key = (self.fn.__name__, tuple(sig.items()), tuple((k, str(v)) for k, v in consts.items()),
                   tuple(options.items()))
            LAUNCHES.setdefault(key, (self.fn, sig, consts, options))
        return launch


KERNELS: list = []  # every "*_kernel" JITFunction of the three kernel files


def _install(module):
    for name in dir(module):
        obj = getattr(module, name)
        if isinstance(obj, triton.runtime.JITFunction) and name.endswith("_kernel"):
            KERNELS.append(name)
            setattr(module, name, Recorder(obj))


def record(quick: bool) -> None:
    for m in (LL, LG, LS):
        _install(m)
    g = torch.Generator().manual_seed(0)
    S, T, H, V = 4, 48, 256, 3000
    labels = torch.randint(0, V, (S, T), generator=g)
    labels[:, :20] = -100
    plan = build_plan(labels, V, -100, labels.shape, torch.device("cpu"), pairs=False)
    N, Nc = S * T, plan.num_tokens
    grad_seq = torch.ones(S)
    dtypes = [torch.bfloat16] if quick else [torch.bfloat16, torch.float16, torch.float32]

    # fused-linear path: every backward layout (output reuse with dW tail / fresh accumulator, no reuse,
    # token-outer), bias/softcap/filter on and off, frozen head. Small scratch caps force several steps.
    for dt in dtypes:
        hidden, weight = torch.randn(N, H).to(dt), torch.randn(V, H).to(dt)
        bias = torch.randn(V).to(dt)
        lse = torch.zeros(Nc)
        for b, softcap, temp in ((None, None, 1.0), (bias, 30.0, 0.7)):
            LL.linear_forward(hidden, weight, b, plan, softcap, temp, save_lse=True)
            LL.linear_forward(hidden, weight, b, plan, softcap, temp, save_lse=False)
            for over in ({}, {"reuse_outputs": False}, {"outer": "token"}, {"scratch_bytes": Nc * 2 * 256}):
                LL.CONFIG_OVERRIDES = {"scratch_bytes": 2**20, **over}
                for eps in (0.0, 1e-6):
                    LL.linear_backward(hidden, weight, b, plan, softcap, temp, lse, grad_seq, True, True,
                                       b is not None, grad_filter_eps=eps)
                LL.linear_backward(hidden, weight, b, plan, softcap, temp, lse, grad_seq, True, False, False)
            LL.CONFIG_OVERRIDES = {}

    # logits path: dtypes (float64 too), transforms, strided rows and columns.
    for dt in dtypes + ([] if quick else [torch.float64]):
        logits = torch.randn(N, V).to(dt)
        for softcap, temp in ((None, 1.0), (30.0, 0.7)):
            for x in (logits, torch.randn(N, V + 8).to(dt)[:, :V], torch.randn(V, N).to(dt).t()):
                LG.logits_forward(x, plan, softcap, temp)
                LG.logits_backward(x, plan, softcap, temp, torch.zeros(Nc, dtype=torch.promote_types(dt, torch.float32)),
                                   grad_seq.to(torch.promote_types(dt, torch.float32)), torch.empty_like(logits))

    # loss step: every loss type with the reference and SPO on, fp32; a few without / in float64.
    counts = torch.full((S,), 10)
    for lt in LOSS_TYPES:
        cfg = PreferenceLossConfig(loss_type=lt, spo_lambda=1.0, sft_weight=0.1)
        pol = torch.randn(S)
        LS.loss_step(pol, counts, torch.randn(S), cfg, anchor=torch.randn(S // 2))
        if not quick and lt in ("sigmoid", "ipo", "bco_pair"):
            LS.loss_step(pol.double(), counts, None, PreferenceLossConfig(loss_type=lt, reference_free=True))
            LS.loss_step(pol, counts, torch.randn(S), cfg.replace(spo_lambda=0.0),
                         bco_delta=torch.zeros(()) if lt == "bco_pair" else None)


def main() -> int:
    quick = "--quick" in sys.argv
    record(quick)
    print(f"triton {triton.__version__}: {len(LAUNCHES)} kernel variants to compile for sm_90", flush=True)
    missing = sorted(set(KERNELS) - {fn.__name__ for fn, *_ in LAUNCHES.values()})
    if missing:
        print(f"FAILED: no launch of {missing} was recorded: add a call that uses it to record()")
        return 1
    t_all = time.time()
    for fn, sig, consts, options in LAUNCHES.values():
        t0 = time.time()
        src = ASTSource(fn=fn, signature=sig, constexprs=consts)
        try:
            k = triton.compile(src, target=TARGET, options=dict(options))
        except Exception as e:  # noqa: BLE001 - report which variant, then fail
            print(f"FAILED {fn.__name__} {consts} {options}: {type(e).__name__}: {str(e)[:2000]}", flush=True)
            return 1
        shown = {k_: v for k_, v in consts.items() if not k_.startswith("BLOCK")}
        print(f"ok {fn.__name__:28s} {time.time() - t0:5.1f}s shared={k.metadata.shared:6d} {shown} {options}",
              flush=True)
    print(f"all {len(LAUNCHES)} variants compiled in {time.time() - t_all:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
