"""The end-to-end step of the GPU harness: a full DPO training step on a Qwen2.5-0.5B-shaped model.

    python3 -m benchmarks.gpu e2e [--dry-run] [--methods spo,trl,eager] [--mem-budget-gib 40] [--gradient-checkpointing]

One step = policy forward + backward, reference forward (a frozen copy), AdamW step, on a randomly
initialized ``Qwen2ForCausalLM`` with Qwen2.5-0.5B's shape (24 layers, hidden 896, 14 heads / 2 KV heads,
V = 151936, tied embeddings; bf16 weights, SDPA attention). Each sequence is half prompt, half completion;
the loss is DPO sigmoid, beta 0.1, on summed completion log-probs. The methods differ only in how the
per-sequence log-probs leave the model:

- ``spo``: this package, as the reference trainer runs it: the fused linear loss inside the model's
  forward (training.modeling.PolicyWithLoss; the reference's log-probs from SequenceLogps); no logits.
- ``trl``: TRL 1.16 DPOTrainer's own computation: its fused LM head (``ChunkedLogProbFunction``, called
  as its patched forward calls it, the policy with its logged per-token outputs) on the backbone's
  hidden states, then its sigmoid loss (benchmarks.methods' ``trl`` peer, on the same model).
- ``eager``: the model's own forward (full ``[2P, T, V]`` bf16 logits), fp32 upcast, log_softmax, gather.

Per method, in its own process (so peaks do not mix), JSON lines appended as measured:
1. ``kind="e2e"``: at the throughput shape, the first step's loss (checked against the other methods in
   the report: the same model and inputs must give the same loss), then the median step time over
   ``--repeats`` steps, tokens/s (policy tokens 2P x T per step) and peak memory (CUDA
   ``max_memory_allocated``: total, and extra over the weights and optimizer state held between steps;
   on the CPU the resident-set peak over the state, as benchmarks.worker measures it);
2. ``kind="e2e_longest"``: the longest sequence (one pair, T tokens each) whose step fits the memory
   budget, by doubling then bisection to ``granularity`` tokens; a step fits when it raises no
   out-of-memory error and its peak stays within the budget (CUDA: the allocator is capped at the
   budget with ``set_per_process_memory_fraction``; CPU dry run: the peak extra resident set).

``--gradient-checkpointing`` (results ``E2E-gc.*``): the same with the policy's decoder layers recomputed in
backward (Hugging Face's own), the setting of long-sequence training, where the activations no longer
hide the memory of the log-prob computation. ``--dry-run``: the same code on the CPU with a tiny Qwen2
(V = 97) and tiny sequences.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Callable, List

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
METHODS = ("spo", "trl", "eager")
BETA = 0.1

# Qwen2.5-0.5B's architecture (its config.json), randomly initialized: nothing is downloaded.
QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=131072,
                  rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
TINY_QWEN2 = dict(vocab_size=97, hidden_size=40, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                  rope_theta=10_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)


@dataclass
class E2EPlan:
    """What one e2e run measures (the same for every method)."""

    model: dict
    dtype: str                 # "bf16" | "fp32"
    pairs: int                 # P at the throughput shape (2P sequences)
    seq_len: int               # T at the throughput shape
    repeats: int
    mem_budget_bytes: int      # the longest-sequence search's budget
    budget_counts: str         # "total" (CUDA: everything allocated) | "extra" (CPU: over the state)
    search_start: int          # first T tried, then doubled
    search_max: int            # largest T tried
    granularity: int           # bisection stops at this many tokens
    gradient_checkpointing: bool = False  # recompute each decoder layer in backward (HF's own)

    @classmethod
    def gpu(cls, mem_budget_gib: float = 40.0, repeats: int = 5, gradient_checkpointing: bool = False) -> "E2EPlan":
        return cls(model=QWEN25_05B, dtype="bf16", pairs=2, seq_len=2048, repeats=repeats,
                   mem_budget_bytes=int(mem_budget_gib * 2**30), budget_counts="total", search_start=1024,
                   search_max=131072, granularity=512, gradient_checkpointing=gradient_checkpointing)

    @classmethod
    def dry(cls, repeats: int = 2) -> "E2EPlan":
        return cls(model=TINY_QWEN2, dtype="fp32", pairs=1, seq_len=24, repeats=repeats,
                   mem_budget_bytes=64 * 2**20, budget_counts="extra", search_start=16, search_max=64,
                   granularity=16)


# ---------------------------------------------------------------------------------------------
# one method's training step
# ---------------------------------------------------------------------------------------------

def build_models(plan: E2EPlan, device: torch.device):
    """Policy and frozen reference: the same random weights in every process (seed 0)."""
    # The model class itself: the Auto factory would import every architecture's module first.
    from transformers.models.qwen2 import Qwen2Config, Qwen2ForCausalLM
    config = Qwen2Config(**plan.model)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if plan.dtype == "bf16" else torch.float32
    policy = Qwen2ForCausalLM._from_config(config, attn_implementation="sdpa", dtype=dtype).to(device)
    if plan.gradient_checkpointing:
        # transformers >= 5.2x names it activation_checkpointing_enable (the old name warns); older 5.x do not.
        enable = getattr(policy, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy.train()
    # The reference is another random model (seed 1), so that the first step's loss depends on both
    # models' log-probs and the methods' losses can be compared (a copy of the policy would give log 2).
    torch.manual_seed(1)
    reference = Qwen2ForCausalLM._from_config(config, attn_implementation="sdpa", dtype=dtype).to(device)
    reference.requires_grad_(False).eval()
    return policy, reference


def make_batch(plan: E2EPlan, pairs: int, seq_len: int, device: torch.device, seed: int = 1):
    """``input_ids``, ``attention_mask``, ``labels`` ``[2P, T]``: random tokens, the first half of each row
    prompt; labels aligned to positions (position t's target is token t+1) on the completion."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, plan.model["vocab_size"], (2 * pairs, seq_len), generator=gen)
    labels = torch.full_like(ids, -100)
    start = seq_len // 2 - 1
    labels[:, start:-1] = ids[:, start + 1:]
    return ids.to(device), torch.ones_like(ids).to(device), labels.to(device)


def dpo_sigmoid(L, R):
    P = L.shape[0] // 2
    return -torch.nn.functional.logsigmoid(BETA * ((L[:P] - R[:P]) - (L[P:] - R[P:]))).mean()


def make_step(method: str, policy, reference, labels) -> Callable:
    """``step(input_ids, attention_mask) -> loss``: forward and backward of this method (no optimizer)."""
    if method == "spo":
        from spo_kernels import PreferenceLossConfig
        from training.modeling import PolicyWithLoss, SequenceLogps
        policy_loss = PolicyWithLoss(policy, PreferenceLossConfig(beta=BETA))
        ref_logps = SequenceLogps(reference)

        def step(ids, mask):
            out = policy_loss(ids, labels, attention_mask=mask, ref_logps=ref_logps(ids, labels, attention_mask=mask))
            out.loss.backward()
            return out.loss.detach()
        return step
    if method == "trl":
        from benchmarks.methods import _trl_logps
        from training.modeling import final_hidden, lm_head
        policy_fn, ref_fn = _trl_logps(labels)

        def step(ids, mask):
            hidden = final_hidden(policy, ids, mask)
            L = policy_fn(hidden, lm_head(policy).weight)
            with torch.no_grad():
                R = ref_fn(final_hidden(reference, ids, mask), lm_head(reference).weight)
            loss = dpo_sigmoid(L.float(), R.float())
            loss.backward()
            return loss.detach()
        return step
    if method == "eager":
        from benchmarks.methods import eager_sequence_logps

        def step(ids, mask):
            L = eager_sequence_logps(policy(input_ids=ids, attention_mask=mask, use_cache=False).logits, labels)
            with torch.no_grad():
                R = eager_sequence_logps(reference(input_ids=ids, attention_mask=mask, use_cache=False).logits,
                                         labels)
            loss = dpo_sigmoid(L, R)
            loss.backward()
            return loss.detach()
        return step
    raise ValueError(f"unknown e2e method {method!r}; expected one of {list(METHODS)}")


class Memory:
    """Peak memory of a step: CUDA allocator statistics, or the CPU resident set (as benchmarks.worker)."""

    def __init__(self, device: torch.device):
        from benchmarks.worker import Meter
        self.device = device
        self.meter = Meter(str(device))

    def start(self) -> None:
        self.meter.start()

    def peaks(self) -> dict:
        extra = self.meter.peak_extra()
        total = torch.cuda.max_memory_allocated() if self.device.type == "cuda" else None
        return {"peak_extra_bytes": int(extra), "peak_total_bytes": None if total is None else int(total)}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_throughput(method: str, plan: E2EPlan, device: torch.device) -> dict:
    policy, reference = build_models(plan, device)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-6)
    ids, mask, labels = make_batch(plan, plan.pairs, plan.seq_len, device)
    step = make_step(method, policy, reference, labels)

    def full_step():
        loss = step(ids, mask)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    first_loss = float(full_step())  # also the warm-up (kernel compilation, optimizer state allocation)
    memory = Memory(device)
    memory.start()
    full_step()
    peaks = memory.peaks()
    times = []
    for _ in range(plan.repeats):
        _sync(device)
        t0 = time.perf_counter()
        full_step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    tokens = 2 * plan.pairs * plan.seq_len
    return {"status": "ok", "first_loss": first_loss, "time_s_median": median, "time_s_all": times,
            "tokens_per_step": tokens, "tokens_per_s": tokens / median, **peaks}


def longest_sequence(method: str, plan: E2EPlan, device: torch.device, deadline: float, log=print) -> dict:
    """The largest T (one pair) whose full step fits ``plan.mem_budget_bytes`` (see the module docstring)."""
    policy, reference = build_models(plan, device)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-6)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        total = torch.cuda.get_device_properties(index).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, plan.mem_budget_bytes / total), index)
    probes = []

    def fits(T: int) -> bool:
        ids, mask, labels = make_batch(plan, 1, T, device)
        memory = Memory(device)
        ok, reason = True, ""
        try:
            memory.start()
            make_step(method, policy, reference, labels)(ids, mask)
            optimizer.step()
            peaks = memory.peaks()
            used = peaks["peak_total_bytes"] if plan.budget_counts == "total" else peaks["peak_extra_bytes"]
            if used > plan.mem_budget_bytes:
                ok, reason = False, f"peak {used / 2**20:.0f} MiB over the budget"
        except torch.OutOfMemoryError:
            ok, reason, peaks = False, "out of memory", {}
        finally:
            optimizer.zero_grad(set_to_none=True)
            del ids, mask, labels
            _free(device)
        probes.append({"T": T, "fits": ok, "reason": reason, **peaks})
        log(f"  {method}: T={T}: {'fits' if ok else 'does not fit (' + reason + ')'}")
        return ok

    found = search_longest(fits, plan.search_start, plan.search_max, plan.granularity, deadline)
    return dict(found, probes=probes, mem_budget_bytes=plan.mem_budget_bytes, budget_counts=plan.budget_counts)


def search_longest(fits: Callable[[int], bool], start: int, limit: int, granularity: int,
                   deadline: float = float("inf")) -> dict:
    """The largest ``T`` (a multiple of ``granularity``, at most ``limit``) with ``fits(T)``, assuming
    fitting is monotone: doubling from ``start`` to the first failure, then bisection until the gap is
    ``granularity``. ``status`` is "incomplete" when ``deadline`` (time.monotonic) cut it short."""
    lo, hi, T = 0, None, start
    while T <= limit and time.monotonic() < deadline:
        if not fits(T):
            hi = T
            break
        lo, T = T, 2 * T
    capped = hi is None and T > limit
    if capped and lo < limit and time.monotonic() < deadline:  # the cap itself, when doubling jumped past it
        if fits(limit):
            lo = limit
        else:
            hi = limit
        capped = hi is None
    while hi is not None and hi - lo > granularity and time.monotonic() < deadline:
        mid = (lo + hi) // 2 // granularity * granularity
        if mid <= lo:
            break
        if fits(mid):
            lo = mid
        else:
            hi = mid
    complete = capped or (hi is not None and (hi - lo <= granularity or (lo + hi) // 2 // granularity * granularity <= lo))
    return {"status": "ok" if complete else "incomplete", "longest_T": lo, "first_failing_T": hi,
            "capped_at_search_max": capped}


def worker_main(argv=None) -> int:
    """``python -m benchmarks.gpu.e2e --method M --plan JSON --device D --jsonl FILE --deadline S``."""
    from benchmarks.worker import append_line
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", required=True, choices=METHODS)
    ap.add_argument("--plan", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--jsonl", required=True)
    ap.add_argument("--tag", default="")
    ap.add_argument("--deadline-s", type=float, default=300.0, help="stop the search after this long")
    ap.add_argument("--parts", default="throughput,longest")
    args = ap.parse_args(argv)
    plan = E2EPlan(**json.loads(args.plan))
    device = torch.device(args.device)
    deadline = time.monotonic() + args.deadline_s
    base = {"tag": args.tag, "device": args.device, "method": args.method, "plan": asdict(plan)}
    for part in args.parts.split(","):
        t0 = time.perf_counter()
        kind = "e2e" if part == "throughput" else "e2e_longest"
        rec = dict(base, kind=kind)
        try:
            if part == "throughput":
                rec.update(measure_throughput(args.method, plan, device))
            else:
                rec.update(longest_sequence(args.method, plan, device, deadline,
                                            log=lambda m: print(m, flush=True)))
        except Exception as e:  # noqa: BLE001 - a method that cannot run is a result too
            from benchmarks.methods import Unavailable
            status = "unavailable" if isinstance(e, Unavailable) else "error"
            rec.update(status=status, reason=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}",
                       traceback=traceback.format_exc()[-3000:])
        rec["seconds"] = time.perf_counter() - t0
        append_line(args.jsonl, rec)
        _free(device)
    return 0


# ---------------------------------------------------------------------------------------------
# the harness step: one process per method, then the report
# ---------------------------------------------------------------------------------------------

def run_step(args, env: dict, log, started: float) -> int:
    """``python3 -m benchmarks.gpu e2e``: every method not yet in the JSONL file (``--resume``), each in
    its own process within the step's budget, then ``E2E.md`` / ``E2E.json`` from what finished."""
    from benchmarks import runner
    from benchmarks.worker import append_line
    name = "E2E" + ("-gc" if args.gradient_checkpointing else "") + ("-dry" if args.dry_run else "")
    device = "cpu" if args.dry_run else "cuda"
    if not args.dry_run and not torch.cuda.is_available():
        log("no CUDA device: use --dry-run on a CPU")
        return 2
    plan = (E2EPlan.dry() if args.dry_run else
            E2EPlan.gpu(args.mem_budget_gib, args.repeats or 5, args.gradient_checkpointing))
    plan.gradient_checkpointing = args.gradient_checkpointing
    if args.dry_run and args.repeats:
        plan.repeats = args.repeats
    methods = args.methods.split(",") if args.methods else list(METHODS)
    jsonl = os.path.join(args.out_dir, f"{name}.jsonl")
    if not args.resume and os.path.exists(jsonl):
        os.remove(jsonl)
    from benchmarks.cli import device_name, versions
    append_line(jsonl, {"kind": "environment", "tag": name, "device": device_name(device), "versions": versions(),
                        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z")})
    log(f"{name}: {device_name(device)}; model {plan.model['num_hidden_layers']} layers, H={plan.model['hidden_size']}, "
        f"V={plan.model['vocab_size']}, {plan.dtype}; throughput at P={plan.pairs}, T={plan.seq_len}; longest T "
        f"within {plan.mem_budget_bytes / 2**30:.2f} GiB ({plan.budget_counts})")
    try:
        for method in methods:
            done = {r["kind"] for r in runner.read_lines(jsonl) if r.get("method") == method
                    and r.get("status") in ("ok", "unavailable")}
            parts = [p for p, kind in (("throughput", "e2e"), ("longest", "e2e_longest")) if kind not in done]
            if not parts:
                continue
            left = args.budget_s - (time.monotonic() - started)
            if left < 20:
                log(f"  {method}: skipped (the step's budget of {args.budget_s:.0f} s ran out)")
                append_line(jsonl, {"kind": "e2e", "method": method, "status": "skipped",
                                    "reason": "the step's time budget ran out"})
                continue
            log(f"  {method}: {', '.join(parts)} ({left:.0f} s left)")
            cmd = [sys.executable, "-m", "benchmarks.gpu.e2e", "--method", method, "--plan", json.dumps(asdict(plan)),
                   "--device", device, "--jsonl", os.path.abspath(jsonl), "--tag", name,
                   "--deadline-s", str(max(10.0, left * 0.8)), "--parts", ",".join(parts)]
            try:
                proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=left,
                                      start_new_session=True)
                for line in proc.stdout.splitlines():
                    log(line)
                if proc.returncode != 0:
                    log(f"  {method}: worker exited {proc.returncode}: {proc.stderr[-1500:]}")
            except subprocess.TimeoutExpired:
                log(f"  {method}: killed (the step's budget ran out)")
    finally:
        write_report(name, args.out_dir, log)
    return 0


def summarize(lines: List[dict]) -> dict:
    """Per method: the throughput line and the longest-sequence line (the last of each), and the ratios
    of ``spo`` to ``trl`` against the issue's goals."""
    rows = {}
    for r in lines:
        if r.get("kind") in ("e2e", "e2e_longest") and "method" in r:
            rows.setdefault(r["method"], {})[r["kind"]] = r
    ok = {m: v["e2e"] for m, v in rows.items() if v.get("e2e", {}).get("status") == "ok"}
    base_loss = ok.get("eager", next(iter(ok.values()), {})).get("first_loss")
    checks = {}
    for m, r in ok.items():
        # Same model, same inputs: the same loss, to bf16 accuracy (fp32 in the dry run).
        tol = 2e-2 if r["plan"]["dtype"] == "bf16" else 1e-4
        checks[m] = None if base_loss is None else abs(r["first_loss"] - base_loss) <= tol * max(1.0, abs(base_loss))
    goals = []
    if "spo" in ok and "trl" in ok:
        ratio = ok["spo"]["tokens_per_s"] / ok["trl"]["tokens_per_s"]
        goals.append(("tokens/s: spo / trl >= 1.3", ratio, ratio >= 1.3))
    longest = {m: v["e2e_longest"] for m, v in rows.items() if v.get("e2e_longest", {}).get("status") in ("ok", "incomplete")}
    if "spo" in longest and "trl" in longest and longest["trl"]["longest_T"]:
        ratio = longest["spo"]["longest_T"] / longest["trl"]["longest_T"]
        goals.append(("longest sequence at equal memory: spo / trl >= 2", ratio, ratio >= 2.0))
    return {"rows": rows, "loss_agrees": checks, "goals": goals}


def _mib(x):
    return "-" if x is None else f"{x / 2**20:,.0f}"


def write_report(name: str, out_dir: str, log) -> None:
    from benchmarks import runner
    lines = runner.read_lines(os.path.join(out_dir, f"{name}.jsonl"))
    env = next((r for r in lines if r.get("kind") == "environment"), {})
    s = summarize(lines)
    gc_note = " (gradient checkpointing)" if "-gc" in name else ""
    md = [f"# {name}: a full DPO step (policy fwd+bwd, reference fwd, AdamW) on a Qwen2.5-0.5B-shaped model{gc_note}"
          if not name.endswith("-dry") else f"# {name}: the e2e step's dry run (tiny Qwen2, CPU){gc_note}", "",
          f"Device: {env.get('device', '?')}. Versions: {json.dumps(env.get('versions', {}))}. "
          f"Command: `python3 -m benchmarks.gpu e2e{' --gradient-checkpointing' if gc_note else ''}"
          f"{' --dry-run' if name.endswith('-dry') else ''}`.", "",
          "| method | status | first loss (same for all) | step ms | tokens/s | peak total MiB | peak extra MiB "
          "| longest T at budget |",
          "|---|---|---:|---:|---:|---:|---:|---:|"]
    for method in METHODS:
        row = s["rows"].get(method)
        if row is None:
            continue
        e, lg = row.get("e2e", {}), row.get("e2e_longest", {})
        if e.get("status") == "ok":
            agree = s["loss_agrees"].get(method)
            loss = f"{e['first_loss']:.5f}" + ("" if agree in (None, True) else " DISAGREES")
            cells = [loss, f"{e['time_s_median'] * 1e3:,.1f}", f"{e['tokens_per_s']:,.0f}",
                     _mib(e.get("peak_total_bytes")), _mib(e.get("peak_extra_bytes"))]
        else:
            cells = [f"{e.get('status', '-')}: {e.get('reason', '')}", "-", "-", "-", "-"]
        if lg.get("status") in ("ok", "incomplete"):
            longest = f"{lg['longest_T']:,}" + (" (search cap)" if lg.get("capped_at_search_max") else "") + \
                      ("" if lg["status"] == "ok" else " (search cut by the budget)")
        else:
            longest = lg.get("status", "-") + (f": {lg.get('reason', '')}" if lg.get("reason") else "")
        md.append(f"| {method} | {e.get('status', '-')} | " + " | ".join(cells) + f" | {longest} |")
    md.append("")
    for desc, value, met in s["goals"]:
        md.append(f"- goal: {desc}: {value:.2f} ({'met' if met else 'missed'})")
    text = "\n".join(md) + "\n"
    for line in md:
        log(line)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump({"environment": env, "summary": {"loss_agrees": s["loss_agrees"], "goals": s["goals"]},
                   "lines": [r for r in lines if r.get("kind") != "environment"]}, f, indent=1)
    log(f"wrote {os.path.join(out_dir, name)}.jsonl / .md / .json")


if __name__ == "__main__":
    raise SystemExit(worker_main())
