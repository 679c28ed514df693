"""Per-GPU launch parameters of the Triton kernels: a committed JSON table that the launchers read.

The launchers of ``linear_forward`` / ``linear_backward`` (fused-linear path, through
``linear_config.kernel_config``) and ``logits_logprobs`` (logits path) start from built-in defaults
(the values the code had before any GPU measurement) and replace the parameters of each kernel by the
table's entry for (GPU, dtype, kernel, shape class) when there is one. The table is
``tuned_configs.json`` beside this file; ``benchmarks/gpu/tune.py`` (the ``tune`` step) measures it on a
GPU and writes a file in exactly this format, to be copied over the committed one.

Schema (``schema: 1``)::

    {
      "schema": 1,
      "note": "free text: where the entries come from",
      "gpus": {
        "<GPU name>": {                # torch.cuda.get_device_name(), whitespace collapsed, e.g.
                                       # "NVIDIA H100 80GB HBM3"
          "<dtype>": {                 # "bfloat16" | "float16" | "float32" (the input dtype)
            "<kernel>": {              # a key of KERNELS below
              "<shape class>": {       # shape_class(kernel, ...), or "*" for any shape
                "params": {...},       # every parameter of KERNELS[kernel], nothing else
                "measured": {...}      # optional, informational only (time, default's time, shape,
                                       # triton/torch versions, date); never read by the launchers
              }}}}}
    }

Kernels and their parameters (tile sizes are powers of two; ``num_warps`` in 1..16, ``num_stages``
1..6 is the software-pipelining depth of the kernel's dot loop):

- ``linear_fwd``  ``_forward_partials_kernel``: logit tile ``block_n`` tokens x ``block_v`` vocabulary,
  dot over H in ``block_h`` chunks.
- ``linear_dz``   ``_grad_logits_kernel``: the same tile for the backward's dz recompute. Its
  ``block_n`` x ``block_v`` is also the gradient filter's tile and the backward plan's granularity.
- ``linear_dw``   ``_dw_gemm_kernel``: ``block_m`` vocabulary rows x ``block_n`` H columns, reduction
  over tokens in ``block_k`` steps.
- ``linear_dh``   ``_dh_gemm_kernel``: ``block_m`` tokens x ``block_n`` H columns, reduction over the
  vocabulary in ``block_k`` steps. For both GEMMs, ``block_m`` and ``block_k`` must divide the dz tile's
  ``block_n`` and ``block_v`` (every GEMM step lies inside one dz tile, whose filter flag it reads).
- ``logits_fwd``  ``_token_logprob_kernel``: ``block_v`` is the largest vocabulary tile (clipped to
  ``next_pow2(V)``), ``prefetch`` 1 loads the next tile before folding the current one, 0 does not.
- ``logits_bwd``  ``_logits_backward_kernel``: ``block_v`` and ``num_warps`` as above.

Shape classes. The fused-linear kernels' best tiles depend on the length of their dot loops over H and
on how many programs their grids have against the SMs: ``Nc`` (plan tokens) sets the token-block count
of every grid and the dW GEMM's reduction length, ``H`` the others; ``V`` only multiplies the number of
vocabulary tiles, which is far above the SM count for any real head (V >= 32k), so it is not part of
the class. The class is ``"H{h}-Nc{n}"`` with ``h`` = H rounded to the nearest power of two (in log
space) and ``n`` = Nc rounded to the nearest power of four, so that a class is centred on the shape it
was measured at: G1 (H = 4096, Nc = 16384) is ``"H4096-Nc16384"`` and covers H in [2897, 5792] and Nc
in [8192, 32767]. The logits kernels stream one row per program over the whole vocabulary, so their
parameters depend on V only: ``"V{v}"`` with V rounded to the nearest power of two (G2's V = 128256 is
``"V131072"``, which also covers Qwen's 151936). Lookup: the exact class, else the ``"*"`` entry of
that GPU / dtype / kernel, else the built-in defaults.

Validation: the whole file is checked when it is loaded; an unknown kernel, dtype or parameter, a
missing parameter, or a value out of range is a ``ValueError`` naming the file and the entry's key path
(``gpus/<GPU>/<dtype>/<kernel>/<class>``), never a silently different kernel. Combinations that are
only invalid together (the GEMM tiles against the dz tile) are checked by the launcher once it has
assembled every kernel's entry, and also name the file and the keys involved.

Where the table is not used: under ``TRITON_INTERPRET=1`` the launchers always use their small
interpreter defaults (the interpreter has no GPU name and CPU time grows with the tile sizes), and on
CPU tensors (the offline sm_90 compile of ``tests/compile_for_gpu.py``) there is no GPU name either.
``SPO_KERNELS_TUNED_CONFIGS=<path>`` reads another file; ``SPO_KERNELS_TUNED_CONFIGS=off`` disables
the table. Tests set :data:`TEST_GPU_NAME` to look the table up in the interpreter.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch

SCHEMA = 1
DEFAULT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned_configs.json")
ENV_PATH = "SPO_KERNELS_TUNED_CONFIGS"

_LINEAR_TILE = ("block_n", "block_v", "block_h")
_GEMM_TILE = ("block_m", "block_n", "block_k")
_LAUNCH = ("num_warps", "num_stages")
# kernel -> its parameters, in order
KERNELS = {
    "linear_fwd": _LINEAR_TILE + _LAUNCH,
    "linear_dz": _LINEAR_TILE + _LAUNCH,
    "linear_dw": _GEMM_TILE + _LAUNCH,
    "linear_dh": _GEMM_TILE + _LAUNCH,
    "logits_fwd": ("block_v", "num_warps", "prefetch"),
    "logits_bwd": ("block_v", "num_warps"),
}
LINEAR_KERNELS = ("linear_fwd", "linear_dz", "linear_dw", "linear_dh")
LOGITS_KERNELS = ("logits_fwd", "logits_bwd")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
ANY_SHAPE = "*"

# Tests: in the interpreter (or on CPU), look the table up under this GPU name instead of ignoring it.
TEST_GPU_NAME: Optional[str] = None


def _pow2(v) -> bool:
    return v > 0 and v & (v - 1) == 0


def _check_value(kernel: str, name: str, v) -> Optional[str]:
    """Why ``v`` is not a valid value of parameter ``name`` of ``kernel`` (None if it is)."""
    if isinstance(v, bool) or not isinstance(v, int):
        return f"must be an integer, got {v!r}"
    if name == "num_warps":
        return None if v in (1, 2, 4, 8, 16) else f"must be 1, 2, 4, 8 or 16, got {v}"
    if name == "num_stages":
        return None if 1 <= v <= 6 else f"must be in 1..6, got {v}"
    if name == "prefetch":
        return None if v in (0, 1) else f"must be 0 or 1, got {v}"
    hi = 65536 if kernel.startswith("logits") else 512
    if not _pow2(v) or not 16 <= v <= hi:
        return f"must be a power of two in [16, {hi}], got {v}"
    return None


def check_params(kernel: str, params, where: str) -> dict:
    """Validate one entry's ``params`` (every parameter of the kernel, nothing else); ``where`` names
    the file and key for the error."""
    if kernel not in KERNELS:
        raise ValueError(f"{where}: unknown kernel {kernel!r} (known: {', '.join(KERNELS)})")
    if not isinstance(params, dict):
        raise ValueError(f"{where}: params must be an object, got {type(params).__name__}")
    names = KERNELS[kernel]
    unknown = sorted(set(params) - set(names))
    missing = [n for n in names if n not in params]
    if unknown or missing:
        raise ValueError(f"{where}: parameters of {kernel} are {list(names)}; unknown {unknown}, missing {missing}")
    for n in names:
        why = _check_value(kernel, n, params[n])
        if why:
            raise ValueError(f"{where}: {n} {why}")
    return {n: params[n] for n in names}


def validate_table(data, path: str) -> dict:
    """Check a loaded table (see the module docstring); returns it. Raises ``ValueError`` naming ``path``
    and the offending key path."""
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the table must be a JSON object")
    if data.get("schema") != SCHEMA:
        raise ValueError(f"{path}: schema must be {SCHEMA}, got {data.get('schema')!r}")
    extra = sorted(set(data) - {"schema", "note", "gpus"})
    if extra:
        raise ValueError(f"{path}: unknown top-level keys {extra}")
    gpus = data.get("gpus", {})
    if not isinstance(gpus, dict):
        raise ValueError(f"{path}: gpus must be an object")
    for gpu, by_dtype in gpus.items():
        if not isinstance(by_dtype, dict) or gpu != normalise_gpu_name(gpu) or not gpu:
            raise ValueError(f"{path}: gpus/{gpu!r}: a whitespace-normalised GPU name mapping to an object")
        for dt, by_kernel in by_dtype.items():
            key = f"gpus/{gpu}/{dt}"
            if dt not in DTYPES:
                raise ValueError(f"{path}: {key}: unknown dtype {dt!r} (known: {', '.join(DTYPES)})")
            if not isinstance(by_kernel, dict):
                raise ValueError(f"{path}: {key}: must be an object")
            for kernel, by_class in by_kernel.items():
                if kernel not in KERNELS:
                    raise ValueError(f"{path}: {key}/{kernel}: unknown kernel (known: {', '.join(KERNELS)})")
                if not isinstance(by_class, dict):
                    raise ValueError(f"{path}: {key}/{kernel}: must be an object")
                for cls, entry in by_class.items():
                    where = f"{path}: {key}/{kernel}/{cls}"
                    if cls != ANY_SHAPE and not _valid_class(kernel, cls):
                        raise ValueError(f"{where}: bad shape class (expected e.g. "
                                         f"{shape_class(kernel, H=4096, Nc=16384, V=128256)!r} or '*')")
                    if not isinstance(entry, dict) or "params" not in entry:
                        raise ValueError(f"{where}: an entry is an object with 'params'")
                    bad = sorted(set(entry) - {"params", "measured"})
                    if bad:
                        raise ValueError(f"{where}: unknown keys {bad}")
                    if "measured" in entry and not isinstance(entry["measured"], dict):
                        raise ValueError(f"{where}: measured must be an object")
                    check_params(kernel, entry["params"], where)
    return data


def _valid_class(kernel: str, cls: str) -> bool:
    try:
        if kernel in LINEAR_KERNELS:
            h, n = cls.split("-")
            hv, nv = int(h[1:]), int(n[2:])
            return h[0] == "H" and n[:2] == "Nc" and _pow2(hv) and _pow2(nv) and (nv.bit_length() - 1) % 2 == 0
        v = int(cls[1:])
        return cls[0] == "V" and _pow2(v)
    except (ValueError, IndexError):
        return False


def _round_pow(x: int, log2_base: int) -> int:
    """The power of ``2 ** log2_base`` nearest to x in log space (halves round up), x >= 1."""
    k = math.floor(math.log2(max(int(x), 1)) / log2_base + 0.5)
    return 2 ** (k * log2_base)


def shape_class(kernel: str, *, H: int = 0, Nc: int = 0, V: int = 0) -> str:
    """The shape class of a launch (see the module docstring): ``"H4096-Nc16384"`` for the fused-linear
    kernels, ``"V131072"`` for the logits kernels."""
    if kernel in LINEAR_KERNELS:
        return f"H{_round_pow(H, 1)}-Nc{_round_pow(Nc, 2)}"
    if kernel in LOGITS_KERNELS:
        return f"V{_round_pow(V, 1)}"
    raise ValueError(f"unknown kernel {kernel!r}")


def normalise_gpu_name(name: str) -> str:
    return " ".join(str(name).split())


def dtype_name(dtype: torch.dtype) -> str:
    for k, v in DTYPES.items():
        if v == dtype:
            return k
    return str(dtype).replace("torch.", "")


def gpu_name(device) -> Optional[str]:
    """The name to look up for ``device``, or None (no table): the normalised CUDA device name; None in
    the interpreter and for CPU tensors, unless a test set :data:`TEST_GPU_NAME`."""
    if TEST_GPU_NAME is not None:
        return TEST_GPU_NAME
    if os.environ.get("TRITON_INTERPRET") == "1" or device is None:
        return None
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return normalise_gpu_name(torch.cuda.get_device_name(device))


def table_path() -> Optional[str]:
    p = os.environ.get(ENV_PATH)
    if p is not None and p.strip().lower() in ("off", "none", ""):
        return None
    return p or DEFAULT_PATH


_CACHE: dict = {}


def load_table(path: Optional[str] = None) -> dict:
    """The validated table at ``path`` (default: :func:`table_path`), cached until the file changes; an
    empty table when there is no file or the table is off."""
    path = table_path() if path is None else path
    if path is None or not os.path.exists(path):
        return empty_table()
    st = os.stat(path)
    stamp = (st.st_mtime_ns, st.st_size)
    hit = _CACHE.get(path)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    validate_table(data, path)
    _CACHE[path] = (stamp, data)
    return data


@dataclass(frozen=True)
class Entry:
    """One table entry that applies to a launch: its parameters and where it came from."""
    kernel: str
    params: dict
    path: str
    key: str  # gpus/<GPU>/<dtype>/<kernel>/<class>

    def where(self) -> str:
        return f"{self.path}: {self.key}"


def lookup(kernel: str, dtype: torch.dtype, device, *, H: int = 0, Nc: int = 0, V: int = 0,
           path: Optional[str] = None) -> Optional[Entry]:
    """The table entry for this launch (exact shape class, else ``"*"``), or None: built-in defaults."""
    gpu = gpu_name(device)
    if gpu is None:
        return None
    path = table_path() if path is None else path
    if path is None:
        return None
    table = load_table(path)
    by_class = table.get("gpus", {}).get(gpu, {}).get(dtype_name(dtype), {}).get(kernel, {})
    cls = shape_class(kernel, H=H, Nc=Nc, V=V)
    for c in (cls, ANY_SHAPE):
        if c in by_class:
            return Entry(kernel, dict(by_class[c]["params"]), path,
                         f"gpus/{gpu}/{dtype_name(dtype)}/{kernel}/{c}")
    return None


def empty_table(note: str = "No GPU measurement yet: every launch uses the built-in defaults.") -> dict:
    return {"schema": SCHEMA, "note": note, "gpus": {}}


def set_entry(table: dict, gpu: str, dtype: str, kernel: str, cls: str, params: dict,
              measured: Optional[dict] = None) -> None:
    """Put one (validated) entry into ``table`` in place."""
    where = f"gpus/{gpu}/{dtype}/{kernel}/{cls}"
    entry = {"params": check_params(kernel, params, where)}
    if measured is not None:
        entry["measured"] = measured
    table.setdefault("gpus", {}).setdefault(normalise_gpu_name(gpu), {}).setdefault(dtype, {}).setdefault(
        kernel, {})[cls] = entry


def merge_tables(base: dict, new: dict) -> dict:
    """``base`` with every entry of ``new`` added (``new`` wins on the same key, and its note when it has
    entries); neither is modified."""
    out = json.loads(json.dumps(base))
    for gpu, by_dtype in new.get("gpus", {}).items():
        for dt, by_kernel in by_dtype.items():
            for kernel, by_class in by_kernel.items():
                for cls, entry in by_class.items():
                    out.setdefault("gpus", {}).setdefault(gpu, {}).setdefault(dt, {}).setdefault(kernel, {})[cls] = \
                        json.loads(json.dumps(entry))
    if new.get("note") and new.get("gpus"):
        out["note"] = new["note"]
    out["schema"] = SCHEMA
    return out


def write_table(path: str, table: dict) -> None:
    """Validate and write ``table`` (sorted keys, one trailing newline), atomically."""
    validate_table(table, path)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(table, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
