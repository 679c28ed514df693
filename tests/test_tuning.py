"""The tuning table (spo_kernels/kernels/tuning.py, tuned_configs.json) and the tune step (benchmarks/gpu/tune.py).

- lookup: the exact shape class, else the "*" entry, else the built-in defaults; other GPUs and dtypes never
  match; the launchers' configs take the entry's values (and CONFIG_OVERRIDES win over them);
- validation: every kind of bad entry is a ValueError naming the file and the entry's key, at load time or,
  for GEMM tiles that do not fit the dz tile, when the launcher assembles the entries;
- the interpreter ignores the table (a CUDA device name with TRITON_INTERPRET=1 still gets the small
  interpreter defaults);
- results with non-default configs loaded from a table (in the interpreter, through TEST_GPU_NAME) equal the
  float64 reference, and the launches really used the table's tiles;
- the committed table is valid and shipped as package data;
- the tune step's dry run writes strict JSON lines and a table the launchers can load; a candidate with
  different numbers is recorded as a mismatch and never chosen; a spent budget still writes a table.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

import spo_kernels as sk
from spo_kernels.kernels import linear_logprobs as LL
from spo_kernels.kernels import logits_logprobs as LG
from spo_kernels.kernels import tuning
from batches import rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU = "Test GPU 80GB"
G1 = dict(H=4096, Nc=16384)
BF = torch.bfloat16


def entry(params, **measured):
    return {"params": params, **({"measured": measured} if measured else {})}


def write(tmp_path, gpus, name="table.json"):
    path = str(tmp_path / name)
    with open(path, "w") as f:
        json.dump({"schema": 1, "note": "test", "gpus": gpus}, f)
    return path


DW_G1 = {"block_m": 64, "block_n": 256, "block_k": 32, "num_warps": 4, "num_stages": 4}
DH_ANY = {"block_m": 64, "block_n": 64, "block_k": 64, "num_warps": 8, "num_stages": 2}
DZ_G1 = {"block_n": 256, "block_v": 128, "block_h": 64, "num_warps": 8, "num_stages": 4}
LF_V128K = {"block_v": 2048, "num_warps": 16, "prefetch": 0}
LB_ANY = {"block_v": 1024, "num_warps": 4}


@pytest.fixture
def table(tmp_path, monkeypatch):
    """A table for GPU (bf16): dz and dW at G1's class, dh for any shape, logits entries; another GPU and
    another dtype hold entries that must never match."""
    other = {"block_m": 16, "block_n": 16, "block_k": 16, "num_warps": 1, "num_stages": 1}
    path = write(tmp_path, {
        GPU: {
            "bfloat16": {
                "linear_dz": {"H4096-Nc16384": entry(DZ_G1)},
                "linear_dw": {"H4096-Nc16384": entry(DW_G1, ms=1.0), "H2048-Nc4096": entry(other)},
                "linear_dh": {"*": entry(DH_ANY)},
                "logits_fwd": {"V131072": entry(LF_V128K)},
                "logits_bwd": {"*": entry(LB_ANY)},
            },
            "float16": {"linear_dw": {"*": entry(other)}},
        },
        "Other GPU": {"bfloat16": {"linear_dw": {"*": entry(other)}}},
    })
    monkeypatch.setenv(tuning.ENV_PATH, path)
    monkeypatch.setattr(LL, "CONFIG_OVERRIDES", {})
    monkeypatch.setattr(LG, "CONFIG_OVERRIDES", {})
    return path


@pytest.fixture
def on_gpu(monkeypatch):
    """Host-side lookups as on a GPU: no interpreter, a CUDA device of name GPU (kernel_config and
    launch_params are pure host code; nothing is launched)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "  Test GPU\t80GB ")
    return torch.device("cuda")


# ---------------------------------------------------------------------------------------------------------
# shape classes and lookup
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("H,Nc,cls", [(4096, 16384, "H4096-Nc16384"), (2897, 8192, "H4096-Nc16384"),
                                      (5792, 32767, "H4096-Nc16384"), (2896, 8191, "H2048-Nc4096"),
                                      (5793, 32768, "H8192-Nc65536"), (40, 23, "H32-Nc16")])
def test_linear_shape_classes(H, Nc, cls):
    assert tuning.shape_class("linear_dw", H=H, Nc=Nc) == cls


@pytest.mark.parametrize("V,cls", [(128256, "V131072"), (151936, "V131072"), (92681, "V65536"),
                                   (256000, "V262144"), (97, "V128")])
def test_logits_shape_classes(V, cls):
    assert tuning.shape_class("logits_fwd", V=V) == cls


def test_lookup_exact_wildcard_and_fallback(table, on_gpu):
    e = tuning.lookup("linear_dw", BF, on_gpu, **G1)
    assert e.params == DW_G1 and e.key == f"gpus/{GPU}/bfloat16/linear_dw/H4096-Nc16384" and e.path == table
    # a shape near G1 (same class), then another class with its own entry, then one with none
    assert tuning.lookup("linear_dw", BF, on_gpu, H=3500, Nc=12000).params == DW_G1
    assert tuning.lookup("linear_dw", BF, on_gpu, H=2048, Nc=4096).params["block_m"] == 16
    assert tuning.lookup("linear_dw", BF, on_gpu, H=8192, Nc=65536) is None
    # "*" matches any shape; nothing for a kernel without entries
    assert tuning.lookup("linear_dh", BF, on_gpu, H=64, Nc=100).params == DH_ANY
    assert tuning.lookup("linear_fwd", BF, on_gpu, **G1) is None
    # another dtype, another GPU, a CPU tensor: no entry of this GPU's bf16 table
    assert tuning.lookup("linear_dz", torch.float16, on_gpu, **G1) is None
    assert tuning.lookup("linear_dw", torch.float32, on_gpu, **G1) is None
    assert tuning.lookup("linear_dw", BF, torch.device("cpu"), **G1) is None


def test_kernel_config_takes_the_entries(table, on_gpu):
    cfg = LL.kernel_config(BF, device=on_gpu, **G1)
    assert cfg.params("linear_dw") == DW_G1
    assert cfg.params("linear_dh") == DH_ANY
    assert cfg.params("linear_dz") == DZ_G1 and (cfg.block_n, cfg.block_v) == (256, 128)
    # the forward has no entry: the built-in default, not the dz entry's tile
    default = LL.LinearKernelConfig()
    assert cfg.params("linear_fwd") == default.params("linear_fwd")
    launch = cfg.launch("linear_dw")
    assert launch == {"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 32, "num_warps": 4, "num_stages": 4}
    # without the table (no GPU name, or switched off): the defaults
    assert LL.kernel_config(BF, device=torch.device("cpu"), **G1).params("linear_dw") == default.params("linear_dw")


def test_table_off(table, on_gpu, monkeypatch):
    monkeypatch.setenv(tuning.ENV_PATH, "off")
    assert LL.kernel_config(BF, device=on_gpu, **G1).params("linear_dw") == LL.LinearKernelConfig().params("linear_dw")


def test_overrides_win_over_the_table(table, on_gpu, monkeypatch):
    monkeypatch.setattr(LL, "CONFIG_OVERRIDES", {"gemm_k": 16, "dh_warps": 2})
    cfg = LL.kernel_config(BF, device=on_gpu, **G1)
    assert cfg.params("linear_dw")["block_k"] == 16 and cfg.params("linear_dh")["block_k"] == 16
    assert cfg.params("linear_dh")["num_warps"] == 2 and cfg.params("linear_dw")["num_warps"] == 4
    assert cfg.params("linear_dw")["block_m"] == 64  # not overridden: the table's
    # a shared tile name sets every kernel that has it (the forward's too)
    monkeypatch.setattr(LL, "CONFIG_OVERRIDES", {"block_n": 64, "gemm_m": 64})
    cfg = LL.kernel_config(BF, device=on_gpu, **G1)
    assert cfg.block_n == 64 and cfg.params("linear_fwd")["block_n"] == 64


def test_logits_launch_params(table, on_gpu, monkeypatch):
    assert LG.launch_params("logits_fwd", BF, 128256, on_gpu) == LF_V128K
    assert LG.launch_params("logits_bwd", BF, 128256, on_gpu) == LB_ANY
    # "*" applies to any V; block_v is the largest tile: clipped to next_pow2(V)
    assert LG.launch_params("logits_bwd", BF, 300, on_gpu) == {"block_v": 512, "num_warps": 4}
    # V=32000 is another class: the defaults
    assert LG.launch_params("logits_fwd", BF, 32000, on_gpu) == {"block_v": 4096, "num_warps": 8, "prefetch": 1}
    # float64 (tests only) is never looked up, and keeps the plain loop
    assert LG.launch_params("logits_fwd", torch.float64, 128256, on_gpu)["prefetch"] == 0
    monkeypatch.setattr(LG, "CONFIG_OVERRIDES", {"logits_fwd": {"num_warps": 2}})
    assert LG.launch_params("logits_fwd", BF, 128256, on_gpu) == dict(LF_V128K, num_warps=2)


def test_interpreter_ignores_the_table(table, on_gpu, monkeypatch):
    """A CUDA device's name is never looked up under TRITON_INTERPRET=1: the small interpreter defaults.
    (With the interpreter off, the same call takes the table's entries: test_kernel_config_takes_the_entries.)"""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tuning.gpu_name(on_gpu) is None
    cfg = LL.kernel_config(BF, device=on_gpu, **G1)
    assert (cfg.block_n, cfg.block_v, cfg.params("linear_dw")["block_m"], cfg.params("linear_dh")["block_n"]) == \
        (32, 32, 32, 64)
    assert LG.launch_params("logits_fwd", BF, 128256, on_gpu) == {"block_v": 4096, "num_warps": 8, "prefetch": 1}
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert LL.kernel_config(BF, device=on_gpu, **G1).params("linear_dw") == DW_G1


# ---------------------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------------------

GOOD_DW = {"block_m": 128, "block_n": 128, "block_k": 64, "num_warps": 8, "num_stages": 3}


@pytest.mark.parametrize("gpus,match", [
    ({GPU: {"bfloat16": {"linear_dq": {"*": entry(GOOD_DW)}}}}, "linear_dq.*unknown kernel"),
    ({GPU: {"bf16": {"linear_dw": {"*": entry(GOOD_DW)}}}}, "bf16: unknown dtype"),
    ({GPU: {"bfloat16": {"linear_dw": {"*": entry(dict(GOOD_DW, block_m=96))}}}}, "linear_dw/\\*: block_m"),
    ({GPU: {"bfloat16": {"linear_dw": {"*": entry(dict(GOOD_DW, block_m=8))}}}}, "linear_dw/\\*: block_m"),
    ({GPU: {"bfloat16": {"linear_dw": {"*": entry(dict(GOOD_DW, num_warps=3))}}}}, "num_warps"),
    ({GPU: {"bfloat16": {"linear_dw": {"*": entry(dict(GOOD_DW, num_stages=0))}}}}, "num_stages"),
    ({GPU: {"bfloat16": {"linear_dw": {"*": entry(dict(GOOD_DW, num_stages=True))}}}}, "num_stages"),
    ({GPU: {"bfloat16": {"linear_dw": {"*": entry(dict(GOOD_DW, block_k="64"))}}}}, "block_k"),
    ({GPU: {"bfloat16": {"linear_dw": {"*": entry({k: v for k, v in GOOD_DW.items() if k != "block_k"})}}}},
     "missing \\['block_k'\\]"),
    ({GPU: {"bfloat16": {"linear_dw": {"*": entry(dict(GOOD_DW, block_h=64))}}}}, "unknown \\['block_h'\\]"),
    ({GPU: {"bfloat16": {"linear_dw": {"H4096": entry(GOOD_DW)}}}}, "linear_dw/H4096: bad shape class"),
    ({GPU: {"bfloat16": {"linear_dw": {"H4096-Nc8192": entry(GOOD_DW)}}}}, "bad shape class"),  # not 4^k
    ({GPU: {"bfloat16": {"logits_fwd": {"*": entry({"block_v": 4096, "num_warps": 8, "prefetch": 2})}}}},
     "prefetch"),
    ({GPU: {"bfloat16": {"linear_dw": {"*": {"parameters": GOOD_DW}}}}}, "with 'params'"),
    ({GPU: {"bfloat16": {"linear_dw": {"*": dict(entry(GOOD_DW), measured=3)}}}}, "measured"),
    ({"Test  GPU": {"bfloat16": {}}}, "whitespace-normalised"),
])
def test_bad_entries_are_rejected(tmp_path, on_gpu, monkeypatch, gpus, match):
    path = write(tmp_path, gpus)
    monkeypatch.setenv(tuning.ENV_PATH, path)
    with pytest.raises(ValueError, match=match) as e:
        LL.kernel_config(BF, device=on_gpu, **G1)
    assert path in str(e.value)


def test_bad_files_are_rejected(tmp_path, on_gpu, monkeypatch):
    bad = tmp_path / "bad.json"
    for text, match in (("{not json", "not valid JSON"), ('{"schema": 2, "gpus": {}}', "schema must be 1"),
                        ('{"schema": 1, "gpus": {}, "extra": 1}', "unknown top-level")):
        bad.write_text(text)
        monkeypatch.setenv(tuning.ENV_PATH, str(bad))
        with pytest.raises(ValueError, match=match):
            LG.launch_params("logits_fwd", BF, 128256, on_gpu)


def test_entries_that_do_not_fit_together(tmp_path, on_gpu, monkeypatch):
    """A dW block_m of 128 against a dz tile of 64 rows: each entry is valid, the pair is not. The error names
    the file and both entries."""
    dz = {"block_n": 64, "block_v": 128, "block_h": 64, "num_warps": 8, "num_stages": 3}
    path = write(tmp_path, {GPU: {"bfloat16": {"linear_dz": {"*": entry(dz)}, "linear_dw": {"*": entry(GOOD_DW)}}}})
    monkeypatch.setenv(tuning.ENV_PATH, path)
    with pytest.raises(ValueError, match="dw_block_m=128") as e:
        LL.kernel_config(BF, device=on_gpu, **G1)
    msg = str(e.value)
    assert path in msg and "linear_dz/*" in msg and "linear_dw/*" in msg


def test_committed_table_is_valid_and_shipped():
    table = tuning.load_table(tuning.DEFAULT_PATH)
    assert table["schema"] == 1
    for gpu, by_dtype in table["gpus"].items():
        for dt, by_kernel in by_dtype.items():
            classes = {c for k in tuning.LINEAR_KERNELS for c in by_kernel.get(k, {})}
            for cls in classes:  # each class's fused-linear entries fit together
                over = {}
                for k in tuning.LINEAR_KERNELS:
                    e = by_kernel.get(k, {}).get(cls) or by_kernel.get(k, {}).get("*")
                    if e:
                        over.update({LL._TABLE_FIELDS[k][p]: v for p, v in e["params"].items()})
                dataclasses.replace(LL.LinearKernelConfig().resolved(), **over).check()
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        text = f.read()
    assert '"spo_kernels.kernels" = ["tuned_configs.json"]' in text


def test_merge_and_write_round_trip(tmp_path):
    a = tuning.empty_table("a")
    tuning.set_entry(a, GPU, "bfloat16", "linear_dw", "H4096-Nc16384", GOOD_DW, {"ms": 2.0})
    b = tuning.empty_table("b")
    tuning.set_entry(b, GPU, "bfloat16", "linear_dw", "H4096-Nc16384", DW_G1)
    tuning.set_entry(b, GPU, "bfloat16", "logits_bwd", "V131072", LB_ANY)
    merged = tuning.merge_tables(a, b)
    path = str(tmp_path / "t.json")
    tuning.write_table(path, merged)
    loaded = tuning.load_table(path)
    assert loaded["gpus"][GPU]["bfloat16"]["linear_dw"]["H4096-Nc16384"] == {"params": DW_G1}
    assert loaded["gpus"][GPU]["bfloat16"]["logits_bwd"]["V131072"]["params"] == LB_ANY
    assert a["gpus"][GPU]["bfloat16"]["linear_dw"]["H4096-Nc16384"]["params"] == GOOD_DW  # inputs unchanged
    with pytest.raises(ValueError, match="block_m"):
        tuning.set_entry(a, GPU, "bfloat16", "linear_dw", "*", dict(GOOD_DW, block_m=3))


# ---------------------------------------------------------------------------------------------------------
# non-default configs from a table: results against the float64 reference (interpreter)
# ---------------------------------------------------------------------------------------------------------

TABLE_CFG = {  # every kernel away from the interpreter defaults (32/32/32, GEMM 32/64/32)
    "linear_fwd": {"block_n": 16, "block_v": 64, "block_h": 16, "num_warps": 2, "num_stages": 1},
    "linear_dz": {"block_n": 32, "block_v": 64, "block_h": 16, "num_warps": 4, "num_stages": 2},
    "linear_dw": {"block_m": 16, "block_n": 32, "block_k": 32, "num_warps": 2, "num_stages": 2},
    "linear_dh": {"block_m": 32, "block_n": 16, "block_k": 16, "num_warps": 4, "num_stages": 1},
    "logits_fwd": {"block_v": 32, "num_warps": 2, "prefetch": 1},
    "logits_bwd": {"block_v": 64, "num_warps": 2},
}


class Spy:
    """Wraps a kernel: records each launch's constexpr tiles, then launches the real kernel."""

    def __init__(self, kernel, names, seen):
        self.kernel, self.names, self.seen = kernel, names, seen

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.seen.append({n: kwargs[n] for n in self.names if n in kwargs})
            return self.kernel[grid](*args, **kwargs)
        return launch


def _make_linear(seed=0, S=4, T=12, H=40, V=257):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(S, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H ** 0.5
    bias = torch.randn(V, generator=g) * 0.5
    labels = torch.randint(0, V, (S, T), generator=g)
    for s in range(S):
        labels[s, : int(torch.randint(1, T // 2, (1,), generator=g))] = -100
    labels[1, -2:] = -100
    return hidden, weight, bias, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_table_configs_match_the_reference(tmp_path, monkeypatch, dtype):
    """Non-default tiles for every fused-linear and logits kernel, loaded from a table (exact shape classes
    for the fused-linear kernels, "*" for the logits ones): log-probs and gradients against the float64
    reference, every launch with the table's tiles, NaN-poisoned buffers."""
    hidden, weight, bias, labels = _make_linear()
    S, T, H = hidden.shape
    V = weight.shape[0]
    Nc = int((labels != -100).sum())
    dt = tuning.dtype_name(dtype)
    gpus = {GPU: {dt: {}}}
    for k, p in TABLE_CFG.items():
        cls = tuning.shape_class(k, H=H, Nc=Nc) if k in tuning.LINEAR_KERNELS else "*"
        gpus[GPU][dt][k] = {cls: entry(p)}
    monkeypatch.setenv(tuning.ENV_PATH, write(tmp_path, gpus))
    monkeypatch.setattr(tuning, "TEST_GPU_NAME", GPU)
    monkeypatch.setattr(LL, "CONFIG_OVERRIDES", {})
    monkeypatch.setattr(LL, "POISON_EMPTY", True)  # triton_helpers.POISON_EMPTY: every launcher's buffers
    seen = {k: [] for k in ("fwd", "dz", "dw", "dh", "lf", "lb")}
    for name, attr, names in (("fwd", "_forward_partials_kernel", ("BLOCK_N", "BLOCK_V", "BLOCK_H", "num_warps")),
                              ("dz", "_grad_logits_kernel", ("BLOCK_N", "BLOCK_V", "BLOCK_H", "num_stages")),
                              ("dw", "_dw_gemm_kernel", ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_stages")),
                              ("dh", "_dh_gemm_kernel", ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps"))):
        monkeypatch.setattr(LL, attr, Spy(getattr(LL, attr), names, seen[name]))
    monkeypatch.setattr(LG, "_token_logprob_kernel", Spy(LG._token_logprob_kernel, ("BLOCK_V", "PREFETCH"), seen["lf"]))
    monkeypatch.setattr(LG, "_logits_backward_kernel", Spy(LG._logits_backward_kernel, ("BLOCK_V",), seen["lb"]))

    h, w, b = (t.to(dtype).clone().requires_grad_(True) for t in (hidden, weight, bias))
    gs = torch.randn(S, generator=torch.Generator().manual_seed(9))
    res = sk.fused_linear_sequence_logprobs(h, w, labels, b, softcap=5.0, backend="triton")
    (res.logps * gs).sum().backward()
    h64, w64, b64 = (x.detach().to(dtype).double().requires_grad_(True) for x in (hidden, weight, bias))
    ref = sk.fused_linear_sequence_logprobs(h64, w64, labels, b64, softcap=5.0, backend="reference")
    (ref.logps * gs.double()).sum().backward()
    gtol = 1e-4 if dtype == torch.float32 else 2e-2
    assert rel_err(res.logps, ref.logps) <= 1e-5
    for got, want in ((h.grad, h64.grad), (w.grad, w64.grad), (b.grad, b64.grad)):
        assert rel_err(got, want) <= gtol

    # logits path: log-probs and their gradient through the public function
    x = (hidden @ weight.t() * 2.0).to(dtype)
    xt = x.clone().requires_grad_(True)
    got = sk.sequence_logprobs(xt, labels, backend="triton")
    (got.logps * gs).sum().backward()
    x64 = x.double().requires_grad_(True)
    want = sk.sequence_logprobs(x64, labels, backend="reference")
    (want.logps * gs.double()).sum().backward()
    assert rel_err(got.logps, want.logps) <= 1e-5
    assert rel_err(xt.grad, x64.grad) <= gtol

    assert seen["fwd"] and all(s == {"BLOCK_N": 16, "BLOCK_V": 64, "BLOCK_H": 16, "num_warps": 2} for s in seen["fwd"])
    assert seen["dz"] and all(s == {"BLOCK_N": 32, "BLOCK_V": 64, "BLOCK_H": 16, "num_stages": 2} for s in seen["dz"])
    assert seen["dw"] and all(s == {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "num_stages": 2} for s in seen["dw"])
    assert seen["dh"] and all(s == {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4} for s in seen["dh"])
    assert seen["lf"] and all(s == {"BLOCK_V": 32, "PREFETCH": True} for s in seen["lf"])
    assert seen["lb"] and all(s == {"BLOCK_V": 64} for s in seen["lb"])


# ---------------------------------------------------------------------------------------------------------
# the tune step (dry run)
# ---------------------------------------------------------------------------------------------------------

def _strict_lines(path):
    def reject(c):
        raise ValueError(f"non-standard JSON constant {c}")
    with open(path) as f:
        return [json.loads(line, parse_constant=reject) for line in f if line.strip()]


@pytest.fixture
def tune_mod():
    sys.path.insert(0, ROOT)
    from benchmarks.gpu import tune
    return tune


def test_tune_dry_run(tmp_path, monkeypatch, tune_mod):
    """Every kernel swept on CPU through the same code; a dW candidate that returns different numbers (a
    corrupted output, injected here) is recorded as a mismatch and not chosen."""
    real_dw = LL.BlockLaunches.dw_gemm

    def corrupt_dw(self, dz_buf, stride, acc, out, *rest):
        real_dw(self, dz_buf, stride, acc, out, *rest)
        if self.cfg.params("linear_dw")["block_n"] == 32:  # one of the dry-run candidates
            out.mul_(1.01)

    monkeypatch.setattr(LL.BlockLaunches, "dw_gemm", corrupt_dw)
    out_dir = str(tmp_path / "tune")
    assert tune_mod.main(["--out-dir", out_dir, "--dry-run"]) == 0
    lines = _strict_lines(os.path.join(out_dir, "tune.jsonl"))
    kernels = list(tuning.KERNELS)
    for k in kernels:
        cands = [r for r in lines if r["kernel"] == k and r["status"] != "chosen"]
        chosen = [r for r in lines if r["kernel"] == k and r["status"] == "chosen"]
        assert len(cands) == 3 and sum(r["default"] for r in cands) == 1, k
        assert len(chosen) == 1
        for r in cands:
            assert set(r) >= {"shape", "class", "gpu", "dtype", "params", "status", "ms", "rel_err", "first_call_s"}
            tuning.check_params(k, r["params"], "line")
        ok = [r for r in cands if r["status"] == "ok"]
        best = ok[0]  # the default, then a candidate replaces the best so far when >= 1% faster
        for r in ok[1:]:
            best = r if r["ms"] < tune_mod.IMPROVE * best["ms"] else best
        assert chosen[0]["params"] == best["params"] and chosen[0]["ms"] == best["ms"], k
    bad = [r for r in lines if r["kernel"] == "linear_dw" and r["params"]["block_n"] == 32]
    assert [r["status"] for r in bad] == ["mismatch"] and bad[0]["rel_err"] > 1e-3 and bad[0]["ms"] is None
    # the table: loadable, the committed table's format, one entry per kernel under the dry run's "GPU"
    path = os.path.join(out_dir, "tuned_configs.json")
    table = tuning.load_table(path)
    by_kernel = table["gpus"]["CPU interpreter"]["bfloat16"]
    assert set(by_kernel) == set(kernels)
    chosen_dw = [r for r in lines if r["kernel"] == "linear_dw" and r["status"] == "chosen"][0]
    assert list(by_kernel["linear_dw"].values())[0]["params"] == chosen_dw["params"]
    # the launchers read it: the dry run's "GPU" name gives the chosen dW parameters
    monkeypatch.setenv(tuning.ENV_PATH, path)
    monkeypatch.setattr(tuning, "TEST_GPU_NAME", "CPU interpreter")
    cls = list(by_kernel["linear_dw"])[0]
    assert tuning.lookup("linear_dw", BF, None, H=40, Nc=int(cls.split("Nc")[1])).params == chosen_dw["params"]


def test_tune_budget_spent_still_writes(tmp_path, tune_mod):
    out_dir = str(tmp_path / "tune")
    assert tune_mod.main(["--out-dir", out_dir, "--dry-run", "--budget-s", "0"]) == 0
    assert tuning.load_table(os.path.join(out_dir, "tuned_configs.json")) == tuning.load_table(tuning.DEFAULT_PATH)
    assert not os.path.exists(os.path.join(out_dir, "tune.jsonl")) or not _strict_lines(
        os.path.join(out_dir, "tune.jsonl"))


def test_tune_dry_run_in_a_fresh_process(tmp_path):
    """As a command: ``python -m benchmarks.gpu.tune --dry-run`` sets up the interpreter itself."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out_dir = str(tmp_path / "tune")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu.tune", "--out-dir", out_dir, "--dry-run",
                           "--shapes", "G2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = _strict_lines(os.path.join(out_dir, "tune.jsonl"))
    assert {r["kernel"] for r in lines} == {"logits_fwd", "logits_bwd"}
    assert set(tuning.load_table(os.path.join(out_dir, "tuned_configs.json"))["gpus"]["CPU interpreter"]["bfloat16"]) \
        == {"logits_fwd", "logits_bwd"}
