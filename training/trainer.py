"""The training loop: :func:`train` (the loop itself is ``_train``, read top to bottom).

Per step (objective "preference"):
    batch [2P, T] -> backbone -> hidden [2P, T, H]
    (+ reference log-probs [2P]: cached, or a frozen model's hidden states)
    (+ SPO one-step anchor [P] when spo_anchor="one_step")
    -> fused_linear_preference_loss(hidden, lm_head.weight, labels, ...) -> loss -> AdamW step
Objective "sft" uses the chosen rows only and the token-mean NLL from fused_linear_sequence_logprobs.

The data order is a pure function of (seed, step), and a checkpoint holds the model, optimizer,
scheduler, RNG states and the step, so ``resume=True`` continues bit-for-bit where a run stopped.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import random
import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

import numpy as np
import torch

from spo_kernels import fused_linear_preference_loss, fused_linear_sequence_logprobs
from spo_kernels.integrations.anchor import one_step_anchor

from .config import RESUME_FREE_FIELDS, TrainConfig
from .data import PreferenceBatch, TokenizedPair, collate_pairs, load_preference_jsonl, tokenize_pair
from .modeling import BuiltinModelSize, build_builtin_model, final_hidden, lm_head, load_model
from .tokenizer import CharTokenizer, load_tokenizer

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "state.pt"
METRICS_FILE = "metrics.jsonl"
FINAL_DIR = "final"
PLOT_FILE = "logps.png"


@dataclass
class TrainResult:
    """What a run leaves behind: the trained model, the last completed step, and why it stopped."""

    model: torch.nn.Module
    tokenizer: object
    step: int
    status: str  # "finished" | "interrupted"
    out_dir: str
    stop_signal: Optional[int] = None


# ---------------------------------------------------------------------------------------------
# setup helpers
# ---------------------------------------------------------------------------------------------

def set_threads(num_threads: int) -> int:
    """Set torch's intra-op threads; 0 = one per core this process may run on (torch's own default can
    count the host's cores in a container). Returns the previous setting, to restore it."""
    previous = torch.get_num_threads()
    if num_threads <= 0:
        num_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(num_threads)
    return previous


def load_starting_model(cfg: TrainConfig):
    """The model training starts from, and its tokenizer: a local checkpoint, or the built-in model."""
    if cfg.model is None:
        tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else CharTokenizer()
        size = BuiltinModelSize(hidden_size=cfg.builtin_hidden_size, num_layers=cfg.builtin_layers,
                                num_heads=cfg.builtin_heads, intermediate_size=2 * cfg.builtin_hidden_size)
        model = build_builtin_model(tokenizer, size, seed=cfg.seed)
    else:
        tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
        model = load_model(cfg.model)
    disable_dropout(model)
    model.train()
    return model, tokenizer


def disable_dropout(model: torch.nn.Module) -> None:
    """Preference training compares log-probs of the same text under policy, reference and anchor; random
    dropout masks would make those differ for no reason (TRL disables dropout by default too)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def model_fingerprint(model: torch.nn.Module) -> str:
    """A cheap content hash of the parameters (per-tensor sums), to tell whether a reference cache
    was computed from this very starting model."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            x = p.detach().double()
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}:{float(x.sum()):.12e}:{float(x.abs().sum()):.12e}".encode())
    return h.hexdigest()


def make_lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    def lr_factor(step: int) -> float:
        if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        if cfg.lr_schedule == "linear":
            return max(0.0, 1.0 - progress)
        if cfg.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0
    return lr_factor


class BatchOrder:
    """Batch k of the run is a pure function of (seed, k): a fresh seeded permutation per epoch, no
    state to carry between steps except the step number itself."""

    def __init__(self, num_examples: int, batch_size: int, seed: int):
        self.num_examples = num_examples
        self.batch_size = min(batch_size, num_examples)
        self.steps_per_epoch = num_examples // self.batch_size
        self.seed = seed
        self._epoch, self._order = -1, None

    def position(self, step: int):
        """``(epoch, batch index within the epoch)`` of global step ``step``."""
        return divmod(step, self.steps_per_epoch)

    def indices(self, step: int) -> List[int]:
        epoch, k = self.position(step)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.num_examples, generator=gen).tolist()
        return self._order[k * self.batch_size:(k + 1) * self.batch_size]


def make_batch(pairs: List[TokenizedPair], indices: List[int], tokenizer) -> PreferenceBatch:
    return collate_pairs([pairs[i] for i in indices], indices, tokenizer.pad_token_id)


# ---------------------------------------------------------------------------------------------
# reference log-probs
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def sequence_logps_of_pairs(model, pairs: List[TokenizedPair], tokenizer, batch_size: int,
                            backend: Optional[str] = None) -> torch.Tensor:
    """``[N, 2]`` fp32 summed completion log-probs (chosen, rejected) of every pair, forward only."""
    head = lm_head(model)
    out = torch.empty(len(pairs), 2, dtype=torch.float32)
    for start in range(0, len(pairs), batch_size):
        idx = list(range(start, min(start + batch_size, len(pairs))))
        batch = make_batch(pairs, idx, tokenizer)
        hidden = final_hidden(model, batch.input_ids, batch.attention_mask)
        seq = fused_linear_sequence_logprobs(hidden, head.weight, batch.labels, head.bias,
                                             softcap=head.softcap, backend=backend)
        P = len(idx)
        out[start:start + P, 0] = seq.logps[:P].float()
        out[start:start + P, 1] = seq.logps[P:].float()
    return out


def cached_reference_logps(cfg: TrainConfig, model, pairs, tokenizer) -> torch.Tensor:
    """The starting model's ``[N, 2]`` log-probs of the data, from the cache file when it matches
    (same data file, tokenization and starting weights), else computed now and saved there."""
    path = cfg.ref_cache or os.path.join(cfg.out_dir, "ref_logps.pt")
    with open(cfg.data, "rb") as f:
        data_hash = hashlib.sha256(f.read()).hexdigest()
    key = {"data": data_hash, "model": model_fingerprint(model),
           "max_prompt_length": cfg.max_prompt_length, "max_completion_length": cfg.max_completion_length}
    if os.path.exists(path):
        cached = torch.load(path, weights_only=True)
        if cached.get("key") == key:
            return cached["logps"]
    logps = sequence_logps_of_pairs(model, pairs, tokenizer, cfg.batch_size, cfg.backend)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save({"key": key, "logps": logps}, path + ".tmp")
    os.replace(path + ".tmp", path)
    return logps


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------

def save_checkpoint(cfg: TrainConfig, step: int, order: BatchOrder, model, optimizer, scheduler) -> str:
    epoch, batch_in_epoch = order.position(step)
    state = {
        "step": step,
        "data_position": {"epoch": epoch, "batch_in_epoch": batch_in_epoch,
                          "examples_seen": step * order.batch_size},
        "config": cfg.to_dict(),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
    }
    directory = os.path.join(cfg.out_dir, CHECKPOINT_DIR)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, CHECKPOINT_FILE)
    # Write then rename: a kill during the write leaves the previous checkpoint intact.
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)
    return path


def load_checkpoint(cfg: TrainConfig, model, optimizer, scheduler) -> int:
    path = os.path.join(cfg.out_dir, CHECKPOINT_DIR, CHECKPOINT_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    # The trainer's own file; it holds RNG states (tuples, numpy arrays), hence weights_only=False.
    state = torch.load(path, weights_only=False)
    saved, now = state["config"], cfg.to_dict()
    # A field the checkpoint predates counts as its default (checkpoints of older versions resume).
    defaults = TrainConfig().to_dict()
    changed = sorted(k for k in now if k not in RESUME_FREE_FIELDS and saved.get(k, defaults[k]) != now[k])
    if changed:
        diff = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in changed)
        raise ValueError(f"--resume with a different configuration than the checkpoint's ({diff})")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return int(state["step"])


def _keep_metrics_up_to(path: str, step: int) -> None:
    """After a resume, drop logged steps past the checkpoint (they will be logged again)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(kept)


class StopOnSignal:
    """SIGINT/SIGTERM ask the loop to stop after the current step (and checkpoint); handlers are
    restored on exit. Signals can only be caught in the main thread; elsewhere this does nothing."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous = {}

    def _handle(self, signum, frame):
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------

def train(cfg: TrainConfig, resume: bool = False,
          on_step_end: Optional[Callable[[int, dict, torch.nn.Module], None]] = None) -> TrainResult:
    """Run (or, with ``resume=True``, continue) one training run described by ``cfg``.

    ``on_step_end(step, metrics, model)`` is called after every completed step (step counts from 1),
    e.g. for a held-out evaluation; it must not change the model.
    """
    if not cfg.data:
        raise ValueError("TrainConfig.data: give a JSONL file of prompt/chosen/rejected rows")
    previous_threads = set_threads(cfg.num_threads)
    try:
        return _train(cfg, resume, on_step_end)
    finally:
        torch.set_num_threads(previous_threads)


def _train(cfg: TrainConfig, resume: bool, on_step_end) -> TrainResult:
    from tqdm.auto import tqdm
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one progress bar (ours); no per-shard save/load bars
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    os.makedirs(cfg.out_dir, exist_ok=True)

    # Model, tokenizer, data.
    model, tokenizer = load_starting_model(cfg)
    rows = load_preference_jsonl(cfg.data)
    pairs = [tokenize_pair(tokenizer, row, cfg.max_prompt_length, cfg.max_completion_length) for row in rows]
    order = BatchOrder(len(pairs), cfg.batch_size, cfg.seed)

    # Reference: computed from the starting weights, before any checkpoint is loaded into the policy.
    ref_table, ref_model = None, None
    if cfg.needs_reference:
        if cfg.reference == "precompute":
            ref_table = cached_reference_logps(cfg, model, pairs, tokenizer)
        else:
            ref_model = copy.deepcopy(model).requires_grad_(False)

    head = lm_head(model)
    loss_config = cfg.loss_config(softcap=head.softcap) if cfg.objective == "preference" else None
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, make_lr_lambda(cfg))

    metrics_path = os.path.join(cfg.out_dir, METRICS_FILE)
    step = 0
    if resume:
        step = load_checkpoint(cfg, model, optimizer, scheduler)
        _keep_metrics_up_to(metrics_path, step)
    else:
        open(metrics_path, "w").close()
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=2)

    status, bar = "finished", None
    with StopOnSignal() as stop, open(metrics_path, "a") as metrics_file:
        bar = tqdm(total=cfg.max_steps, initial=step, disable=not cfg.progress, dynamic_ncols=True, mininterval=0.5,
                   desc=f"{cfg.objective}:{cfg.loss_type if cfg.objective == 'preference' else 'nll'}"
                        f"{'+spo' if cfg.objective == 'preference' and cfg.spo_lambda > 0 else ''}")
        start_time = time.time()
        while step < cfg.max_steps:
            batch = make_batch(pairs, order.indices(step), tokenizer)

            if cfg.objective == "sft":
                chosen = batch.chosen()
                hidden = final_hidden(model, chosen.input_ids, chosen.attention_mask)
                seq = fused_linear_sequence_logprobs(hidden, head.weight, chosen.labels, head.bias,
                                                     softcap=head.softcap, backend=cfg.backend)
                loss = -seq.logps.sum() / seq.counts.sum().clamp(min=1)
                logged = {"nll": float(loss.detach()), "logps/chosen": float(seq.logps.detach().mean())}
            else:
                anchor = None
                if cfg.uses_one_step_anchor:
                    # Before the main forward, so only one autograd graph is alive at a time.
                    anchor = one_step_anchor(model, batch, cfg.spo_alpha, cfg.spo_normalize, cfg.backend)
                ref_kwargs = {}
                if ref_table is not None:
                    ref_kwargs["ref_logps"] = torch.cat([ref_table[batch.indices, 0], ref_table[batch.indices, 1]])
                elif ref_model is not None:
                    with torch.no_grad():
                        ref_head = lm_head(ref_model)
                        ref_kwargs = dict(ref_hidden=final_hidden(ref_model, batch.input_ids, batch.attention_mask),
                                          ref_weight=ref_head.weight, ref_bias=ref_head.bias)
                hidden = final_hidden(model, batch.input_ids, batch.attention_mask)
                out = fused_linear_preference_loss(hidden, head.weight, batch.labels, head.bias, config=loss_config,
                                                   spo_anchor=anchor, backend=cfg.backend, **ref_kwargs)
                loss = out.loss
                logged = out.log_dict()

            loss.backward()
            grad_norm = (torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm > 0
                         else torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params if p.grad is not None)))
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            record = {"step": step, "epoch": order.position(step - 1)[0], "lr": lr,
                      "grad_norm": float(grad_norm), "loss": float(loss.detach()), **logged,
                      "time_s": round(time.time() - start_time, 3)}
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            bar.update(1)
            bar.set_postfix(_postfix(record), refresh=False)
            if on_step_end is not None:
                on_step_end(step, record, model)

            if stop.signum is not None:
                save_checkpoint(cfg, step, order, model, optimizer, scheduler)
                bar.write(f"stopped by signal {stop.signum} after step {step}; checkpoint in "
                          f"{os.path.join(cfg.out_dir, CHECKPOINT_DIR)} (continue with --resume)")
                status = "interrupted"
                break
            if step % cfg.save_every == 0 or step == cfg.max_steps:
                save_checkpoint(cfg, step, order, model, optimizer, scheduler)
        bar.close()

    if status == "finished":
        final_dir = os.path.join(cfg.out_dir, FINAL_DIR)
        model.save_pretrained(final_dir)
        tokenizer.save_pretrained(final_dir)
        if cfg.plot:
            plot_metrics(metrics_path, os.path.join(cfg.out_dir, PLOT_FILE))
    return TrainResult(model=model, tokenizer=tokenizer, step=step, status=status, out_dir=cfg.out_dir,
                       stop_signal=stop.signum)


def _postfix(record: dict) -> dict:
    keys = [("loss", "loss"), ("rewards/margins", "margin"), ("rewards/accuracies", "acc"),
            ("logps/chosen", "logp_w"), ("logps/rejected", "logp_l"), ("spo/active_fraction", "spo_on")]
    return {short: f"{record[k]:.3g}" for k, short in keys if k in record and math.isfinite(record[k])}


# ---------------------------------------------------------------------------------------------
# plot
# ---------------------------------------------------------------------------------------------

def read_metrics(path: str) -> List[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_metrics(metrics_path: str, png_path: str) -> None:
    """Chosen/rejected log-probs (top) and reward margins (bottom) over steps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    if not records:
        return
    steps = [r["step"] for r in records]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for key, label in (("logps/chosen", "chosen"), ("logps/rejected", "rejected")):
        if key in records[0]:
            top.plot(steps, [r[key] for r in records], label=label)
    top.set_ylabel("summed log-prob (batch mean)")
    top.legend()
    if "rewards/margins" in records[0]:
        bottom.plot(steps, [r["rewards/margins"] for r in records], color="tab:green")
        bottom.set_ylabel("reward margin")
    else:
        bottom.plot(steps, [r["loss"] for r in records], color="tab:red")
        bottom.set_ylabel("loss")
    bottom.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
