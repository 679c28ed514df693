"""Compile every kernel variant the host launchers launch, for an H100/H200 (sm_90), on a machine without a GPU,
and report each one's registers, spills, shared memory and MMA instructions.

Runs on the CPU only (no kernel executes). What it does:

1. Record. The host launchers (``linear_forward``/``linear_backward``, ``logits_forward``/``logits_backward``,
   ``loss_step``) run at three shape sets with every ``*_kernel`` JITFunction of the kernel files replaced
   by a :class:`LaunchRecorder`. A launch goes through the JIT's own code, as ``JITFunction.run`` does on a
   GPU: the binder from ``create_function_from_signature`` (argument binding, defaults, and per argument
   ``native_specialize_impl``: pointer alignment to 16 bytes, ints divisible by 16, ints equal to 1 turned
   into constexprs, ``do_not_specialize``), then ``JITFunction._pack_args`` (options, signature, constexprs,
   ``tt.divisibility`` attributes), for the CUDA backend of an sm_90 target. Each distinct compile request
   is one variant. Shape sets:

   - ``test``: small shapes that reach every code path (dtypes, bias/softcap/temperature, every backward
     layout, the gradient filter, strided logits, every loss type);
   - ``G1``: fused-linear path of a Llama-3-8B head: 16 sequences x 2048 tokens (N = 32768 rows), the second
     half of each one completion (Nc = 16384), H = 4096, V = 128256, bf16 hidden and weight, no bias:
     policy forward (``save_lse``), backward of a trainable head (dhidden + dW) and of a frozen one
     (dhidden only), reference forward; and the loss step of those 8 pairs (DPO + SPO);
   - ``G2``: logits path on packed bf16 logits ``[32768, 128256]`` with the same plan: forward and the
     in-place backward (``out`` is ``logits``).

   The tensors are on the ``meta`` device: real shapes, strides, dtypes and storage offsets, no memory (G2's
   logits alone would be 8 GB). A meta tensor's ``data_ptr()`` is its byte offset into its storage, i.e.
   the address of a view relative to a base that the CUDA caching allocator aligns to 512 bytes, so the
   JIT's alignment test (``data_ptr() % 16``) gives what it gives on the GPU, views into larger buffers
   included. Integers (sizes, strides, grid-derived counts) are the launchers' own host arithmetic. Device
   queries: the SM count is pinned to an H100 SXM's / H200's 132 (``SM_COUNT``); the tuning table is keyed by
   the CUDA device's name and has no entry for a meta tensor, so the launchers use their built-in configs.

2. Compile. Each variant is compiled exactly as ``JITFunction._do_compile`` does it, ``triton.compile(
   ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32), options=...)`` (front end,
   TTIR -> TTGIR -> LLVM -> PTX, then Triton's own ptxas call for ``sm_90a``), in a pool of processes, in a
   fresh Triton cache (a cold compile: ptxas runs, and its ``-v`` log is captured through Triton's
   ``knobs.nvidia.dump_ptxas_log``).

3. Report, per variant: registers per thread and spill stores/loads (ptxas ``-v``, the options Triton passes
   to it), shared memory (the compiled kernel's metadata: what the launch requests), and whether the kernel
   uses Hopper's warpgroup MMA (``wgmma.mma_async`` in the PTX, ``HGMMA`` in the SASS), ``mma.sync`` only,
   or no MMA. A spill probe recompiles the variant with the most registers under a low ``maxnreg`` and
   requires the parser to see its spills (so that "no spills" cannot come from a broken parser).

Usage::

    python tests/compile_for_gpu.py [--sets test,G1,G2] [--jobs N] [--json OUT.json] [--table OUT.md]
                                    [--compare OTHER.json] [--distinct] [--pairwise]

``--distinct`` compiles one test-set variant per code path: variants that differ only in which integer
arguments are divisible by 16 are left out. ``--pairwise`` (what CI's test runs; ``SPO_LONG_TESTS=1`` runs
them all) then keeps, per kernel, the test-set variants that cover every value of every code-path feature
(dtype, warps, stages, each constexpr, the ints specialized to 1, the unaligned pointers) and every pair of
values that the launchers combine, the way the conformance tests cover their options; the benchmark sets
G1 / G2 are always compiled whole. It reads the SASS (HGMMA) of the benchmark sets' variants only.

Prints one line per variant; exits 1 if a variant fails to compile, a kernel of the kernel files is never
launched, or the spill probe fails. Spills are reported, not judged: ``tests/test_compile_for_gpu.py``
runs this script and fails on any spill. ``--table`` writes the markdown table committed as
``benchmarks/results/sm90-kernels.md``; ``--compare`` adds the differences against a ``--json`` written
under another Triton version.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import itertools
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import types
from concurrent.futures import ProcessPoolExecutor, as_completed

os.environ.pop("TRITON_INTERPRET", None)  # must be unset before triton is imported: real JITFunctions

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from spo_kernels.config import LOSS_TYPES, PreferenceLossConfig  # noqa: E402
from spo_kernels.kernels import linear_backward as LB  # noqa: E402
from spo_kernels.kernels import linear_config as LC  # noqa: E402
from spo_kernels.kernels import linear_forward as LF  # noqa: E402
from spo_kernels.kernels import logits_logprobs as LG  # noqa: E402
from spo_kernels.kernels import loss_step as LS  # noqa: E402
from spo_kernels.kernels import triton_helpers as TH  # noqa: E402
from spo_kernels.layout import TokenPlan, build_plan  # noqa: E402
from spo_kernels.kernels.types import KernelOptions, LogitTransform  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)  # what driver.active.get_current_target() returns on an H100 / H200
BACKEND = make_backend(TARGET)
SM_COUNT = 132  # H100 SXM and H200; the linear forward sizes its vocabulary splits and groups from it
SHAPE_SETS = ("test", "G1", "G2")
# LinearKernelConfig fields that record() may override: they change the backward's streaming order and
# buffer sizes (so which launches happen), never a kernel's tiles, warps or stages.
NON_TILE_FIELDS = {"scratch_bytes", "outer", "reuse_outputs"}
SPILL_PROBE_MAXNREG = 32
SASS_AT_TEST_SHAPES = True  # --pairwise: False (the SASS of the test shapes' wgmma variants is not read)


# ---------------------------------------------------------------------------------------------------------
# 1. record: the JIT's binding and specialization, without a GPU
# ---------------------------------------------------------------------------------------------------------

def _run_option_kwargs(fn: JITFunction, kwargs: dict) -> dict:
    """The option keywords ``JITFunction.run`` adds to a launch's kwargs before binding (its first lines).

    triton 3.6: ``debug``, ``instrumentation_mode``; 3.9 also ``fpsan_homomorphic_casts``. Checked against
    the installed ``run`` by :func:`_check_run_preamble`, so that one added by a later version fails loudly."""
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    if hasattr(knobs.compilation, "fpsan_homomorphic_casts"):
        kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    return kwargs


def _check_run_preamble() -> None:
    import inspect
    set_by_run = set(re.findall(r'kwargs\["(\w+)"\]\s*=', inspect.getsource(JITFunction.run)))
    set_here = set(_run_option_kwargs(types.SimpleNamespace(debug=None), {}))
    if set_by_run != set_here:
        raise RuntimeError(f"JITFunction.run of triton {triton.__version__} sets the launch options "
                           f"{sorted(set_by_run)}, this script {sorted(set_here)}: update _run_option_kwargs")


@dataclasses.dataclass
class Variant:
    """One compile request: what ``JITFunction._do_compile`` would hand to ``triton.compile``."""

    fn: JITFunction
    signature: dict
    constexprs: dict  # {(arg index,): value}
    attrs: dict  # {(arg index,): [["tt.divisibility", 16]]}
    options: dict  # the backend options (CUDAOptions fields)
    shape_sets: list

    @property
    def name(self) -> str:
        return self.fn.__name__

    def describe(self) -> dict:
        """Plain-data description (JSON), and the key matched across Triton versions."""
        names = self.fn.arg_names
        consts = {names[k[0]]: _plain(v) for k, v in self.constexprs.items()}
        declared = {p.name for p in self.fn.params if p.is_constexpr}
        ptrs = [n for n, t in self.signature.items() if t.startswith("*")]
        aligned = {names[k[0]] for k, a in self.attrs.items() if ["tt.divisibility", 16] in [list(x) for x in a]}
        return {
            "kernel": self.name,
            "shape_sets": self.shape_sets,
            "dtype": self.signature[ptrs[0]][1:] if ptrs else "-",
            "pointer_dtypes": list(dict.fromkeys(self.signature[n][1:] for n in ptrs
                                                 if self.signature[n][1:2] in ("f", "b"))),
            "constexprs": {n: v for n, v in consts.items() if n in declared},
            "ints_equal_1": sorted(n for n in consts if n not in declared),
            "divisible_by_16": sorted(n for n in aligned if not self.signature[n].startswith("*")),
            "ints_not_divisible_by_16": sorted(n for n, t in self.signature.items()
                                               if t in ("i32", "i64") and n not in aligned),
            "unaligned_pointers": sorted(n for n in ptrs if n not in aligned),
            "signature": {n: t for n, t in self.signature.items() if t != "constexpr"},
            "num_warps": self.options["num_warps"],
            "num_stages": self.options["num_stages"],
        }


def _plain(v):
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    return str(v)  # tl.dtype -> "fp32"


def variant_key(d: dict) -> str:
    """Identity of a variant across Triton versions (what it is, not how a version spells its options)."""
    return json.dumps([d["kernel"], d["signature"], d["constexprs"], d["ints_equal_1"], d["divisible_by_16"],
                       d["unaligned_pointers"], d["num_warps"], d["num_stages"]], sort_keys=True)


VARIANTS: dict = {}  # dedup key -> Variant, in first-launch order
LEFT_OUT: list = []  # descriptions of the variants --distinct / --pairwise did not compile, with "left_out": why
KERNELS: list = []  # every "*_kernel" JITFunction of the kernel files (KERNEL_MODULES)
_current_set = ["test"]


class LaunchRecorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` binds and specializes the
    arguments with the JIT's own binder for the sm_90 CUDA backend and records the compile request."""

    def __init__(self, fn: JITFunction):
        self.fn = fn
        self.binder = create_function_from_signature(fn.signature, fn.params, BACKEND)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            kwargs = _run_option_kwargs(self.fn, kwargs)
            bound_args, specialization, options = self.binder(*args, **kwargs)
            options, signature, constexprs, attrs = self.fn._pack_args(BACKEND, kwargs, bound_args,
                                                                       specialization, options)
            key = repr((self.fn.__name__, signature, sorted(constexprs.items()), sorted(attrs.items()),
                        sorted(options.__dict__.items())))
            v = VARIANTS.get(key)
            if v is None:
                v = VARIANTS[key] = Variant(self.fn, signature, constexprs, attrs, dict(options.__dict__), [])
            if _current_set[0] not in v.shape_sets:
                v.shape_sets.append(_current_set[0])
        return launch


# The modules whose launchers launch kernels (linear_logprobs only re-exports the fused-linear ones).
KERNEL_MODULES = (LF, LB, LG, LS)


def _install(module):
    for name in dir(module):
        obj = getattr(module, name)
        if isinstance(obj, JITFunction) and name.endswith("_kernel"):
            KERNELS.append(name)
            setattr(module, name, LaunchRecorder(obj))


def _meta(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def _meta_plan(plan: TokenPlan) -> TokenPlan:
    """The plan's tensors as meta tensors (same shapes and dtypes): the launchers see one device."""
    return dataclasses.replace(plan, **{f.name: getattr(plan, f.name).to("meta") for f in dataclasses.fields(plan)
                                        if isinstance(getattr(plan, f.name), torch.Tensor)})


def _set_linear_overrides(over: dict) -> None:
    if set(over) - NON_TILE_FIELDS:
        raise ValueError(f"record() may only override {sorted(NON_TILE_FIELDS)}, not {sorted(set(over))}")
    LC.CONFIG_OVERRIDES = dict(over)


def record_test_shapes() -> None:
    """Small shapes through every code path: dtypes, bias / softcap / temperature, every backward layout, the
    gradient filter, strided logits, every loss type."""
    g = torch.Generator().manual_seed(0)
    S, T, H, V = 4, 48, 256, 3000
    labels = torch.randint(0, V, (S, T), generator=g)
    labels[:, :20] = -100
    plan = _meta_plan(build_plan(labels, V, -100, labels.shape, torch.device("cpu"), pairs=False))
    N, Nc = S * T, plan.num_tokens
    grad_seq = _meta(S)
    dtypes = [torch.bfloat16, torch.float16, torch.float32]

    # fused-linear path: every backward layout (output reuse with dW tail / fresh accumulator, no reuse,
    # token-outer), bias/softcap/filter on and off, frozen head. Small scratch caps force several steps.
    for dt in dtypes:
        hidden, weight, bias = _meta(N, H, dtype=dt), _meta(V, H, dtype=dt), _meta(V, dtype=dt)
        lse = _meta(Nc)
        for b, softcap, temp in ((None, None, 1.0), (bias, 30.0, 0.7)):
            LF.linear_forward(hidden, weight, b, plan, transform=LogitTransform(softcap=softcap, temperature=temp),
                              options=KernelOptions(), save_lse=True)
            LF.linear_forward(hidden, weight, b, plan, transform=LogitTransform(softcap=softcap, temperature=temp),
                              options=KernelOptions(), save_lse=False)
            for over in ({}, {"reuse_outputs": False}, {"outer": "token"}, {"scratch_bytes": Nc * 2 * 256}):
                _set_linear_overrides({"scratch_bytes": 2**20, **over})
                for eps in (0.0, 1e-6):
                    LB.linear_backward(hidden, weight, b, plan,
                                       transform=LogitTransform(softcap=softcap, temperature=temp),
                                       options=KernelOptions(grad_filter_eps=eps), lse=lse, grad_seq=grad_seq,
                                       need_hidden=True, need_weight=True, need_bias=b is not None)
                LB.linear_backward(hidden, weight, b, plan,
                                   transform=LogitTransform(softcap=softcap, temperature=temp),
                                   options=KernelOptions(), lse=lse, grad_seq=grad_seq, need_hidden=True,
                                   need_weight=False, need_bias=False)
            _set_linear_overrides({})

    # Token weights and the per-token statistics (SPEC 8): the weighted sums and gradients and the STATS
    # forwards of both paths, every dtype, with and without bias / softcap.
    weights = torch.rand(labels.shape, generator=g)
    wplan = _meta_plan(build_plan(labels, V, -100, labels.shape, torch.device("cpu"), pairs=False,
                                  token_weights=weights))
    stats = KernelOptions(token_stats=True)
    for dt in dtypes:
        hidden, weight, bias = _meta(N, H, dtype=dt), _meta(V, H, dtype=dt), _meta(V, dtype=dt)
        for b, tf in ((None, LogitTransform()), (bias, LogitTransform(multiplier=0.5, softcap=30.0, temperature=0.7))):
            LF.linear_forward(hidden, weight, b, wplan, transform=tf, options=stats, save_lse=True)
            LB.linear_backward(hidden, weight, b, wplan, transform=tf, options=KernelOptions(), lse=_meta(Nc),
                               grad_seq=grad_seq, need_hidden=True, need_weight=True, need_bias=b is not None)
    for dt in dtypes + [torch.float64]:
        acc = torch.promote_types(dt, torch.float32)
        logits = _meta(N, V, dtype=dt)
        for tf in (LogitTransform(), LogitTransform(multiplier=0.5, softcap=30.0, temperature=0.7)):
            LG.logits_forward(logits, wplan, transform=tf, options=stats)
            LG.logits_backward(logits, wplan, transform=tf, lse=_meta(Nc, dtype=acc), grad_seq=grad_seq.to(acc),
                               out=torch.empty_like(logits))

    # logits path: dtypes (float64 too), transforms, strided rows and columns.
    for dt in dtypes + [torch.float64]:
        acc = torch.promote_types(dt, torch.float32)
        logits = _meta(N, V, dtype=dt)
        for softcap, temp in ((None, 1.0), (30.0, 0.7)):
            for x in (logits, _meta(N, V + 8, dtype=dt)[:, :V], _meta(V, N, dtype=dt).t()):
                LG.logits_forward(x, plan, transform=LogitTransform(softcap=softcap, temperature=temp),
                                  options=KernelOptions())
                LG.logits_backward(x, plan, transform=LogitTransform(softcap=softcap, temperature=temp),
                                   lse=_meta(Nc, dtype=acc), grad_seq=grad_seq.to(acc), out=torch.empty_like(logits))

    # loss step: every loss type with the reference and SPO on, fp32; a few without / in float64.
    counts = _meta(S, dtype=torch.int64)
    for lt in LOSS_TYPES:
        cfg = PreferenceLossConfig(loss_type=lt, spo_lambda=1.0, sft_weight=0.1)
        pol = _meta(S, dtype=torch.float64)  # the backends' per-sequence sums are float64
        LS.loss_step(pol, counts, _meta(S), cfg, anchor=_meta(S // 2))
        LS.loss_step(_meta(S), counts, _meta(S), cfg, anchor=_meta(S // 2))  # fp32 sums (a caller's own)
        if lt in ("sigmoid", "ipo", "bco_pair"):
            LS.loss_step(pol, counts, None, PreferenceLossConfig(loss_type=lt, reference_free=True))
            LS.loss_step(pol, counts, _meta(S), cfg.replace(spo_lambda=0.0),
                         bco_delta=_meta() if lt == "bco_pair" else None)


# The benchmark shapes G1 / G2: 8 pairs x 2048 tokens, half of each sequence completion.
G_SEQS, G_SEQ_LEN, G_HIDDEN, G_VOCAB = 16, 2048, 4096, 128256


def _benchmark_labels():
    labels = torch.zeros(G_SEQS, G_SEQ_LEN, dtype=torch.int64)
    labels[:, : G_SEQ_LEN // 2] = -100  # prompt
    return labels


def record_g1() -> None:
    """Fused-linear path at G1 (padded layout [16, 2048]), bf16, the built-in configs."""
    labels = _benchmark_labels()
    plan = _meta_plan(build_plan(labels, G_VOCAB, -100, labels.shape, torch.device("cpu")))
    N, S = plan.num_rows, plan.num_seqs
    bf16 = torch.bfloat16
    hidden, weight = _meta(N, G_HIDDEN, dtype=bf16), _meta(G_VOCAB, G_HIDDEN, dtype=bf16)
    _, lse, _ = LF.linear_forward(hidden, weight, None, plan, transform=LogitTransform(), options=KernelOptions(),
                                  save_lse=True)  # policy
    LF.linear_forward(_meta(N, G_HIDDEN, dtype=bf16), _meta(G_VOCAB, G_HIDDEN, dtype=bf16), None, plan,
                      transform=LogitTransform(), options=KernelOptions(), save_lse=False)  # reference
    grad_seq = _meta(S)
    LB.linear_backward(hidden, weight, None, plan, transform=LogitTransform(), options=KernelOptions(), lse=lse,
                       grad_seq=grad_seq, need_hidden=True, need_weight=True, need_bias=False)  # trainable
    LB.linear_backward(hidden, weight, None, plan, transform=LogitTransform(), options=KernelOptions(), lse=lse,
                       grad_seq=grad_seq, need_hidden=True, need_weight=False, need_bias=False)  # frozen head
    LF.linear_forward(hidden, weight, None, plan, transform=LogitTransform(), options=KernelOptions(token_stats=True),
                      save_lse=True)  # policy with the per-token statistics
    cfg = PreferenceLossConfig(loss_type="sigmoid", spo_lambda=1.0)  # DPO + SPO, reference anchor
    LS.loss_step(_meta(S, dtype=torch.float64), plan.counts, _meta(S), cfg, anchor=_meta(S // 2))


def record_g2() -> None:
    """Logits path at G2 (packed layout [32768], cu_seqlens), bf16 logits [32768, 128256], in-place backward."""
    labels = _benchmark_labels().reshape(-1)
    cu_seqlens = torch.arange(0, G_SEQS + 1, dtype=torch.int32) * G_SEQ_LEN
    plan = _meta_plan(build_plan(labels, G_VOCAB, -100, labels.shape, torch.device("cpu"), cu_seqlens))
    logits = _meta(plan.num_rows, G_VOCAB, dtype=torch.bfloat16)
    _, lse, _ = LG.logits_forward(logits, plan, transform=LogitTransform(), options=KernelOptions())
    LG.logits_backward(logits, plan, transform=LogitTransform(), lse=lse, grad_seq=_meta(plan.num_seqs), out=logits)
    LG.logits_forward(logits, plan, transform=LogitTransform(), options=KernelOptions(token_stats=True))  # statistics


RECORDERS = {"test": record_test_shapes, "G1": record_g1, "G2": record_g2}


def keep_distinct() -> int:
    """Drop the test-set variants that differ from a kept one only in which integer arguments are divisible
    by 16 (their code path is the same; the alignment of pointers and the ints specialized to 1 still tell
    variants apart); every variant of the benchmark sets G1 / G2 is kept. Returns how many were dropped."""
    seen, kept = set(), {}
    for benchmark_first in (True, False):
        for key, v in VARIANTS.items():
            if (set(v.shape_sets) != {"test"}) != benchmark_first:
                continue
            d = v.describe()
            code_path = json.dumps([d["kernel"], d["signature"], d["constexprs"], d["ints_equal_1"],
                                    d["unaligned_pointers"], d["num_warps"], d["num_stages"]], sort_keys=True)
            if benchmark_first or code_path not in seen:
                kept[key] = v
            seen.add(code_path)
    return _keep(kept, "differs from a compiled variant only in integer divisibility")


def _code_path_features(d: dict) -> dict:
    """What selects a variant's code path: dtype, launch options, every constexpr, the ints specialized to 1
    and the unaligned pointers (one feature each, JSON-encoded values)."""
    f = {"dtype": d["dtype"], "num_warps": d["num_warps"], "num_stages": d["num_stages"],
         "ints_equal_1": json.dumps(d["ints_equal_1"]), "unaligned_pointers": json.dumps(d["unaligned_pointers"])}
    f.update({f"constexpr {k}": json.dumps(v) for k, v in d["constexprs"].items()})
    return f


def feature_pairs(d: dict) -> set:
    """Every code-path feature value of a variant, alone and in pairs: what ``--pairwise`` covers."""
    items = sorted(_code_path_features(d).items())
    return {(a,) for a in items} | set(itertools.combinations(items, 2))


def keep_pairwise() -> int:
    """Keep, per kernel, every benchmark-set (G1 / G2) variant and a greedy subset of the test-set ones in
    which every value of every code-path feature (:func:`_code_path_features`), and every pair of values of
    two features that some variant combines, appears at least once: what a front-end or codegen error of one
    flag, or of two flags together, needs to show. Deterministic (ties go to the first launched). Returns
    how many were dropped."""
    kept = {}
    for kernel in dict.fromkeys(v.name for v in VARIANTS.values()):
        mine = [(k, v) for k, v in VARIANTS.items() if v.name == kernel]
        covers = {k: feature_pairs(v.describe()) for k, v in mine}
        chosen = [k for k, v in mine if set(v.shape_sets) != {"test"}]
        covered = set().union(set(), *(covers[k] for k in chosen))
        needed = set().union(*covers.values())
        while needed - covered:
            best = max((k for k, _ in mine), key=lambda k: len(covers[k] - covered))  # max: first of the ties
            chosen.append(best)
            covered |= covers[best]
        kept.update((k, VARIANTS[k]) for k in chosen)
    return _keep(kept, "its code-path features are covered pairwise")


def _keep(kept: dict, why: str) -> int:
    """Keep only ``kept`` in VARIANTS (in first-launch order); the others go to LEFT_OUT. Returns how many."""
    order = list(VARIANTS)
    LEFT_OUT.extend(dict(v.describe(), left_out=why) for k, v in VARIANTS.items() if k not in kept)
    dropped = len(VARIANTS) - len(kept)
    VARIANTS.clear()
    VARIANTS.update(sorted(kept.items(), key=lambda kv: order.index(kv[0])))
    return dropped


def record(shape_sets) -> None:
    _check_run_preamble()
    for m in KERNEL_MODULES:
        _install(m)
    if not callable(getattr(TH, "num_sms", None)):
        raise RuntimeError("triton_helpers.num_sms is gone: pin the SM count wherever the launchers query it now")
    TH.num_sms = lambda device: SM_COUNT
    for name in shape_sets:
        _current_set[0] = name
        RECORDERS[name]()


# ---------------------------------------------------------------------------------------------------------
# 2. compile and 3. report
# ---------------------------------------------------------------------------------------------------------

_PTXAS_USED = re.compile(r"ptxas\S* info\s*: Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas_log(log: str) -> dict:
    """Registers per thread, stack frame and spill bytes of the (single) kernel in a ``ptxas -v`` log."""
    used, spill = _PTXAS_USED.findall(log), _PTXAS_SPILL.findall(log)
    if len(used) != 1 or len(spill) != 1:
        raise RuntimeError(f"expected one kernel in the ptxas -v log, found {len(used)} register lines and "
                           f"{len(spill)} spill lines:\n{log[-3000:]}")
    frame, stores, loads = map(int, spill[0])
    return {"registers": int(used[0]), "stack_frame": frame, "spill_stores": stores, "spill_loads": loads}


def compile_variant(index: int, maxnreg=None) -> dict:
    """Compile variant ``index`` (as ``JITFunction._do_compile`` does) and measure it. Runs in a worker."""
    v = list(VARIANTS.values())[index]
    options = dict(v.options)
    if maxnreg is not None:
        options["maxnreg"] = maxnreg
    t0 = time.time()
    out = {"index": index}
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(ASTSource(v.fn, v.signature, v.constexprs, v.attrs), target=TARGET,
                                    options=options)
        out.update(parse_ptxas_log(log.getvalue()))
        ptx = kernel.asm["ptx"]
        wgmma = "wgmma.mma_async" in ptx
        # The SASS (cuobjdump, about as long as the compile itself) only where the PTX has wgmma: HGMMA there;
        # the quick run reads it at the benchmark shapes only (None: not read).
        sass = wgmma and (SASS_AT_TEST_SHAPES or v.shape_sets != ["test"])
        hgmma = ("HGMMA" in kernel.asm["sass"]) if sass else None
    except Exception as e:  # noqa: BLE001 - reported with the variant, the run fails at the end
        out["error"] = f"{type(e).__name__}: {str(e)[:3000]}"
        return out
    out.update(
        shared=int(kernel.metadata.shared),
        wgmma=wgmma,
        hgmma_sass=hgmma,
        mma_sync="mma.sync" in ptx,
        ptx_instructions=ptx_instruction_count(ptx),
        ptxas_warnings=sorted({ln.strip() for ln in log.getvalue().splitlines() if "warning" in ln.lower()}),
        compile_s=round(time.time() - t0, 2),
    )
    return out


def ptx_instruction_count(ptx: str) -> int:
    """Instructions in a PTX listing (statements ending in ';' that are not directives): with the registers,
    what tells whether two builds of a variant compiled to the same code."""
    count = 0
    for line in ptx.splitlines():
        line = line.strip()
        if line.endswith(";") and not line.startswith((".", "//")):
            count += 1
    return count


def _mma_kind(r: dict) -> str:
    if r["wgmma"]:
        return "wgmma"
    return "mma.sync" if r["mma_sync"] else "none"


def _line(d: dict) -> str:
    return (f"{d['kernel']:26s} {'/'.join(d['shape_sets']):11s} {d['dtype']:5s} w{d['num_warps']} "
            f"s{d['num_stages']} regs={d['registers']:3d} spill={d['spill_stores']}/{d['spill_loads']} "
            f"smem={d['shared']:6d} {_mma_kind(d):8s} {d['compile_s']:5.1f}s {_fmt_consts(d['constexprs'])} "
            f"[{_fmt_spec(d)}]")


def compile_all(jobs: int) -> list:
    """Compile every variant in a pool of ``jobs`` processes (forked: they inherit the recorded variants; a
    worker that dies fails the run instead of hanging it)."""
    n = len(VARIANTS)
    described = [v.describe() for v in VARIANTS.values()]
    results = [None] * n
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        for fut in as_completed([pool.submit(compile_variant, i) for i in range(n)]):
            r = fut.result()
            d = results[r["index"]] = {**described[r["index"]], **r}
            if "error" in d:
                print(f"FAILED {d['kernel']} {d['shape_sets']} {d['constexprs']}: {d['error']}", flush=True)
            else:
                print("ok " + _line(d), flush=True)
    return results


def spill_probe(results: list) -> dict:
    """Recompile the variant with the most registers under ``maxnreg`` = SPILL_PROBE_MAXNREG: the parser
    must report its spills, else the "no spills" of the other variants means nothing."""
    # wgmma kernels cannot go below ~90 registers (ptxas refuses): probe the largest kernel without.
    candidates = [r for r in results if "error" not in r and not r["wgmma"]
                  and r["registers"] > 2 * SPILL_PROBE_MAXNREG]
    if not candidates:
        return {"detected": False, "kernel": "-", "maxnreg": SPILL_PROBE_MAXNREG,
                "error": f"no variant without wgmma uses more than {2 * SPILL_PROBE_MAXNREG} registers"}
    best = max(candidates, key=lambda r: r["registers"])
    probe = compile_variant(best["index"], maxnreg=SPILL_PROBE_MAXNREG)
    probe.update(kernel=best["kernel"], maxnreg=SPILL_PROBE_MAXNREG, registers_uncapped=best["registers"])
    probe["detected"] = "error" not in probe and probe["spill_stores"] + probe["spill_loads"] > 0
    return probe


def _tool_version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
        return out.strip().splitlines()[-2].split(",")[-1].strip()  # "V12.8.93"
    except Exception:  # noqa: BLE001
        return "unknown"


def _ptxas_version() -> str:
    from triton.backends.nvidia.compiler import get_ptxas
    return _tool_version(get_ptxas(TARGET.arch).path)


# ---------------------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------------------

_YES_NO = {True: "yes", False: "no", None: "-"}


def _fmt_spec(r: dict) -> str:
    """The JIT's specializations of a variant's int and pointer arguments, compactly."""
    parts = [f"=1: {', '.join(r['ints_equal_1'])}" if r["ints_equal_1"] else "",
             f"not %16: {', '.join(r['ints_not_divisible_by_16'])}" if r["ints_not_divisible_by_16"] else "",
             f"unaligned: {', '.join(r['unaligned_pointers'])}" if r["unaligned_pointers"] else ""]
    return "; ".join(p for p in parts if p)


def _fmt_consts(c: dict) -> str:
    def f(v):
        return int(v) if isinstance(v, bool) else v
    return " ".join(f"{k}={f(v)}" for k, v in c.items())


def _table_row(r: dict) -> str:
    return (f"| {r['kernel']} | {', '.join(r['shape_sets'])} | {'/'.join(r['pointer_dtypes'])} | "
            f"{_fmt_consts(r['constexprs'])} | {_fmt_spec(r)} | {r['num_warps']} | {r['num_stages']} | "
            f"{r['registers']} | {r['spill_stores']} / {r['spill_loads']} | {r['shared']} | {_mma_kind(r)} | "
            f"{_YES_NO[r['hgmma_sass']]} |")


def write_table(path: str, report: dict, compare=None) -> None:
    rows = sorted(report["variants"], key=lambda r: (r["kernel"], [SHAPE_SETS.index(s) for s in r["shape_sets"]],
                                                     r["pointer_dtypes"], _fmt_consts(r["constexprs"]),
                                                     _fmt_spec(r)))
    probe = report["spill_probe"]
    command = f"`python tests/compile_for_gpu.py --table {path}`"
    if compare is not None:
        command = (f"`python tests/compile_for_gpu.py --table {path} --compare OTHER.json`, OTHER.json being the "
                   f"`--json OTHER.json` report of the same script run under triton {compare['triton']} (without "
                   "`--compare`, no comparison section)")
    lines = [
        "# Kernel variants compiled for sm_90 (H100 / H200): registers, spills, shared memory, MMA",
        "",
        f"Regenerate with {command}; no GPU is needed. This run: triton {report['triton']} (its ptxas "
        f"{report['ptxas']}), torch {report['torch']}; target `GPUTarget(\"cuda\", 90, 32)`, compiled for "
        f"`sm_90a`; SM count {SM_COUNT}.",
        "",
        "Every variant the host launchers launch at three shape sets, bound and specialized by the JIT's own "
        "code (see the script's docstring), compiled cold, with the launchers' built-in configs (what they "
        "launch when the tuning table has no entry for the GPU). Shape sets: **G1** fused-linear at a "
        "Llama-3-8B head (16 x 2048 rows, Nc = 16384, H = 4096, V = 128256, bf16; policy forward + backward "
        "with and without dW, reference forward, loss step); **G2** logits path on packed bf16 logits "
        "[32768, 128256] (forward, in-place backward); **test** the small shapes that reach every code path.",
        "",
        "Columns: dtypes = element types of the kernel's floating-point pointer arguments, in argument order; "
        "specialization = the JIT's specialization of the runtime arguments: `=1` ints equal to 1 (made "
        "constants), `not %16` ints not divisible by 16 (all others carry `tt.divisibility=16`), `unaligned` "
        "pointers not 16-byte aligned (all others are); regs = registers per thread and spill = spill stores / "
        "loads in bytes (ptxas `-v`); smem = shared memory the launch requests, bytes (Triton's metadata); "
        "MMA = `wgmma` (Hopper warpgroup MMA: `wgmma.mma_async` in the PTX), `mma.sync` or none; HGMMA = "
        "`HGMMA` in the SASS (disassembled where the PTX has wgmma).",
        "",
        f"{len(rows)} variants. Spills: {'; '.join(report['spilling_variants']) or 'none'}. Spill probe: "
        f"{probe['kernel']} recompiled with maxnreg={probe['maxnreg']} reports {probe.get('spill_stores')} / "
        f"{probe.get('spill_loads')} bytes spilled (the parser sees spills when there are some).",
        "",
    ]
    header = ["| kernel | shapes | dtypes | constexprs | specialization | warps | stages | regs | spill | smem | MMA "
              "| HGMMA |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    bench = [r for r in rows if set(r["shape_sets"]) & {"G1", "G2"}]
    lines += ["## At the benchmark shapes (G1, G2)", "", *header, *map(_table_row, bench), ""]
    lines += ["## Per kernel", "", "| kernel | variants | registers (min-max) | max smem | MMA |",
              "|---|---|---|---|---|"]
    by_kernel: dict = {}
    for r in rows:
        by_kernel.setdefault(r["kernel"], []).append(r)
    for k, rs in by_kernel.items():
        regs = [r["registers"] for r in rs]
        kinds = sorted({_mma_kind(r) for r in rs})
        lines.append(f"| {k} | {len(rs)} | {min(regs)}-{max(regs)} | {max(r['shared'] for r in rs)} | "
                     f"{', '.join(kinds)} |")
    lines += ["", "## ptxas warnings", ""]
    lines += [f"- {r['kernel']} ({', '.join(r['shape_sets'])}, {_fmt_consts(r['constexprs'])}): "
              f"{' / '.join(r['ptxas_warnings'])}" for r in rows if r["ptxas_warnings"]] or ["None."]
    if compare is not None:
        lines += ["", *compare_section(report, compare)]
    lines += ["", "## Every variant", "", *header, *map(_table_row, rows)]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def compare_section(report: dict, other: dict) -> list:
    """Per kernel, how the variants common to both reports (same compile request) differ."""
    mine = {variant_key(r): r for r in report["variants"]}
    theirs = {variant_key(r): r for r in other["variants"]}
    common = [k for k in mine if k in theirs]
    a_v, b_v = report["triton"], other["triton"]
    out = [f"## triton {b_v} (ptxas {other['ptxas']}) against {a_v}", "",
           f"The same script under triton {b_v} (the GPU image's version) records {len(other['variants'])} "
           f"variants: {len(common)} are the same compile requests as here (signature, constexprs, "
           f"specializations, warps, stages), {len(mine) - len(common)} only here, {len(theirs) - len(common)} only "
           f"there. Spills under {b_v}: {'; '.join(other['spilling_variants']) or 'none'}.", "",
           f"| kernel | common variants | registers {a_v} | registers {b_v} | largest change ({b_v} - {a_v}) | "
           "smem differs | "
           "wgmma differs | spilling (here / there) |", "|---|---|---|---|---|---|---|---|"]
    by_kernel: dict = {}
    for k in common:
        by_kernel.setdefault(mine[k]["kernel"], []).append((mine[k], theirs[k]))
    for kernel in sorted(by_kernel):
        pairs = by_kernel[kernel]
        ra, rb = [a["registers"] for a, _ in pairs], [b["registers"] for _, b in pairs]
        change = max((b["registers"] - a["registers"] for a, b in pairs), key=abs)
        out.append(f"| {kernel} | {len(pairs)} | {min(ra)}-{max(ra)} | {min(rb)}-{max(rb)} | {change:+d} | "
                   f"{sum(a['shared'] != b['shared'] for a, b in pairs)} | "
                   f"{sum(a['wgmma'] != b['wgmma'] for a, b in pairs)} | "
                   f"{sum(_spills(a) > 0 for a, _ in pairs)} / {sum(_spills(b) > 0 for _, b in pairs)} |")
    bench = sorted(((mine[k], theirs[k]) for k in common if set(mine[k]["shape_sets"]) & {"G1", "G2"}),
                   key=lambda p: (p[0]["kernel"], _fmt_consts(p[0]["constexprs"]), _fmt_spec(p[0])))
    out += ["", "At the benchmark shapes:", "",
            f"| kernel | shapes | constexprs | specialization | regs {a_v} | regs {b_v} | spill {b_v} | smem {b_v} "
            f"| MMA {b_v} |", "|---|---|---|---|---|---|---|---|---|"]
    out += [f"| {a['kernel']} | {', '.join(a['shape_sets'])} | {_fmt_consts(a['constexprs'])} | {_fmt_spec(a)} | "
            f"{a['registers']} | {b['registers']} | {b['spill_stores']} / {b['spill_loads']} | {b['shared']} | "
            f"{_mma_kind(b)} |" for a, b in bench]
    return out


def _spills(r: dict) -> int:
    return r["spill_stores"] + r["spill_loads"]


# ---------------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", default=",".join(SHAPE_SETS), help="shape sets to record: test,G1,G2")
    ap.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)), help="compile processes")
    ap.add_argument("--json", help="write the full report (every variant) here")
    ap.add_argument("--table", help="write the markdown table here")
    ap.add_argument("--compare", help="a --json report from another Triton version, compared in the table")
    ap.add_argument("--distinct", action="store_true",
                    help="compile one test-set variant per code path (see keep_distinct)")
    ap.add_argument("--pairwise", action="store_true",
                    help="then only the test-set variants that cover every code-path feature value and pair of "
                         "values (see keep_pairwise); CI's quick run")
    args = ap.parse_args(argv)
    sets = [s for s in args.sets.split(",") if s]
    if set(sets) - set(SHAPE_SETS):
        ap.error(f"unknown shape sets {sorted(set(sets) - set(SHAPE_SETS))}")

    t_start = time.time()
    record(sets)
    dropped = keep_distinct() if args.distinct or args.pairwise else 0
    uncovered = keep_pairwise() if args.pairwise else 0
    global SASS_AT_TEST_SHAPES
    SASS_AT_TEST_SHAPES = not args.pairwise
    print(f"triton {triton.__version__}: {len(VARIANTS)} kernel variants to compile for sm_90 "
          f"(recorded in {time.time() - t_start:.1f}s, {args.jobs} processes"
          f"{f'; {dropped} differing only in integer divisibility left out' if dropped else ''}"
          f"{f'; {uncovered} whose code-path features are all covered pairwise left out' if uncovered else ''})",
          flush=True)
    launched = {v.name for v in VARIANTS.values()}
    missing = sorted(set(KERNELS) - launched)

    cache = tempfile.mkdtemp(prefix="triton-sm90-")
    knobs.cache.dir = cache  # a cold compile: ptxas runs for every variant and logs (-v) what it allocated
    knobs.nvidia.dump_ptxas_log = True
    try:
        t0 = time.time()
        results = compile_all(max(1, args.jobs))
        compile_s = time.time() - t0
        failed = [r for r in results if "error" in r]
        probe = spill_probe(results) if len(failed) < len(results) else {"detected": False, "kernel": "-",
                                                                         "maxnreg": SPILL_PROBE_MAXNREG}
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    ok = [r for r in results if "error" not in r]
    spilling = [f"{r['kernel']} ({'/'.join(r['shape_sets'])}, {r['dtype']}, {_fmt_consts(r['constexprs'])}, "
                f"{r['spill_stores']}/{r['spill_loads']} bytes)" for r in ok if _spills(r)]
    report = {
        "triton": triton.__version__, "torch": torch.__version__.split("+")[0], "ptxas": _ptxas_version(),
        "target": "cuda sm_90 (sm_90a)", "sm_count": SM_COUNT, "shape_sets": sets, "kernels": sorted(KERNELS),
        "missing_kernels": missing, "compile_seconds": round(compile_s, 1), "jobs": args.jobs,
        "variants": ok, "failed": failed, "left_out": LEFT_OUT, "spilling_variants": spilling, "spill_probe": probe,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=_plain)
    if args.table and ok:
        compare = None
        if args.compare:
            with open(args.compare) as f:
                compare = json.load(f)
        write_table(args.table, report, compare)

    print(f"compiled {len(ok)} of {len(results)} variants in {compile_s:.0f}s; registers "
          f"{min((r['registers'] for r in ok), default=0)}-{max((r['registers'] for r in ok), default=0)}; "
          f"wgmma in {sum(r['wgmma'] for r in ok)}; spilling: {len(spilling)}", flush=True)
    for s in spilling:
        print(f"SPILL {s}")
    status = 0
    if missing:
        print(f"FAILED: no launch of {missing} was recorded: add a call that uses it to record_test_shapes()")
        status = 1
    if failed:
        print(f"FAILED: {len(failed)} variants did not compile: {[r['kernel'] for r in failed]}")
        status = 1
    if not probe["detected"]:
        print(f"FAILED: spill probe {probe}: the ptxas log parser did not see forced spills")
        status = 1
    else:
        print(f"spill probe: {probe['kernel']} at maxnreg={probe['maxnreg']}: {probe['registers']} registers, "
              f"{probe['spill_stores']}/{probe['spill_loads']} bytes spilled (uncapped "
              f"{probe['registers_uncapped']} registers)")
    if status == 0:
        print(f"all {len(ok)} variants compiled ({time.time() - t_start:.0f}s in all)")
    return status


if __name__ == "__main__":
    sys.exit(main())
