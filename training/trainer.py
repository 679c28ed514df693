"""The training loop: :func:`train` (the loop itself is ``_train``, read top to bottom).

Per optimizer step (objective "preference"), on each of the run's processes:
    the step's pairs (a pure function of (seed, step)) -> this rank's slice -> ``grad_accum`` micro-batches
    micro-batch [2P, T] padded, or [1, N] packed with cu_seqlens
    (+ reference log-probs [2P]: cached, or a frozen model's forward)
    (+ SPO one-step anchor [P] when spo_anchor="one_step")
    -> PolicyWithLoss (backbone + fused_linear_preference_loss inside the forward that DDP/FSDP2 wrap)
    -> loss / grad_accum -> backward; then clip, AdamW step, LR schedule.
Objective "sft" uses the chosen rows only and the token-mean NLL of the whole step's chosen tokens.

The data order is a pure function of (seed, step), whatever the world size; a checkpoint holds the
model, optimizer, scheduler, RNG states and the step, so ``resume=True`` continues bit-for-bit where a
run stopped (on the same world size). Rank 0 alone writes metrics, plots and the final model.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

import numpy as np
import torch

from spo_kernels.integrations.anchor import one_step_anchor

from . import distributed
from .checkpoint import (CHECKPOINT_DIR, FINAL_DIR, METRICS_FILE, keep_metrics_up_to, load_checkpoint,
                         prepare_run_folder, read_metrics, save_checkpoint)
from .config import TrainConfig
from .data import (PackedPreferenceBatch, TokenizedPair, collate_packed, collate_pairs, completion_targets,
                   load_preference_jsonl, tokenize_pair)
from .modeling import (BuiltinModelSize, PolicyWithLoss, SequenceLogps, build_builtin_model,
                       lm_head, load_model, sequence_logprobs)
from .tokenizer import CharTokenizer, load_tokenizer

PLOT_FILE = "logps.png"
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "bf16-autocast": torch.float32}


@dataclass
class TrainResult:
    """What a run leaves behind: the trained model (under FSDP2, this rank's sharded module), the last
    completed step, and why it stopped."""

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
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        # Under torchrun the processes of one machine share its cores.
        num_threads = max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.set_num_threads(num_threads)
    return previous


def load_starting_model(cfg: TrainConfig, attn_implementation: Optional[str] = None):
    """The model training starts from, and its tokenizer: a local checkpoint, or the built-in model.
    ``attn_implementation`` None keeps the model's own (the built-in model's is "eager")."""
    if cfg.model is None:
        tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else CharTokenizer()
        size = BuiltinModelSize(hidden_size=cfg.builtin_hidden_size, num_layers=cfg.builtin_layers,
                                num_heads=cfg.builtin_heads, intermediate_size=2 * cfg.builtin_hidden_size)
        model = build_builtin_model(tokenizer, size, seed=cfg.seed, attn_implementation=attn_implementation or "eager")
    else:
        tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
        model = load_model(cfg.model, attn_implementation=attn_implementation)
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


def make_batch(pairs: List[TokenizedPair], indices: List[int], tokenizer, packed: bool = False):
    """The padded :class:`PreferenceBatch` (or, ``packed``, the :class:`PackedPreferenceBatch`) of the pairs
    at ``indices``, chosen sequences first."""
    chosen = [pairs[i] for i in indices]
    if packed:
        return collate_packed(chosen, indices)
    return collate_pairs(chosen, indices, tokenizer.pad_token_id)


def batch_inputs(batch, device: torch.device) -> dict:
    """The keyword inputs of :class:`PolicyWithLoss` / :class:`SequenceLogps` for a batch, on ``device``."""
    if isinstance(batch, PackedPreferenceBatch):
        return dict(input_ids=batch.input_ids.to(device), position_ids=batch.position_ids.to(device),
                    labels=batch.labels.to(device), cu_seqlens=batch.cu_seqlens.to(device))
    return dict(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                labels=batch.labels.to(device))


def rank_micro_batches(indices: List[int], runtime: distributed.Runtime, grad_accum: int) -> List[List[int]]:
    """This rank's micro-batches of a step's pairs: rank r takes the r-th of ``world_size`` equal slices,
    cut into ``grad_accum`` equal micro-batches (so every pair of the step is used exactly once)."""
    per_rank = len(indices) // runtime.world_size
    mine = indices[runtime.rank * per_rank:(runtime.rank + 1) * per_rank]
    size = per_rank // grad_accum
    return [mine[k * size:(k + 1) * size] for k in range(grad_accum)]


# ---------------------------------------------------------------------------------------------
# reference log-probs
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def sequence_logps_of_pairs(model, pairs: List[TokenizedPair], tokenizer, batch_size: int,
                            backend: Optional[str] = None) -> torch.Tensor:
    """``[N, 2]`` fp32 (on the CPU) summed completion log-probs (chosen, rejected) of every pair, forward only."""
    device = lm_head(model).weight.device
    out = torch.empty(len(pairs), 2, dtype=torch.float32)
    for start in range(0, len(pairs), batch_size):
        idx = list(range(start, min(start + batch_size, len(pairs))))
        batch = make_batch(pairs, idx, tokenizer)
        seq = sequence_logprobs(model, batch.input_ids.to(device), batch.attention_mask.to(device),
                                batch.labels.to(device), backend=backend)
        P = len(idx)
        out[start:start + P, 0] = seq.logps[:P].float().cpu()
        out[start:start + P, 1] = seq.logps[P:].float().cpu()
    return out


def cached_reference_logps(cfg: TrainConfig, model, pairs, tokenizer, write: bool = True,
                           batch_size: Optional[int] = None) -> torch.Tensor:
    """The starting model's ``[N, 2]`` log-probs of the data, from the cache file when it matches
    (same data file, tokenization and starting weights), else computed now (``batch_size`` pairs at a time,
    default ``cfg.batch_size``) and saved there when ``write``. A cache that cannot be read (a run killed
    while writing it, a damaged file) is recomputed, with a message."""
    path = cfg.ref_cache or os.path.join(cfg.out_dir, "ref_logps.pt")
    with open(cfg.data, "rb") as f:
        data_hash = hashlib.sha256(f.read()).hexdigest()
    key = {"data": data_hash, "model": model_fingerprint(model),
           "max_prompt_length": cfg.max_prompt_length, "max_completion_length": cfg.max_completion_length}
    if os.path.exists(path):
        try:
            cached = torch.load(path, weights_only=True)
            usable = (isinstance(cached, dict) and cached.get("key") == key
                      and isinstance(cached.get("logps"), torch.Tensor) and cached["logps"].shape == (len(pairs), 2))
        except Exception as err:  # noqa: BLE001 - any unreadable file is recomputed, never trusted
            print(f"[train] reference cache {path} is unreadable ({type(err).__name__}: {str(err)[:120]}); "
                  f"recomputing it", file=sys.stderr)
            usable = False
        if usable:
            return cached["logps"]
    logps = sequence_logps_of_pairs(model, pairs, tokenizer, batch_size or cfg.batch_size, cfg.backend)
    if write:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"  # a name of its own: another process may be writing the same cache
        torch.save({"key": key, "logps": logps}, tmp)
        os.replace(tmp, path)
    return logps


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

    Under ``torchrun`` every process calls this; they form the process group (DDP or FSDP2, ``cfg.dist``).
    ``on_step_end(step, metrics, model)`` is called on every rank after every completed step (step counts
    from 1; the metrics are the ranks' mean), e.g. for a held-out evaluation; it must not change the model.
    """
    if not cfg.data:
        raise ValueError("TrainConfig.data: give a JSONL file of prompt/chosen/rejected rows")
    runtime = distributed.start(cfg)
    previous_threads = set_threads(cfg.num_threads)
    failed = True
    try:
        result = _train(cfg, resume, on_step_end, runtime)
        failed = False
        return result
    finally:
        torch.set_num_threads(previous_threads)
        distributed.stop(runtime, failed)


def _train(cfg: TrainConfig, resume: bool, on_step_end, runtime: distributed.Runtime) -> TrainResult:
    from tqdm.auto import tqdm
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one progress bar (ours); no per-shard save/load bars
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    prepare_run_folder(cfg, resume, runtime)
    if runtime.is_main:
        os.makedirs(cfg.out_dir, exist_ok=True)
    started = time.time()

    # Model, tokenizer, data.
    model, tokenizer = load_starting_model(cfg, distributed.attention_implementation(cfg.packed, runtime.device,
                                                                                      cfg.dtype))
    model.to(device=runtime.device, dtype=TORCH_DTYPES[cfg.dtype])
    rows = load_preference_jsonl(cfg.data)
    pairs = [tokenize_pair(tokenizer, row, cfg.max_prompt_length, cfg.max_completion_length) for row in rows]
    order = BatchOrder(len(pairs), cfg.batch_size, cfg.seed)
    if order.batch_size % (runtime.world_size * cfg.grad_accum):
        raise ValueError(f"the batch of {order.batch_size} pairs (batch_size, at most the data's {len(pairs)} pairs) "
                         f"does not split into {runtime.world_size} rank(s) x {cfg.grad_accum} micro-batches")
    if cfg.uses_one_step_anchor and cfg.grad_accum > 1:
        raise ValueError("spo_anchor='one_step' takes its SFT step on the whole batch: use grad_accum=1")

    # Reference: computed from the starting weights, before any checkpoint is loaded into the policy.
    ref_table, ref_module = None, None
    if cfg.needs_reference:
        if cfg.reference == "precompute":
            # Rank 0 computes (or finds) the cache, a micro-batch at a time; the others then read the file.
            micro = max(1, cfg.batch_size // (runtime.world_size * cfg.grad_accum))
            if runtime.is_main:
                ref_table = cached_reference_logps(cfg, model, pairs, tokenizer, batch_size=micro)
            runtime.barrier()
            if not runtime.is_main:  # rank 0's file (recomputed here when this machine cannot see it)
                ref_table = cached_reference_logps(cfg, model, pairs, tokenizer, write=False, batch_size=micro)
        else:
            ref_model = copy.deepcopy(model).requires_grad_(False)
            ref_module = distributed.wrap(runtime, SequenceLogps(ref_model, cfg.backend), ref_model, trainable=False)

    head = lm_head(model)
    loss_config = cfg.loss_config(softcap=head.softcap) if cfg.objective == "preference" else None
    policy = distributed.wrap(runtime, PolicyWithLoss(model, loss_config, cfg.backend, cfg.objective), model)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, make_lr_lambda(cfg))

    metrics_path = os.path.join(cfg.out_dir, METRICS_FILE)
    step = 0
    if resume:
        step = load_checkpoint(cfg, runtime, policy, model, optimizer, scheduler)
        if runtime.is_main:
            keep_metrics_up_to(metrics_path, step)
    elif runtime.is_main:
        open(metrics_path, "w").close()
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=2)
    runtime.barrier()

    def data_position(at_step):
        epoch, batch_in_epoch = order.position(at_step)
        return {"epoch": epoch, "batch_in_epoch": batch_in_epoch, "examples_seen": at_step * order.batch_size}

    status, bar = "finished", None
    metrics_file = open(metrics_path, "a") if runtime.is_main else contextlib.nullcontext()
    with StopOnSignal() as stop, metrics_file:
        bar = tqdm(total=cfg.max_steps, initial=step, disable=not (cfg.progress and runtime.is_main),
                   dynamic_ncols=True, mininterval=0.5, desc=f"{cfg.objective}:{cfg.loss_name}")
        start_time = time.time()
        while step < cfg.max_steps:
            step_indices = order.indices(step)
            micro_batches = rank_micro_batches(step_indices, runtime, cfg.grad_accum)
            micro_step = MicroStep(cfg, runtime, policy, model, pairs, tokenizer, ref_table, ref_module,
                                   chosen_tokens=max(1, sum(completion_targets(pairs[i]) for i in step_indices)),
                                   micro_batches=len(micro_batches))
            step_loss, logged_sum = 0.0, {}
            for k, micro in enumerate(micro_batches):
                with _gradient_sync(policy, runtime, last_micro_batch=k == len(micro_batches) - 1):
                    contribution, logged = micro_step(micro)
                    contribution.backward()
                step_loss += float(contribution.detach())
                for key, value in logged.items():
                    logged_sum[key] = logged_sum.get(key, 0.0) + value
            logged = {k: v / len(micro_batches) for k, v in logged_sum.items()}
            if cfg.objective == "sft":
                logged = {"nll": step_loss, **logged}

            grad_norm = distributed.total_grad_norm(params, cfg.max_grad_norm, runtime)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            averaged = runtime.mean_over_ranks({"loss": step_loss, **logged})
            record = {"step": step, "epoch": order.position(step - 1)[0], "lr": lr, "grad_norm": grad_norm,
                      "loss": averaged.pop("loss"), **{k: averaged[k] for k in logged},
                      "time_s": round(time.time() - start_time, 3)}
            if runtime.is_main:
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
            bar.update(1)
            bar.set_postfix(_postfix(record), refresh=False)
            if on_step_end is not None:
                on_step_end(step, record, model)

            if runtime.broadcast_flag(stop.signum is not None):
                save_checkpoint(cfg, runtime, step, data_position(step), policy, model, optimizer, scheduler)
                if runtime.is_main:
                    bar.write(f"stopped by a signal ({stop.signum or 'on another rank'}) after step {step}; checkpoint in "
                              f"{os.path.join(cfg.out_dir, CHECKPOINT_DIR)} (continue with --resume)")
                status = "interrupted"
                break
            if step % cfg.save_every == 0 or step == cfg.max_steps:
                save_checkpoint(cfg, runtime, step, data_position(step), policy, model, optimizer, scheduler)
        bar.close()

    written = [f"{METRICS_FILE} ({step} steps)", f"{CHECKPOINT_DIR}/"]
    if status == "finished":
        final_dir = os.path.join(cfg.out_dir, FINAL_DIR)
        state = distributed.full_model_state(runtime, policy, model)
        if runtime.is_main:
            if runtime.mode == "fsdp2":
                _save_gathered(cfg, model, state, final_dir)
            else:
                model.save_pretrained(final_dir)
            tokenizer.save_pretrained(final_dir)
            written.append(f"{FINAL_DIR}/")
            if cfg.plot:
                plot_metrics(metrics_path, os.path.join(cfg.out_dir, PLOT_FILE))
                written.append(PLOT_FILE)
        runtime.barrier()
    if runtime.is_main:
        # One line whatever the progress setting: where the run's files are.
        print(f"[train] {status} at step {step}/{cfg.max_steps}; wrote {cfg.out_dir}/: {', '.join(written)} "
              f"({time.time() - started:.1f} s, {runtime.world_size} process(es), {runtime.device.type}, {cfg.dtype})",
              flush=True)
    return TrainResult(model=model, tokenizer=tokenizer, step=step, status=status, out_dir=cfg.out_dir,
                       stop_signal=stop.signum)


class MicroStep:
    """The forward of one micro-batch of a step: ``micro_step(indices) -> (contribution, logged)``, where
    ``contribution`` is what this rank backpropagates (the micro-batch's share of the step's loss) and
    ``logged`` its metrics (floats; the loop averages them over micro-batches and ranks).

    Shares: a preference loss is a mean over pairs, so each of the ``micro_batches`` equal micro-batches
    contributes its loss / micro_batches (DDP/FSDP2 average over ranks). The SFT loss is a token mean: each
    micro-batch's summed NLL is divided by the whole step's ``chosen_tokens`` (over the world size, which
    the ranks' gradient average multiplies back), so the contributions add up to the step's token mean.
    """

    def __init__(self, cfg: TrainConfig, runtime: distributed.Runtime, policy, model, pairs, tokenizer, ref_table,
                 ref_module, chosen_tokens: int, micro_batches: int):
        self.cfg, self.runtime, self.policy, self.model = cfg, runtime, policy, model
        self.pairs, self.tokenizer, self.ref_table, self.ref_module = pairs, tokenizer, ref_table, ref_module
        self.chosen_tokens, self.micro_batches = chosen_tokens, micro_batches

    def autocast(self):
        if self.cfg.dtype == "bf16-autocast":
            return torch.autocast(device_type=self.runtime.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def __call__(self, micro: List[int]):
        cfg, device = self.cfg, self.runtime.device
        batch = make_batch(self.pairs, micro, self.tokenizer, cfg.packed)
        if cfg.objective == "sft":
            world = self.runtime.world_size
            token_count = self.chosen_tokens if world == 1 else self.chosen_tokens / world
            with self.autocast():
                loss, seq = self.policy(**batch_inputs(batch.chosen(), device), token_count=token_count)
            return loss, {"logps/chosen": float(seq.logps.detach().mean())}
        inputs = batch_inputs(batch, device)
        extra = {}
        if cfg.uses_one_step_anchor:
            # Before the main forward, so only one autograd graph is alive at a time.
            padded = make_batch(self.pairs, micro, self.tokenizer) if cfg.packed else batch
            with self.autocast():
                extra["spo_anchor"] = one_step_anchor(self.model, batch_inputs(padded, device), cfg.spo_alpha,
                                                      cfg.spo_normalize, cfg.backend)
        if self.ref_table is not None:
            idx = batch.indices
            extra["ref_logps"] = torch.cat([self.ref_table[idx, 0], self.ref_table[idx, 1]]).to(device)
        elif self.ref_module is not None:
            with self.autocast():
                extra["ref_logps"] = self.ref_module(**inputs)
        with self.autocast():
            out = self.policy(**inputs, **extra)
        logged = out.log_dict()
        del logged["loss"]
        shares = self.micro_batches * self.runtime.world_size
        if "nll" in logged and shares > 1:
            # A token mean over the step's chosen tokens, not a mean over micro-batches: weigh this
            # micro-batch's by its share of them (the loop's averages undo the factor `shares`).
            logged["nll"] *= float(out.counts[:len(micro)].sum()) / self.chosen_tokens * shares
        return (out.loss if self.micro_batches == 1 else out.loss / self.micro_batches), logged


def _gradient_sync(policy, runtime: distributed.Runtime, last_micro_batch: bool):
    """Gradients are reduced across ranks once per step, after the last micro-batch (DDP's ``no_sync``,
    FSDP2's ``set_requires_gradient_sync``); the result is the same either way, the traffic is not."""
    if runtime.mode == "ddp" and not last_micro_batch:
        return policy.no_sync()
    if runtime.mode == "fsdp2":
        policy.set_requires_gradient_sync(last_micro_batch)
    return contextlib.nullcontext()


def _save_gathered(cfg: TrainConfig, model, state: dict, final_dir: str) -> None:
    """Rank 0 under FSDP2: a plain (unsharded) copy of the model with the gathered weights, saved as
    Hugging Face saves any model."""
    fresh, _ = load_starting_model(cfg)
    fresh.to(dtype=TORCH_DTYPES[cfg.dtype])
    fresh.load_state_dict(state)
    fresh.save_pretrained(final_dir)


def _postfix(record: dict) -> dict:
    keys = [("loss", "loss"), ("rewards/margins", "margin"), ("rewards/accuracies", "acc"),
            ("logps/chosen", "logp_w"), ("logps/rejected", "logp_l"), ("spo/active_fraction", "spo_on")]
    return {short: f"{record[k]:.3g}" for k, short in keys if k in record and math.isfinite(record[k])}


# ---------------------------------------------------------------------------------------------
# plot
# ---------------------------------------------------------------------------------------------

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
