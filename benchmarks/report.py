"""Tables, goals and plots drawn from a results file (JSON lines), whatever part of the run finished.

Floors (METHOD.md), at the nominal H100/H200 rates the project's goals are stated in (790 TFLOP/s
bf16, 3 TB/s), and at the rates measured in the same run when there are any:
- linear: FLOPs ``10 Nc V H``: the policy's forward, recompute, dhidden and dW (``8 Nc V H``) plus the
  reference forward (``2 Nc V H``), completion tokens only.
- logits: bytes that must move: completion rows read in the forward and read + written in the
  backward, every other row written once (its zero gradient): ``(2 Nc + N) V`` elements.
Memory lower bound (linear): the gradients a step must return, dhidden ``[N, H]`` + dW ``[V, H]`` in
the input dtype.
"""

from __future__ import annotations

import math
from typing import Dict, List

from .workloads import ELEMENT_BYTES, Shape

NOMINAL = {"matmul_flops": 790e12, "copy_bytes_per_s": 3.0e12}
MIB = 2 ** 20

# The goals of the GPU shapes: (description, check(record) -> (value, limit) or None when not measurable).
GOALS = {
    "linear": [
        ("time <= 1.5x the FLOP floor", lambda t: (_ratio_floor(t), 1.5)),
        ("time <= 0.9x cce_exact", lambda t: (_vs(t, "cce_exact"), 0.9)),
        ("time <= 0.75x trl (TRL 1.16 fused head)", lambda t: (_vs(t, "trl"), 0.75)),
        ("time <= 0.5x eager", lambda t: (_vs(t, "eager"), 0.5)),
        ("time <= 0.5x liger", lambda t: (_vs(t, "liger"), 0.5)),
        ("peak extra memory <= 1.05x dhidden + dW", lambda t: (_ours(t, "memory_vs_bound"), 1.05)),
    ],
    "logits": [
        ("time <= 1.3x the bandwidth floor", lambda t: (_ratio_floor(t), 1.3)),
        ("peak extra memory <= 64 MiB", lambda t: (_ours(t, "peak_extra_bytes", MIB), 64.0)),
    ],
}


def floors(shape: Shape, rates: dict) -> dict:
    Nc, V = shape.completion_tokens, shape.V
    if shape.workload == "linear":
        work, unit = 10 * Nc * V * shape.H, "matmul_flops"
    else:
        work, unit = (2 * Nc + shape.N) * V * ELEMENT_BYTES[shape.dtype], "copy_bytes_per_s"
    out = {"work": work, "unit": "FLOP" if unit == "matmul_flops" else "bytes",
           "floor_s_nominal": work / NOMINAL[unit]}
    if rates.get(unit):
        out["floor_s_measured"] = work / rates[unit]
    return out


def memory_lower_bound(shape: Shape) -> int:
    if shape.workload != "linear":
        return 0
    return (shape.N + shape.V) * shape.H * ELEMENT_BYTES[shape.dtype]


def tables(lines: List[dict]) -> List[dict]:
    """One record per shape, in first-seen order: shape, reference, floors, bound, and each method's
    latest result line with its ratios (x eager, x floor, x bound)."""
    rates = next((r for r in reversed(lines) if r.get("kind") == "rates"), {})
    refs = {Shape.from_dict(r["shape"]).key: r for r in lines if r.get("kind") == "reference"}
    by_shape: Dict[str, dict] = {}
    for r in lines:
        if r.get("kind") != "result":
            continue
        shape = Shape.from_dict(r["shape"])
        rec = by_shape.setdefault(shape.key, {"shape": shape, "results": {}})
        rec["results"][r["method"]] = dict(r)  # the latest line of a method wins
    out = []
    for key, rec in by_shape.items():
        shape = rec["shape"]
        fl = floors(shape, rates)
        bound = memory_lower_bound(shape)
        results = list(rec["results"].values())
        base = rec["results"].get("eager")
        for r in results:
            if "time_s_median" not in r:
                continue
            if r.get("device") == "cuda":  # the floors are GPU rates: no ratio for a CPU run
                r["time_vs_floor"] = r["time_s_median"] / fl["floor_s_nominal"]
            if base and "time_s_median" in base:
                r["time_vs_eager"] = r["time_s_median"] / base["time_s_median"]
                r["memory_vs_eager"] = r["peak_extra_bytes"] / max(base["peak_extra_bytes"], 1)
            if bound:
                r["memory_vs_bound"] = r["peak_extra_bytes"] / bound
        out.append({"shape": shape, "results": results, "reference": refs.get(key), "floor": fl,
                    "memory_lower_bound_bytes": bound, "rates": {k: v for k, v in rates.items()
                                                                 if k in NOMINAL}})
    return out


def _ours(t, field, scale=1.0):
    r = _find(t, "spo")
    return r[field] / scale if r and field in r else None


def _find(t, method):
    rs = t["results"]
    if method == "spo":  # ours: the triton backend on a GPU, else whichever spo ran
        for m in ("spo_triton", "spo"):
            r = next((x for x in rs if x["method"] == m and x.get("status") == "ok"), None)
            if r:
                return r
        return None
    return next((x for x in rs if x["method"] == method and "time_s_median" in x), None)


def _ratio_floor(t):
    return _ours(t, "time_vs_floor")


def _vs(t, peer):
    ours, other = _find(t, "spo"), _find(t, peer)
    if not ours or not other:
        return None
    return ours["time_s_median"] / other["time_s_median"]


def goals(t) -> List[tuple]:
    """``(goal, value, limit, "met" | "missed" | "not measured")`` for the shape's workload; the goals
    are GPU goals, so a table without a CUDA result has none."""
    out = []
    if not any(r.get("device") == "cuda" for r in t["results"]):
        return out
    for desc, fn in GOALS[t["shape"].workload]:
        value, limit = fn(t)
        verdict = "not measured" if value is None else ("met" if value <= limit else "missed")
        out.append((desc, value, limit, verdict))
    return out


_COLS = ("method", "status", "time ms", "x floor", "x eager", "peak extra MiB", "x bound", "x eager mem",
         "loss err", "grad err")


def _row(r) -> tuple:
    if "time_s_median" not in r:
        reason = r.get("reason", "")
        return (r.get("label", r["method"]), f"{r['status']}: {reason[:70]}") + ("-",) * (len(_COLS) - 2)
    f = lambda k, fmt: fmt.format(r[k]) if k in r and r[k] is not None and not math.isnan(r[k]) else "-"  # noqa: E731
    return (r.get("label", r["method"]), r["status"], f"{r['time_s_median'] * 1e3:.2f}", f("time_vs_floor", "{:.2f}"),
            f("time_vs_eager", "{:.3f}"), f"{r['peak_extra_bytes'] / MIB:.1f}", f("memory_vs_bound", "{:.3f}"),
            f("memory_vs_eager", "{:.3f}"), f"{r['errors']['loss']:.1e}", f"{r['max_grad_err']:.1e}")


def text_table(t) -> str:
    rows = [_COLS] + [_row(r) for r in t["results"]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown(ts: List[dict], title: str, device: str = "", command: str = "") -> str:
    """The whole report as markdown: per shape its reference, floors, table and goals."""
    out = [f"# {title}", ""]
    if device:
        out.append(f"Device: {device}")
    if command:
        out.append(f"Command: `{command}`")
    out += ["", "Times are medians; memory is the peak allocated beyond what was allocated before the step; "
                "errors are relative to a float64 reference of the same inputs (SPEC 7 tolerances; WRONG "
                "outside them). Lower is better everywhere.", ""]
    for t in ts:
        s, fl = t["shape"], t["floor"]
        out.append(f"## {s.describe()}")
        out.append("")
        ref = t["reference"]
        if ref:
            out.append(f"Reference loss {ref['loss']:.6g}; completion tokens with top probability > 0.9: "
                       f"{ref['top_prob_share']:.1%}.")
        floor_txt = f"Floor: {fl['work']:.3g} {fl['unit']} = {fl['floor_s_nominal'] * 1e3:.2f} ms at the nominal rate"
        if "floor_s_measured" in fl:
            floor_txt += f", {fl['floor_s_measured'] * 1e3:.2f} ms at the rate measured in this run"
        out.append(floor_txt + ("." if not t["memory_lower_bound_bytes"] else
                                f"; memory lower bound {t['memory_lower_bound_bytes'] / MIB:.1f} MiB."))
        out.append("")
        out.append("| " + " | ".join(_COLS) + " |")
        out.append("|" + "---|" * len(_COLS))
        for r in t["results"]:
            out.append("| " + " | ".join(_row(r)) + " |")
        out.append("")
        for desc, value, limit, verdict in goals(t):
            v = "-" if value is None else f"{value:.3f}"
            out.append(f"- {desc}: {v} ({verdict})")
        out.append("")
    return "\n".join(out)


def plot(ts: List[dict], path: str, title: str) -> None:
    """Per shape, time and memory bars with value labels; unavailable / failed methods listed by name;
    the memory lower bound as a line. Lower is better."""
    if not ts:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = len(ts)
    tall = max([len(t["results"]) for t in ts] + [1])
    fig, axes = plt.subplots(n, 2, figsize=(12, 1.2 + (0.42 * tall + 0.9) * n), squeeze=False)
    for i, t in enumerate(ts):
        ok = [r for r in t["results"] if "time_s_median" in r]
        other = [r for r in t["results"] if "time_s_median" not in r]
        names = [r.get("label", r["method"]) + ("" if r["status"] == "ok" else f" ({r['status']})") for r in ok]
        for ax, vals, color, xlabel in (
                (axes[i][0], [r["time_s_median"] * 1e3 for r in ok], "tab:blue", "time per step, ms (median; lower is better)"),
                (axes[i][1], [r["peak_extra_bytes"] / MIB for r in ok], "tab:orange",
                 "peak extra memory, MiB (lower is better)")):
            bars = ax.barh(names, vals, color=color)
            ax.bar_label(bars, labels=[f"{v:.1f}" for v in vals], padding=2, fontsize=7)
            ax.set_xlabel(xlabel, fontsize=8)
            ax.tick_params(labelsize=7)
            ax.invert_yaxis()
            if vals and max(vals) > 0:
                ax.set_xlim(0, max(vals) * 1.25)
        if t["memory_lower_bound_bytes"]:
            bound = t["memory_lower_bound_bytes"] / MIB
            axes[i][1].set_xlim(0, 1.25 * max([bound] + [r["peak_extra_bytes"] / MIB for r in ok]))
            axes[i][1].axvline(t["memory_lower_bound_bytes"] / MIB, color="k", ls="--", lw=1,
                               label="lower bound (dhidden + dW)")
            axes[i][1].legend(fontsize=7, loc="lower right")
        if any("time_vs_floor" in r for r in ok):
            axes[i][0].axvline(t["floor"]["floor_s_nominal"] * 1e3, color="k", ls="--", lw=1, label="floor (nominal)")
            axes[i][0].legend(fontsize=7, loc="lower right")
        axes[i][0].set_title(t["shape"].describe(), fontsize=8, loc="left")
        if other:
            axes[i][1].set_title("not measured: " + ", ".join(f"{r.get('label', r['method'])} ({r['status']})"
                                                              for r in other), fontsize=7, loc="left")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
