"""Reference trainer for spo-kernels: DPO-family and SPO training of Hugging Face causal LMs through
the fused preference loss (no logits are ever built), plus the built-in CPU demo.

    python -m training train --data pairs.jsonl --model path/to/model --spo-lambda 1.0
    python -m training demo

Python use: ``train(TrainConfig(...))``; ``one_step_anchor(model, batch, alpha)`` computes SPO's
"one_step" anchor for a batch.
"""

from .config import TrainConfig
from .data import PreferenceBatch, collate_pairs, load_preference_jsonl, tokenize_pair
from spo_kernels.integrations.anchor import one_step_anchor

from .modeling import final_hidden, lm_head, sequence_logprobs
from .tokenizer import CharTokenizer, load_tokenizer
from .trainer import TrainResult, train

__all__ = [
    "TrainConfig", "train", "TrainResult", "one_step_anchor", "load_preference_jsonl", "tokenize_pair",
    "collate_pairs", "PreferenceBatch", "final_hidden", "lm_head", "sequence_logprobs", "CharTokenizer",
    "load_tokenizer",
]
