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


CASES = None  # filled by _cases(): (label, kwargs for run())


def _cases():
    from spo_kernels import LOSS_TYPES
    trl_types = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                 "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]
    cases = [(t, dict(loss_type=t, **loss_kwargs(t))) for t in trl_types]
    cases += [("sigmoid, Gemma 2 softcap", dict(kind="gemma2")), ("sigmoid, Cohere logit_scale", dict(kind="cohere")),
              ("sigmoid, Granite logits_scaling", dict(kind="granite")),
              ("sigmoid, GPT-2 tied head", dict(kind="gpt2")),
              ("sigmoid, precomputed reference", dict(precompute_ref_log_probs=True)),
              ("sigmoid, gradient checkpointing", dict(gradient_checkpointing=True)),
              ("sigmoid, sync_ref_model", dict(sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=0.5)),
              ("sigmoid, ld_alpha=0.5", dict(ld_alpha=0.5)), ("sigmoid, use_weighting", dict(use_weighting=True)),
              ("sigmoid, f_divergence js", dict(f_divergence_type="js_divergence")),
              ("sigmoid, f_divergence alpha 0.5", dict(f_divergence_type="alpha_divergence",
                                                       f_alpha_divergence_coef=0.5)),
              ("[sigmoid, sft] weights [1, 0.5] (RPO)", dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]))]
    try:
        import peft
        cases.append(("sigmoid, LoRA (adapter-disabled reference)",
                      dict(peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                       lora_dropout=0.0, init_lora_weights=False))))
    except ImportError:
        pass
    return cases, LOSS_TYPES


def parity_table(out_path):
    """Writes the parity table (markdown) of SPOTrainer against DPOTrainer; returns its rows."""
    import platform
    import tempfile

    import datasets
    import transformers
    import trl
    from trl import DPOConfig, DPOTrainer

    from spo_kernels import resolve_backend
    from spo_kernels.integrations.trl import SPOConfig, SPOTrainer

    datasets.disable_progress_bars()
    cases, _ = _cases()
    rows = []
    for label, kw in cases:
        with tempfile.TemporaryDirectory() as d:
            try:
                train_args(SPOConfig, d, **{k: v for k, v in kw.items() if k not in ("kind", "peft_config")})
            except (NotImplementedError, ValueError) as exc:
                rows.append((label, None, f"raises {type(exc).__name__}: {str(exc).split(';')[0][:100]}"))
                continue
            a, _ = run(DPOTrainer, DPOConfig, d + "/trl", **kw)
            b, _ = run(SPOTrainer, SPOConfig, d + "/spo", **kw)
        errs = relative_errors(a, b)
        rows.append((label, errs, None))
        print(label, max(errs.values()), flush=True)
    lines = ["# SPOTrainer vs TRL 1.16 DPOTrainer: parity", "",
             "Same tiny random Llama (hidden 32, 2 layers, vocab 61, eager attention), same 8 pairs, 3 steps of "
             "SGD (lr 1.0, batch 2 pairs), fp32 on CPU. Each cell is the largest relative error over the 3 logged "
             "steps, `|trl - spo| / max(|trl|, |spo|, floor)`; the floor is 0 except for differences of large "
             "sums: `rewards/*` = beta (L - R) of ~20-nat summed log-probs (floor beta * max |logps/*|, the fp32 "
             "rounding of TRL's sums) and `logits/*`, means of O(1) logits that cancel to ~1e-2 (floor 1). "
             "\"metrics\" is the worst of TRL's other logged metrics (entropy, num_tokens, logits/chosen, "
             "logits/rejected, mean_token_accuracy, rewards/chosen, rewards/rejected, rewards/accuracies, "
             "rewards/margins, logps/chosen, logps/rejected). Tolerance of tests/test_integrations_trl.py: 1e-5.",
             "", f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, "
             f"{platform.machine()} CPU, spo_kernels backend `{resolve_backend('cpu')}`.", "",
             "Reproduce: `PYTHONPATH=$PWD python tests/trl_parity.py benchmarks/results/trl-trainer-parity.md`", "",
             "| case | loss | grad_norm | metrics (worst) | result |", "|---|---|---|---|---|"]
    for label, errs, note in rows:
        if errs is None:
            lines.append(f"| {label} | - | - | - | {note} |")
            continue
        other = {k: v for k, v in errs.items() if k not in ("loss", "grad_norm")}
        worst = max(other, key=other.get)
        ok = max(errs.values()) <= 1e-5
        lines.append(f"| {label} | {errs['loss']:.1e} | {errs['grad_norm']:.1e} | {other[worst]:.1e} ({worst}) | "
                     f"{'within 1e-5' if ok else 'OVER 1e-5'} |")
    with open(out_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return rows


if __name__ == "__main__":
    import sys
    parity_table(sys.argv[1] if len(sys.argv) > 1 else "trl-trainer-parity.md")
