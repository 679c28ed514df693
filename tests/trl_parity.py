"""Shared by the TRL integration tests and benchmarks/results/trl-trainer-parity.md: a tiny random Llama, a
word-level tokenizer built in memory and a small preference dataset (nothing downloaded), and a runner
that trains TRL's DPOTrainer and SPOTrainer side by side and returns the per-step logs."""

from __future__ import annotations

import copy
import math
import random

import torch

VOCAB = 61


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def dataset(n_pairs=8, seed=0):
    from datasets import Dataset

    rng = random.Random(seed)
    words = lambda k: " ".join(f"w{rng.randrange(VOCAB - 3)}" for _ in range(k))  # noqa: E731
    rows = [{"prompt": words(rng.randint(2, 5)), "chosen": " " + words(rng.randint(1, 6)),
             "rejected": " " + words(rng.randint(1, 6))} for _ in range(n_pairs)]
    return Dataset.from_list(rows)


def model(kind="llama", seed=0, **overrides):
    """A tiny random-initialized causal LM in train mode without dropout (hidden 32, 2 layers)."""
    from transformers import (AutoModelForCausalLM, CohereConfig, Gemma2Config, GPT2Config, GraniteConfig,
                              LlamaConfig)

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    cfg = {"llama": lambda: LlamaConfig(**common),
           "gemma2": lambda: Gemma2Config(**common, head_dim=8, final_logit_softcapping=3.0),
           "cohere": lambda: CohereConfig(**common, logit_scale=4.0),
           "granite": lambda: GraniteConfig(**common, logits_scaling=0.25),
           "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0, eos_token_id=1,
                                      bos_token_id=1)}[kind]()
    for k, v in overrides.items():
        setattr(cfg, k, v)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        m = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    return m


def train_args(cls, out_dir, **kw):
    base = dict(output_dir=str(out_dir), per_device_train_batch_size=2, per_device_eval_batch_size=2, max_steps=3,
                logging_steps=1, learning_rate=1.0, optim="sgd", lr_scheduler_type="constant", report_to="none", save_strategy="no", use_cpu=True,
                gradient_checkpointing=False, seed=0, bf16=False, fp16=False, dataloader_num_workers=0,
                disable_tqdm=True, max_length=64)
    base.update(kw)
    return cls(**base)


def run(trainer_cls, config_cls, out_dir, kind="llama", peft_config=None, eval_=False, ref_model=True, **cfg):
    """Train a fresh tiny model; returns (per-step logs, trainer)."""
    m = model(kind)
    args = train_args(config_cls, out_dir, **cfg)
    kwargs = dict(model=m, args=args, train_dataset=dataset(), processing_class=tokenizer())
    if ref_model and peft_config is None and not cfg.get("precompute_ref_log_probs"):
        kwargs["ref_model"] = copy.deepcopy(m)
    if peft_config is not None:
        kwargs["peft_config"] = peft_config
    if eval_:
        kwargs["eval_dataset"] = dataset(4, seed=1)
    trainer = trainer_cls(**kwargs)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return logs, trainer


def relative_errors(logs_a, logs_b, beta=0.1):
    """Per key, the max over steps of ``|a - b| / max(|a|, |b|, floor)``. The floor is 0 except for
    differences of large sums: ``rewards/*`` are ``beta (L - R)`` of ~20-nat summed log-probs, so their
    floor is ``beta * max(|logps/chosen|, |logps/rejected|)`` (the fp32 rounding of TRL's sums), and
    ``logits/*`` are means of O(1) logits that cancel to ~1e-2, floor 1.0."""
    assert len(logs_a) == len(logs_b) > 0
    errs = {}
    for a, b in zip(logs_a, logs_b):
        logps_scale = beta * max(abs(float(a.get("logps/chosen", 0.0))), abs(float(a.get("logps/rejected", 0.0))))
        for k in a:
            if k in ("epoch", "step", "learning_rate"):
                continue
            assert k in b, f"metric {k!r} is missing"
            x, y = float(a[k]), float(b[k])
            assert math.isfinite(x) and math.isfinite(y), (k, x, y)
            floor = logps_scale if k in ("rewards/chosen", "rewards/rejected", "rewards/margins") else \
                1.0 if k.startswith("logits/") else 0.0
            scale = max(abs(x), abs(y), floor)
            errs[k] = max(errs.get(k, 0.0), 0.0 if scale == 0 else abs(x - y) / scale)
    return errs


def loss_kwargs(loss_type):
    """DPOConfig options a loss type needs (exo_pair requires label smoothing, as in TRL)."""
    return {"label_smoothing": 1e-3} if loss_type == "exo_pair" else {}
