"""Conformance: every backend, on both paths, against the float64 reference backend (SPEC 6, 7).

Factors: backend (torch, cpu, triton through the interpreter) x path (logits, fused linear) x layout
(padded, packed) x input dtype (fp32, bf16) x loss type (every one of ``LOSS_TYPES``) x options: softcap,
temperature, a logit multiplier, bias, a frozen head, an SFT term, token weights, per-token statistics
(their metrics), Hugging Face labels (``shift_labels``), SPO (off; on with the reference anchor and per-token means; on with a
tensor anchor, summed, with a margin), label smoothing (only where the loss has it), ``reference_free``,
an empty completion (packed: a sequence with no rows at all), the reference given as model inputs or as
precomputed log-probs, and the logits path's in-place or allocated backward.

The full product is far too large at interpreter speed, so :data:`DESIGN` is a covering design: every
pair of factor values that can occur together occurs in at least one case (a greedy pairwise generator
with a fixed seed, below; :func:`test_design_covers_every_pair` checks it). The cheap backends (torch,
cpu) also run the full product of path x dtype x loss type, the layout and the options rotating.

Each case runs one step through the public API on fresh random inputs with odd sizes (V=97, H=40, ragged
prompts and padding), with every ``torch.empty`` of the step NaN-poisoned, and asserts the loss, every
metric, the counts, the policy and reference log-probs, and every gradient (logits, or hidden / weight /
bias) against ``backend="reference"`` on float64 copies of the same inputs, with SPEC 7's tolerances
(``batches.TOL``); rows outside the completions must get exactly zero gradient. With CUDA, the triton
and torch backends run compiled on the GPU (the oracle stays on the CPU).
:func:`test_a_wrong_result_fails` shows that the comparison catches a wrong number of each kind.
"""

from __future__ import annotations

import itertools
import random
import zlib

import pytest
import torch

import spo_kernels as sk
from batches import IGNORE, assert_matches_reference, make_batch, pack, packed_lengths, run_step

pytest.importorskip("triton")
from spo_kernels.backends.cpu import extension_available  # noqa: E402
from spo_kernels.config import SMOOTHED_LOSSES as SMOOTHED  # noqa: E402

LINEAR_ONLY = ("bias", "frozen_head")
LOGITS_ONLY = ("inplace",)
NA = "n/a"  # the value of a factor that means nothing in a case (a logits-only option on the linear path)

FACTORS = {
    "backend": ["torch", "cpu", "triton"],
    "path": ["logits", "fused_linear"],
    "layout": ["padded", "packed"],
    "dtype": ["fp32", "bf16"],
    "loss_type": list(sk.LOSS_TYPES),
    "softcap": [None, 5.0],
    "temperature": [1.0, 0.7],
    "spo": ["off", "mean-reference", "sum-tensor"],
    "label_smoothing": [0.0, 0.1],
    "reference_free": [False, True],
    "sft_weight": [0.0, 0.3],
    "logit_multiplier": [1.0, 0.7],
    "token_weights": [False, True],
    "token_stats": [False, True],
    "shift_labels": [False, True],
    "empty": [False, True],
    "ref": ["inputs", "logps"],
    "bias": [True, False],
    "frozen_head": [False, True],
    "inplace": [True, False],
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------
# the covering design
# ---------------------------------------------------------------------------------------------

def _applicable(name, case) -> bool:
    """Whether factor ``name`` means anything in ``case`` (a dict that has ``path``)."""
    if name in LINEAR_ONLY:
        return case["path"] == "fused_linear"
    if name in LOGITS_ONLY:
        return case["path"] == "logits"
    return True


def _legal(case) -> bool:
    """The constraints between factor values, on a partial case (absent factors are unconstrained)."""
    if case.get("label_smoothing", 0.0) and case.get("loss_type", SMOOTHED[0]) not in SMOOTHED:
        return False
    path = case.get("path")
    linear_only = any(case.get(n, NA) != NA for n in LINEAR_ONLY)
    logits_only = any(case.get(n, NA) != NA for n in LOGITS_ONLY)
    if (path == "logits" and linear_only) or (path == "fused_linear" and logits_only):
        return False
    return not (linear_only and logits_only)  # a linear-only and a logits-only option never meet


def _pairs(case):
    names = [n for n in FACTORS if case.get(n, NA) != NA]
    return {((a, case[a]), (b, case[b])) for a, b in itertools.combinations(names, 2)}


ORDER = {name: i for i, name in enumerate(FACTORS)}


def _new_pairs(case, name, value):
    """The pairs ``(name, value)`` forms with the factors already set in ``case`` (as :func:`_pairs` orders them)."""
    out = set()
    for other, v in case.items():
        if v == NA or other == name:
            continue
        a, b = ((name, value), (other, v)) if ORDER[name] < ORDER[other] else ((other, v), (name, value))
        out.add((a, b))
    return out


def required_pairs():
    """Every pair of factor values that some legal case contains."""
    out = set()
    for a, b in itertools.combinations(FACTORS, 2):
        for va in FACTORS[a]:
            for vb in FACTORS[b]:
                if _legal({a: va, b: vb}):
                    out.add(((a, va), (b, vb)))
    return out


def covering_design(seed=0, candidates=8):
    """Greedy pairwise design: each new case starts from an uncovered pair, then fills the other factors
    (path first: it decides which options apply) with the value that covers the most uncovered pairs, ties
    broken by a fixed-seed random generator; the best of ``candidates`` tries is kept."""
    rng = random.Random(seed)
    uncovered = required_pairs()
    design = []
    while uncovered:
        start = min(uncovered, key=repr)
        best, best_gain = None, -1
        for _ in range(candidates):
            case = dict(start)
            order = [n for n in FACTORS if n not in case and n != "path"]
            rng.shuffle(order)
            for name in (["path"] if "path" not in case else []) + order:
                if not _applicable(name, case):
                    case[name] = NA
                    continue
                options = [v for v in FACTORS[name] if _legal({**case, name: v})]
                rng.shuffle(options)
                case[name] = max(options, key=lambda v: len(_new_pairs(case, name, v) & uncovered))
            gain = len(_pairs(case) & uncovered)
            if gain > best_gain:
                best, best_gain = case, gain
        assert best_gain > 0, f"no legal case covers {start}"
        design.append(best)
        uncovered -= _pairs(best)
    return design


DESIGN = covering_design()


def _case_id(case):
    parts = [case["backend"], case["path"], case["layout"], case["dtype"], case["loss_type"]]
    for name in ("softcap", "temperature", "label_smoothing", "sft_weight", "logit_multiplier"):
        if case[name] not in (None, 1.0, 0.0):
            parts.append(f"{name}{case[name]}")
    if case["spo"] != "off":
        parts.append(f"spo-{case['spo']}")
    for name in ("reference_free", "empty", "token_weights", "token_stats", "shift_labels"):
        if case[name]:
            parts.append(name)
    parts.append(f"ref-{case['ref']}")
    if case["path"] == "fused_linear":
        parts += (["bias"] if case["bias"] else []) + (["frozen"] if case["frozen_head"] else [])
    else:
        parts.append("inplace" if case["inplace"] else "alloc")
    return "-".join(parts)


def test_design_covers_every_pair():
    """Every legal pair of factor values is in some case, and every case is legal."""
    covered = set().union(*(_pairs(c) for c in DESIGN))
    assert required_pairs() <= covered
    assert all(_legal(c) for c in DESIGN)
    assert {c["loss_type"] for c in DESIGN} == set(sk.LOSS_TYPES)


# ---------------------------------------------------------------------------------------------
# one case
# ---------------------------------------------------------------------------------------------

def build_inputs(case, seed):
    """The case's tensors (in its dtype and layout), loss options and SPO anchor.

    Returns ``(inputs, options, anchor, zero_rows)``: ``inputs`` for :func:`batches.run_step`; ``options``
    its keyword options; ``anchor`` the ``[P]`` SPO anchor tensor or None; ``zero_rows`` the mask of rows
    outside every completion (their gradient must be exactly 0)."""
    dtype = DTYPES[case["dtype"]]
    linear = case["path"] == "fused_linear"
    batch = make_batch(P=2, T=11, H=40, V=97, bias=case["bias"] is not False, seed=seed,
                       empty=(1,) if case["empty"] else ())
    labels = batch.labels
    h, rh = batch.hidden, batch.ref_hidden
    cu = None
    if case["layout"] == "packed":
        lengths = packed_lengths(labels, empty_length=0)  # an empty sequence has no rows at all
        h, packed_labels, cu = pack(h, labels, lengths)
        rh, _, _ = pack(rh, labels, lengths)
        labels = packed_labels
    inputs = dict(labels=labels, cu_seqlens=cu)
    if linear:
        inputs.update(hidden=h.to(dtype), weight=batch.weight.to(dtype),
                      bias=None if batch.bias is None else batch.bias.to(dtype))
        ref_inputs = dict(ref_hidden=rh.to(dtype), ref_weight=batch.ref_weight.to(dtype))
    else:
        b = batch.bias.double()
        inputs["logits"] = (h.double() @ batch.weight.double().t() + b).to(dtype)
        ref_inputs = dict(ref_logits=(rh.double() @ batch.ref_weight.double().t() + b).to(dtype))
    options = dict(loss_type=case["loss_type"], beta=0.5, reference_free=case["reference_free"],
                   sft_weight=case["sft_weight"], temperature=case["temperature"],
                   logit_multiplier=case["logit_multiplier"])
    api = dict(shift_labels=case["shift_labels"], token_stats=case["token_stats"])
    if case["token_weights"]:
        g = torch.Generator().manual_seed(seed + 1)
        api["token_weights"] = 0.25 + 1.5 * torch.rand(labels.shape, generator=g)
    if case["softcap"] is not None:
        options["softcap"] = case["softcap"]
    if case["label_smoothing"]:
        options["label_smoothing"] = case["label_smoothing"]

    # the oracle's log-probs: the precomputed reference log-probs and the tensor anchor are made from them
    transform = dict(softcap=case["softcap"], temperature=case["temperature"],
                     logit_multiplier=case["logit_multiplier"], **api)

    def oracle_logps(*tensors):
        with torch.no_grad():
            if linear:
                hh, w, bb = (None if t is None else t.double() for t in tensors)
                return sk.fused_linear_sequence_logprobs(hh, w, labels, bb, cu_seqlens=cu, backend="reference",
                                                         **transform).logps
            return sk.sequence_logprobs(tensors[0].double(), labels, cu_seqlens=cu, backend="reference",
                                        **transform).logps

    if case["ref"] == "inputs":
        inputs.update(ref_inputs)
    else:
        inputs["ref_logps"] = oracle_logps(*ref_inputs.values(), inputs.get("bias")).float()
    anchor = None
    if case["spo"] == "mean-reference":
        options.update(spo_lambda=1.0)
    elif case["spo"] == "sum-tensor":
        L64 = oracle_logps(*(inputs["hidden"], inputs["weight"], inputs["bias"]) if linear else (inputs["logits"],))
        g = torch.Generator().manual_seed(seed)
        # around the chosen log-probs, so that the penalty is active for some pairs and not for others
        anchor = (L64[:2] - 0.3 + 2.0 * torch.randn(2, generator=g, dtype=torch.float64)).float()
        options.update(spo_lambda=0.5, spo_normalize="sum", spo_margin=0.3, spo_anchor=anchor)
    zero_rows = _target_ignored(labels, cu, case["shift_labels"])
    options.update(api)
    return inputs, options, anchor, zero_rows


def _target_ignored(labels, cu, shift):
    """Rows whose target is ignore_index (their gradient must be exactly 0): with ``shift_labels`` the target
    of a row is the next label of its sequence, and a sequence's last row has none."""
    if not shift:
        return labels == IGNORE
    nxt = torch.full_like(labels, IGNORE)
    if cu is None:
        nxt[:, :-1] = labels[:, 1:]
    else:
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            nxt[a:max(a, b - 1)] = labels[a + 1:b]
    return nxt == IGNORE


def check_case(case, seed=None):
    """Run the case on its backend and on the float64 oracle; assert SPEC 7 conformance."""
    if case["backend"] == "cpu" and not extension_available():
        pytest.skip("spo_kernels._cpu (the cpu backend's C++ extension) is not built")
    seed = zlib.crc32(_case_id(case).encode()) % 10_000 if seed is None else seed
    inputs, options, anchor, zero_rows = build_inputs(case, seed)
    run = dict(path=case["path"], inputs=inputs, inplace=case["inplace"] is not False,
               frozen=case["frozen_head"] is True, **options)
    want, want_grads = run_step(backend="reference", upcast=True, **run)
    # on a CUDA machine the GPU backends run compiled, on the GPU; the cpu backend stays on the CPU
    device = "cuda" if torch.cuda.is_available() and case["backend"] != "cpu" else None
    out, grads = run_step(backend=case["backend"], poison=True, device=device, **run)
    cfg = sk.PreferenceLossConfig(**{k: v for k, v in options.items()
                                     if k not in ("spo_anchor", "shift_labels", "token_weights", "token_stats")})
    assert_matches_reference(out, grads, want, want_grads, dtype=DTYPES[case["dtype"]], cfg=cfg, anchor=anchor,
                             zero_rows=zero_rows)
    return out, grads, want, want_grads, cfg, anchor, zero_rows


@pytest.mark.parametrize("case", DESIGN, ids=[_case_id(c) for c in DESIGN])
def test_backend_matches_reference(case):
    check_case(case)


# ---------------------------------------------------------------------------------------------
# the full product for the cheap backends
# ---------------------------------------------------------------------------------------------

CHEAP = [dict(backend=backend, path=path, dtype=dtype, loss_type=loss_type)
         for backend in ("torch", "cpu") for path in FACTORS["path"] for dtype in FACTORS["dtype"]
         for loss_type in FACTORS["loss_type"]]


def _rotated_options(i, case):
    """The options of the i-th full-product case: each factor cycles through its values at its own pace."""
    out = dict(case)
    for k, name in enumerate(n for n in FACTORS if n not in case):
        values = FACTORS[name]
        out[name] = values[(i // (k + 1)) % len(values)] if _applicable(name, out) else NA
    if not _legal(out):
        out["label_smoothing"] = 0.0
    return out


CHEAP = [_rotated_options(i, c) for i, c in enumerate(CHEAP)]


@pytest.mark.parametrize("case", CHEAP, ids=[_case_id(c) for c in CHEAP])
def test_cheap_backends_full_product(case):
    check_case(case)


# ---------------------------------------------------------------------------------------------
# the comparison can fail
# ---------------------------------------------------------------------------------------------

def _perturbations(out, grads, zero_rows):
    """(what, mutate): small wrong results of every kind a backend could return."""
    yield "loss", lambda o, g: setattr(o, "loss", o.loss * (1 + 1e-3) + 1e-3)
    yield "loss NaN", lambda o, g: setattr(o, "loss", o.loss * float("nan"))
    yield "policy logps", lambda o, g: setattr(o, "policy_logps", o.policy_logps * torch.tensor([1, 1, 1, 1.001]))
    yield "ref logps", lambda o, g: setattr(o, "ref_logps", o.ref_logps * torch.tensor([1.001, 1, 1, 1]))
    yield "counts", lambda o, g: setattr(o, "counts", o.counts + torch.tensor([0, 0, 1, 0]))
    for name in out.metrics:
        yield f"metric {name}", lambda o, g, name=name: o.metrics.__setitem__(name, o.metrics[name] + 0.01)
    yield "missing metric", lambda o, g: o.metrics.pop("nll")
    for name in grads:
        if grads[name] is None:
            continue
        yield f"d{name} scaled", lambda o, g, name=name: g.__setitem__(name, g[name] * 1.001)
        yield f"d{name} one NaN", lambda o, g, name=name: g[name].view(-1)[-1:].fill_(float("nan"))
        yield f"d{name} dtype", lambda o, g, name=name: g.__setitem__(name, g[name].double())

    def leak_outside(o, g):
        row = int(zero_rows.reshape(-1).nonzero()[0])  # a prompt row
        g["hidden"].view(-1, g["hidden"].shape[-1])[row] = 1e-3

    yield "nonzero outside completions", leak_outside


def test_a_wrong_result_fails():
    """A deliberately wrong backend result (each kind of output, slightly off) fails the comparison."""
    import copy
    case = dict(backend="torch", path="fused_linear", layout="padded", dtype="fp32", loss_type="sigmoid",
                softcap=None, temperature=1.0, spo="mean-reference", label_smoothing=0.0, reference_free=False,
                sft_weight=0.0, logit_multiplier=1.0, token_weights=False, token_stats=False, shift_labels=False,
                empty=False, ref="inputs", bias=True, frozen_head=False, inplace=NA)
    out, grads, want, want_grads, cfg, anchor, zero_rows = check_case(case, seed=1)
    kinds = list(_perturbations(out, grads, zero_rows))
    assert len(kinds) > 15
    for what, mutate in kinds:
        o = copy.copy(out)
        o.metrics = dict(out.metrics)
        g = {k: None if v is None else v.clone() for k, v in grads.items()}
        mutate(o, g)
        with pytest.raises(AssertionError):
            assert_matches_reference(o, g, want, want_grads, dtype=torch.float32, cfg=cfg, anchor=anchor,
                                     zero_rows=zero_rows)
        print("caught:", what)
