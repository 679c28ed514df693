"""The paper's claim over seeds: DPO, SimPO and IPO, each with and without SPO, on the built-in task.

``python -m training reproduce`` (what ``make reproduce`` runs). Per seed:

1. the addition task of :mod:`training.task` (the demo's data, drawn from the seed);
2. one SFT run from scratch on the chosen answers, shared by every method of that seed;
3. every method from that SFT checkpoint with the same seed, data order, learning rate and steps
   (the base losses' own temperatures are in :data:`METHODS`); "+SPO" adds the stability term with
   the settings of :class:`ReproduceSettings` (``spo_lambda``, ``spo_margin``, ``spo_anchor``);
4. held-out evaluation against the SFT model: change of the chosen / rejected summed log-probs, the
   share of pairs whose chosen log-prob fell, and greedy decoding sorted into right answer, the
   rejected answer's final number, another number, or malformed text (not the worked-answer format),
   which is where the probability mass that left the chosen answer went.

Work items (one SFT per seed, then one item per seed and method) run in ``jobs`` worker processes,
one torch thread each. Per-seed results go to ``<out>/seed<k>/result.json``; the aggregate (mean and
sample standard deviation over seeds) to ``<out>/reproduce.md``, ``reproduce.json`` and the
chosen/rejected curves to ``reproduce.png``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from .config import TrainConfig
from .data import write_preference_jsonl
from .demo import DemoSettings, greedy_texts, heldout_logps
from .task import final_answer, make_pairs, split_problems

# name -> loss fields of TrainConfig. Temperatures: DPO's usual beta; IPO's beta sets the target
# per-token log-ratio margin 1/(2 beta) = 1 nat; SimPO's beta and gamma as TRL's CPOTrainer defaults
# for SimPO (beta 2, gamma 0.5 on per-token log-probs).
METHODS: Dict[str, dict] = {
    "DPO": dict(loss_type="sigmoid", beta=0.1),
    "SimPO": dict(loss_type="simpo", beta=2.0, simpo_gamma=0.5),
    "IPO": dict(loss_type="ipo", beta=0.5),
}

# The metrics of the table, in column order: (key, header, format).
METRICS = (
    ("greedy_acc", "greedy acc", "pct"),
    ("d_logp_chosen", "d logp(chosen)", "num"),
    ("d_logp_rejected", "d logp(rejected)", "num"),
    ("chosen_fell", "chosen fell", "pct"),
    ("greedy_rejected", "greedy = rejected ans.", "pct"),
    ("greedy_other", "greedy other number", "pct"),
    ("greedy_malformed", "greedy malformed", "pct"),
)

WORKED_ANSWER = re.compile(r"^\d+\+\d+=\d+(,\d+\+\d+=\d+)*#\d+$")


@dataclass
class ReproduceSettings(DemoSettings):
    """``make reproduce``'s run: the demo's data, SFT, preference-training and SPO settings
    (:class:`training.demo.DemoSettings`, which documents the SPO default), over several seeds and
    methods (the demo's single ``seed`` and ``beta`` are not used: ``seeds`` and each method's own beta)."""

    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])
    methods: List[str] = field(default_factory=lambda: list(METHODS))
    eval_every: int = 50
    jobs: int = 2
    progress: bool = False

    @classmethod
    def quick(cls, **overrides) -> "ReproduceSettings":
        """A seconds-long run of the same pipeline (for tests; not meant to show anything)."""
        values = dict(seeds=[0, 1], methods=["DPO"], train_problems=64, heldout_problems=16, sft_steps=4,
                      sft_batch_size=8, pref_steps=4, pref_batch_size=8, eval_every=2, jobs=1)
        values.update(overrides)
        return cls(**values)

    def spo_fields(self) -> dict:
        return dict(spo_lambda=self.spo_lambda, spo_margin=self.spo_margin, spo_anchor=self.spo_anchor,
                    spo_alpha=self.spo_alpha)


def model_names(methods: Sequence[str]) -> List[str]:
    names = ["SFT"]
    for m in methods:
        names += [m, m + "+SPO"]
    return names


# ---------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------

def classify_greedy(text: str, answer: int, rejected_answer: int) -> str:
    """"right" (the final answer is right: greedy accuracy) | "rejected" (the rejected answer's final
    number, in the worked-answer format) | "other" (another number, in that format) | "malformed" (a
    wrong answer not in that format, or none). The four classes partition the answers."""
    value = final_answer(text)
    if value == answer:
        return "right"
    if not WORKED_ANSWER.match(text):
        return "malformed"
    return "rejected" if value == rejected_answer else "other"


def evaluate(model, tokenizer, heldout_rows: List[dict], base: torch.Tensor) -> dict:
    """One row of the table for ``model``; ``base`` is the SFT model's ``[N, 2]`` held-out log-probs."""
    logps = heldout_logps(model, tokenizer, heldout_rows)
    delta = logps - base
    prompts = [r["prompt"] for r in heldout_rows]
    texts = greedy_texts(model, tokenizer, prompts)
    kinds = [classify_greedy(t, final_answer(r["chosen"]), final_answer(r["rejected"]))
             for t, r in zip(texts, heldout_rows)]
    n = len(kinds)
    return {
        "logp_chosen": float(logps[:, 0].mean()),
        "logp_rejected": float(logps[:, 1].mean()),
        "d_logp_chosen": float(delta[:, 0].mean()),
        "d_logp_rejected": float(delta[:, 1].mean()),
        "chosen_fell": float((delta[:, 0] < 0).float().mean()),
        "greedy_acc": kinds.count("right") / n,  # the demo's accuracy
        "greedy_rejected": kinds.count("rejected") / n,
        "greedy_other": kinds.count("other") / n,
        "greedy_malformed": kinds.count("malformed") / n,
        "greedy_examples": [{"prompt": p, "greedy": t, "kind": k} for p, t, k in list(zip(prompts, texts, kinds))[:5]],
    }


# ---------------------------------------------------------------------------------------------
# work items
# ---------------------------------------------------------------------------------------------

def _seed_dir(out_dir: str, seed: int) -> str:
    return os.path.join(out_dir, f"seed{seed}")


def _sft_config(s: ReproduceSettings, seed: int, out_dir: str) -> TrainConfig:
    return TrainConfig(data=os.path.join(out_dir, "train.jsonl"), out_dir=os.path.join(out_dir, "sft"),
                       objective="sft", max_steps=s.sft_steps, batch_size=s.sft_batch_size, lr=s.sft_lr,
                       warmup_steps=max(1, s.sft_steps // 20), lr_schedule="cosine", weight_decay=0.01,
                       seed=seed, save_every=s.sft_steps, progress=s.progress, plot=False,
                       num_threads=s.num_threads, overwrite=True)


def method_config(s: ReproduceSettings, seed: int, out_dir: str, name: str) -> TrainConfig:
    """The TrainConfig of model ``name`` ("DPO", "DPO+SPO", ...) for one seed."""
    base, spo = name.split("+")[0], name.endswith("+SPO")
    fields = dict(METHODS[base])
    if spo:
        fields.update(s.spo_fields())
    return TrainConfig(data=os.path.join(out_dir, "train.jsonl"), model=os.path.join(out_dir, "sft", "final"),
                       out_dir=os.path.join(out_dir, name.lower().replace("+", "_")), objective="preference",
                       reference="precompute", ref_cache=os.path.join(out_dir, "ref_logps.pt"),
                       max_steps=s.pref_steps, batch_size=s.pref_batch_size, lr=s.pref_lr, lr_schedule="constant",
                       seed=seed, save_every=s.pref_steps, progress=s.progress, plot=False,
                       num_threads=s.num_threads, overwrite=True, **fields)


def run_sft(s: ReproduceSettings, seed: int, out_dir: str) -> dict:
    """Data and SFT of one seed; evaluates the SFT model and saves its held-out log-probs (the base of
    every change) and its reference log-probs of the training pairs (shared by the methods)."""
    from .modeling import load_model
    from .tokenizer import load_tokenizer
    from .trainer import cached_reference_logps, set_threads, train
    from .data import load_preference_jsonl, tokenize_pair

    seed_dir = _seed_dir(out_dir, seed)
    os.makedirs(seed_dir, exist_ok=True)
    previous = set_threads(s.num_threads)
    try:
        started = time.time()
        train_problems, heldout_problems = split_problems(s.train_problems, s.heldout_problems, seed=seed)
        train_rows = make_pairs(train_problems, seed=seed + 1)
        heldout_rows = make_pairs(heldout_problems, seed=seed + 2)
        write_preference_jsonl(os.path.join(seed_dir, "train.jsonl"), train_rows)
        write_preference_jsonl(os.path.join(seed_dir, "heldout.jsonl"), heldout_rows)
        cfg = _sft_config(s, seed, seed_dir)
        train(cfg)
        path = os.path.join(cfg.out_dir, "final")
        tokenizer, model = load_tokenizer(path), load_model(path)
        model.eval()
        base = heldout_logps(model, tokenizer, heldout_rows)
        torch.save(base, os.path.join(seed_dir, "sft_heldout_logps.pt"))
        # The reference cache, once, before the method items run (two could otherwise race to write it).
        ref_cfg = method_config(s, seed, seed_dir, "DPO")
        pairs = [tokenize_pair(tokenizer, row) for row in load_preference_jsonl(ref_cfg.data)]
        cached_reference_logps(ref_cfg, model, pairs, tokenizer)
        row = evaluate(model, tokenizer, heldout_rows, base)
        row.update(model="SFT", seed=seed, seconds=round(time.time() - started, 1))
        _write_json(os.path.join(seed_dir, "sft.json"), {"row": row})
        print(f"[reproduce] seed {seed} SFT: acc {row['greedy_acc']:.1%} ({row['seconds']:.0f} s)", flush=True)
        return row
    finally:
        torch.set_num_threads(previous)


def run_method(s: ReproduceSettings, seed: int, out_dir: str, name: str) -> dict:
    """One preference run from the seed's SFT checkpoint, with its held-out curve and evaluation."""
    from .data import load_preference_jsonl
    from .tokenizer import load_tokenizer
    from .trainer import set_threads, train

    seed_dir = _seed_dir(out_dir, seed)
    previous = set_threads(s.num_threads)
    try:
        started = time.time()
        cfg = method_config(s, seed, seed_dir, name)
        tokenizer = load_tokenizer(cfg.model)
        heldout_rows = load_preference_jsonl(os.path.join(seed_dir, "heldout.jsonl"))
        base = torch.load(os.path.join(seed_dir, "sft_heldout_logps.pt"), weights_only=True)
        curve = [(0, 0.0, 0.0)]

        def track(step, record, model):
            if step % s.eval_every == 0 or step == cfg.max_steps:
                delta = (heldout_logps(model, tokenizer, heldout_rows) - base).mean(0)
                curve.append((step, float(delta[0]), float(delta[1])))

        result = train(cfg, on_step_end=track)
        result.model.eval()
        row = evaluate(result.model, tokenizer, heldout_rows, base)
        row.update(model=name, seed=seed, seconds=round(time.time() - started, 1))
        _write_json(os.path.join(seed_dir, f"{cfg.out_dir.rsplit(os.sep, 1)[-1]}.json"), {"row": row, "curve": curve})
        print(f"[reproduce] seed {seed} {name}: acc {row['greedy_acc']:.1%}, d logp(chosen) "
              f"{row['d_logp_chosen']:+.2f} ({row['seconds']:.0f} s)", flush=True)
        return {"row": row, "curve": curve}
    finally:
        torch.set_num_threads(previous)


def _write_json(path: str, obj) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


def _work(item):
    kind, s, seed, out_dir, name = item
    return run_sft(s, seed, out_dir) if kind == "sft" else run_method(s, seed, out_dir, name)


def run_all(s: ReproduceSettings, out_dir: str) -> Dict[int, dict]:
    """Every work item; SFTs first, a seed's methods once its SFT is done. Returns
    ``{seed: {"rows": {name: row}, "curves": {name: curve}}}``."""
    results = {seed: {"rows": {}, "curves": {}} for seed in s.seeds}

    def collect(seed, name, value):
        if name == "SFT":
            results[seed]["rows"]["SFT"] = value
        else:
            results[seed]["rows"][name] = value["row"]
            results[seed]["curves"][name] = value["curve"]

    names = model_names(s.methods)[1:]
    if s.jobs <= 1:
        for seed in s.seeds:
            collect(seed, "SFT", run_sft(s, seed, out_dir))
            for name in names:
                collect(seed, name, run_method(s, seed, out_dir, name))
        return results

    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    with ProcessPoolExecutor(max_workers=s.jobs, mp_context=mp.get_context("spawn")) as pool:
        pending = {pool.submit(_work, ("sft", s, seed, out_dir, "SFT")): (seed, "SFT") for seed in s.seeds}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                seed, name = pending.pop(fut)
                collect(seed, name, fut.result())
                if name == "SFT":
                    for n in names:
                        pending[pool.submit(_work, ("method", s, seed, out_dir, n))] = (seed, n)
    return results


# ---------------------------------------------------------------------------------------------
# aggregation
# ---------------------------------------------------------------------------------------------

def mean_std(values: Sequence[float]):
    """Mean and sample standard deviation (n - 1 in the denominator; 0 for a single value)."""
    values = [float(v) for v in values]
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def aggregate(results: Dict[int, dict], methods: Sequence[str]) -> List[dict]:
    """One row per model: ``{"model", "n_seeds", "<metric>_mean", "<metric>_std", ...}``."""
    table = []
    for name in model_names(methods):
        rows = [results[seed]["rows"][name] for seed in sorted(results)]
        entry = {"model": name, "n_seeds": len(rows)}
        for key, _, _ in METRICS:
            entry[key + "_mean"], entry[key + "_std"] = mean_std([r[key] for r in rows])
        table.append(entry)
    return table


def claims(results: Dict[int, dict], methods: Sequence[str]) -> Dict[str, dict]:
    """Per method and seed: does "method+SPO >= SFT > method" (greedy accuracy) hold, and does the mean
    held-out chosen log-prob not fall under method+SPO (change >= 0)?"""
    out = {}
    for m in methods:
        order, kept = {}, {}
        for seed in sorted(results):
            rows = results[seed]["rows"]
            sft, base, spo = rows["SFT"]["greedy_acc"], rows[m]["greedy_acc"], rows[m + "+SPO"]["greedy_acc"]
            order[seed] = bool(spo >= sft > base)
            kept[seed] = bool(rows[m + "+SPO"]["d_logp_chosen"] >= 0.0)
        out[m] = {"accuracy_order": order, "accuracy_order_all": all(order.values()),
                  "chosen_not_fallen": kept, "chosen_not_fallen_all": all(kept.values())}
    return out


def _cell(mean: float, std: float, kind: str) -> str:
    if kind == "pct":
        return f"{100 * mean:.1f} ± {100 * std:.1f}"
    return f"{mean:+.2f} ± {std:.2f}"


def format_table(table: List[dict]) -> str:
    header = "| model | " + " | ".join(h for _, h, _ in METRICS) + " |"
    rule = "|---|" + "|".join("---:" for _ in METRICS) + "|"
    lines = [header, rule]
    for row in table:
        cells = [_cell(row[k + "_mean"], row[k + "_std"], kind) for k, _, kind in METRICS]
        lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_per_seed(results: Dict[int, dict], methods: Sequence[str]) -> str:
    seeds = sorted(results)
    lines = ["| model | " + " | ".join(f"seed {k}: acc / d logp(chosen)" for k in seeds) + " |",
             "|---|" + "|".join("---:" for _ in seeds) + "|"]
    for name in model_names(methods):
        cells = [f"{100 * results[k]['rows'][name]['greedy_acc']:.1f}% / "
                 f"{results[k]['rows'][name]['d_logp_chosen']:+.2f}" for k in seeds]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_claims(checked: Dict[str, dict]) -> str:
    lines = []
    for m, c in checked.items():
        order = ", ".join(f"seed {k}: {'yes' if v else 'no'}" for k, v in c["accuracy_order"].items())
        kept = ", ".join(f"seed {k}: {'yes' if v else 'no'}" for k, v in c["chosen_not_fallen"].items())
        lines.append(f"- {m}: '{m}+SPO >= SFT > {m}' (greedy accuracy) holds on every seed: "
                     f"**{'yes' if c['accuracy_order_all'] else 'no'}** ({order}); chosen log-prob does not "
                     f"fall under {m}+SPO on every seed: **{'yes' if c['chosen_not_fallen_all'] else 'no'}** ({kept}).")
    return "\n".join(lines)


def plot_curves(results: Dict[int, dict], methods: Sequence[str], png_path: str) -> None:
    """One panel per base method: held-out chosen (solid) and rejected (dashed) log-prob change from
    SFT over steps, mean over seeds with a +-1 std band; method in red, method+SPO in blue."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 3.8), squeeze=False)
    for ax, m in zip(axes[0], methods):
        for name, color in ((m, "tab:red"), (m + "+SPO", "tab:blue")):
            curves = [results[seed]["curves"][name] for seed in sorted(results)]
            steps = [c[0] for c in curves[0]]
            for col, style, what in ((1, "-", "chosen"), (2, "--", "rejected")):
                stats = [mean_std([c[i][col] for c in curves]) for i in range(len(steps))]
                mu = [a for a, _ in stats]
                sd = [b for _, b in stats]
                ax.plot(steps, mu, color=color, linestyle=style, label=f"{name}: {what}")
                ax.fill_between(steps, [a - b for a, b in zip(mu, sd)], [a + b for a, b in zip(mu, sd)],
                                color=color, alpha=0.15, linewidth=0)
        ax.axhline(0.0, color="gray", linewidth=0.8)
        ax.set_title(m)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("held-out log-prob change from SFT (nats)")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------------

def describe(s: ReproduceSettings) -> str:
    methods = "; ".join(f"{m}: " + ", ".join(f"{k}={v}" for k, v in METHODS[m].items()) for m in s.methods)
    return (f"Seeds {s.seeds}; {s.train_problems} training pairs, {s.heldout_problems} held-out pairs / problems "
            f"per seed. SFT {s.sft_steps} steps (batch {s.sft_batch_size}, lr {s.sft_lr}, cosine); every "
            f"preference run {s.pref_steps} steps from that seed's SFT (batch {s.pref_batch_size}, AdamW lr "
            f"{s.pref_lr}, constant). {methods}. +SPO: spo_lambda={s.spo_lambda}, spo_margin={s.spo_margin}, "
            f"spo_anchor={s.spo_anchor!r}" + (f", spo_alpha={s.spo_alpha}" if s.spo_anchor == "one_step" else "")
            + ", spo_normalize='mean'.")


def run_reproduce(out_dir: str = "runs/reproduce", settings: Optional[ReproduceSettings] = None) -> dict:
    """Run everything and write ``reproduce.md``, ``reproduce.json`` and ``reproduce.png`` under ``out_dir``."""
    s = settings or ReproduceSettings()
    unknown = [m for m in s.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; expected some of {list(METHODS)}")
    started = time.time()
    os.makedirs(out_dir, exist_ok=True)
    results = run_all(s, out_dir)
    table = aggregate(results, s.methods)
    checked = claims(results, s.methods)
    wall = time.time() - started
    report = "\n\n".join([
        describe(s),
        "Mean ± sample standard deviation over seeds. d = held-out change from the SFT model of the summed "
        "completion log-prob (nats); 'chosen fell' = share of held-out pairs whose chosen log-prob went down; "
        "greedy acc = greedy decoding's final answer right; the last three columns sort the greedy answers that "
        "are not right: the rejected answer's final number, another number (well-formed work), or malformed "
        "text.",
        format_table(table),
        "Per seed (greedy accuracy / d logp(chosen)):",
        format_per_seed(results, s.methods),
        format_claims(checked),
        f"Wall time: {wall / 60:.1f} min with {s.jobs} worker process(es), {s.num_threads} torch thread each.",
    ])
    print(report)
    with open(os.path.join(out_dir, "reproduce.md"), "w") as f:
        f.write(report + "\n")
    _write_json(os.path.join(out_dir, "reproduce.json"), {
        "settings": dataclasses.asdict(s), "methods": {m: METHODS[m] for m in s.methods}, "table": table,
        "claims": checked, "wall_s": round(wall, 1),
        "per_seed": {str(k): v for k, v in results.items()},
    })
    plot_curves(results, s.methods, os.path.join(out_dir, "reproduce.png"))
    print(f"[reproduce] wrote {out_dir}/reproduce.md, reproduce.json, reproduce.png ({wall:.0f} s in all)")
    return {"table": table, "claims": checked, "results": results, "wall_s": wall}
