"""Preference data: TRL's JSONL format in, padded ``[2P, T]`` or packed ``[1, N]`` batches out.

Each line is a JSON object with string fields ``prompt``, ``chosen`` and ``rejected``. Tokenization
follows TRL's DPOTrainer for decoder-only models: prompt and completions are tokenized separately
without special tokens, EOS is appended to each completion, the prompt is truncated from the left to
``max_prompt_length`` and each completion from the right to ``max_completion_length``; the sequence is
prompt + completion. Labels are aligned to positions (the label at position t is the token the model
must predict from position t, i.e. token t+1) and are ``ignore_index`` outside the completion and on
padding. Rows ``0..P-1`` of a batch are the chosen sequences, ``P..2P-1`` the rejected ones; a packed
batch holds the same sequences in the same order, back to back in one row, with ``cu_seqlens``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

REQUIRED_FIELDS = ("prompt", "chosen", "rejected")


def load_preference_jsonl(path: str) -> List[dict]:
    """Read a JSONL file of ``{"prompt", "chosen", "rejected"}`` objects.

    Blank lines are skipped. Anything else that is not such an object (or text that is not UTF-8) raises
    ``ValueError`` naming the file and the 1-based line number.
    """
    rows = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}, line {lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{where}: not UTF-8 text (byte 0x{raw[err.start]:02x} at byte {err.start + 1} "
                                 f"of the line)") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object with {list(REQUIRED_FIELDS)}, "
                                 f"got {type(row).__name__}")
            missing = [k for k in REQUIRED_FIELDS if k not in row]
            if missing:
                raise ValueError(f"{where}: missing field(s) {missing}")
            for key in REQUIRED_FIELDS:
                if not isinstance(row[key], str):
                    raise ValueError(f"{where}: field {key!r} must be a string, got {type(row[key]).__name__} "
                                     f"(conversational rows: apply the chat template first)")
            rows.append({k: row[k] for k in REQUIRED_FIELDS})
    if not rows:
        raise ValueError(f"{path}: no examples")
    return rows


def write_preference_jsonl(path: str, rows: Sequence[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({k: row[k] for k in REQUIRED_FIELDS}) + "\n")


@dataclass
class TokenizedPair:
    prompt_ids: List[int]
    chosen_ids: List[int]
    rejected_ids: List[int]


def tokenize_pair(tokenizer, row: dict, max_prompt_length: Optional[int] = None,
                  max_completion_length: Optional[int] = None) -> TokenizedPair:
    """TRL's ``tokenize_row`` for decoder-only models (see the module docstring)."""
    def ids(text):
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    prompt = ids(row["prompt"])
    chosen = ids(row["chosen"]) + [tokenizer.eos_token_id]
    rejected = ids(row["rejected"]) + [tokenizer.eos_token_id]
    if max_prompt_length is not None:
        prompt = prompt[-max_prompt_length:]
    if max_completion_length is not None:
        chosen = chosen[:max_completion_length]
        rejected = rejected[:max_completion_length]
    return TokenizedPair(prompt, chosen, rejected)


@dataclass
class PreferenceBatch:
    """A padded batch of P pairs.

    input_ids:      ``[2P, T]`` int64, right-padded with the tokenizer's pad id.
    attention_mask: ``[2P, T]`` int64, 1 on real tokens.
    labels:         ``[2P, T]`` int64, aligned targets, ``ignore_index`` outside completions.
    indices:        ``[P]`` int64, the pairs' positions in the dataset (for cached reference log-probs).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor

    @property
    def num_pairs(self) -> int:
        return self.input_ids.shape[0] // 2

    def chosen(self) -> "PreferenceBatch":
        """The chosen rows only (``[P, T']``, trailing all-padding columns dropped), for SFT."""
        P = self.num_pairs
        width = int(self.attention_mask[:P].sum(1).max())
        return PreferenceBatch(self.input_ids[:P, :width], self.attention_mask[:P, :width],
                               self.labels[:P, :width], self.indices)


def _sequence_and_labels(prompt: List[int], completion: List[int], ignore_index: int):
    tokens = prompt + completion
    # Position t predicts token t+1; a target counts when it belongs to the completion. With an empty
    # prompt no position predicts the first completion token (as in TRL).
    labels = [ignore_index] * len(tokens)
    for t in range(max(len(prompt) - 1, 0), len(tokens) - 1):
        labels[t] = tokens[t + 1]
    return tokens, labels


def collate_pairs(pairs: Sequence[TokenizedPair], indices: Sequence[int], pad_token_id: int,
                  ignore_index: int = -100) -> PreferenceBatch:
    """Pad P tokenized pairs into one ``[2P, T]`` batch, chosen rows first."""
    rows = [_sequence_and_labels(p.prompt_ids, p.chosen_ids, ignore_index) for p in pairs]
    rows += [_sequence_and_labels(p.prompt_ids, p.rejected_ids, ignore_index) for p in pairs]
    width = max(len(tokens) for tokens, _ in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), ignore_index, dtype=torch.long)
    for r, (tokens, row_labels) in enumerate(rows):
        n = len(tokens)
        input_ids[r, :n] = torch.tensor(tokens)
        attention_mask[r, :n] = 1
        labels[r, :n] = torch.tensor(row_labels)
    return PreferenceBatch(input_ids, attention_mask, labels, torch.tensor(list(indices), dtype=torch.long))


@dataclass
class PackedPreferenceBatch:
    """P pairs packed padding-free into one row (SPEC 6, layout B).

    input_ids:    ``[1, N]`` int64, the 2P sequences back to back (chosen first), no padding.
    position_ids: ``[1, N]`` int64, restarting at 0 at every sequence start (what tells the model's
                  attention where sequences end: flash-attn varlen, or a block-diagonal causal mask).
    labels:       ``[N]`` int64, aligned targets, ``ignore_index`` outside completions (so also on each
                  sequence's last position: no target crosses into the next sequence).
    cu_seqlens:   ``[2P + 1]`` int32, sequence boundaries.
    indices:      ``[P]`` int64, the pairs' positions in the dataset.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    cu_seqlens: torch.Tensor
    indices: torch.Tensor

    @property
    def num_pairs(self) -> int:
        return (self.cu_seqlens.numel() - 1) // 2

    def chosen(self) -> "PackedPreferenceBatch":
        """The chosen sequences only (the first P), for SFT."""
        P = self.num_pairs
        end = int(self.cu_seqlens[P])
        return PackedPreferenceBatch(self.input_ids[:, :end], self.position_ids[:, :end], self.labels[:end],
                                     self.cu_seqlens[:P + 1], self.indices)


def collate_packed(pairs: Sequence[TokenizedPair], indices: Sequence[int],
                   ignore_index: int = -100) -> PackedPreferenceBatch:
    """Pack P tokenized pairs into one padding-free row, chosen sequences first (the same sequences,
    labels and order as :func:`collate_pairs`, without the padding)."""
    rows = [_sequence_and_labels(p.prompt_ids, p.chosen_ids, ignore_index) for p in pairs]
    rows += [_sequence_and_labels(p.prompt_ids, p.rejected_ids, ignore_index) for p in pairs]
    lengths = [len(tokens) for tokens, _ in rows]
    tokens = [t for row, _ in rows for t in row]
    labels = [t for _, row in rows for t in row]
    positions = [t for n in lengths for t in range(n)]
    cu_seqlens = torch.zeros(len(rows) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0)
    return PackedPreferenceBatch(torch.tensor([tokens], dtype=torch.long), torch.tensor([positions], dtype=torch.long),
                                 torch.tensor(labels, dtype=torch.long), cu_seqlens,
                                 torch.tensor(list(indices), dtype=torch.long))


def completion_targets(pair: TokenizedPair) -> int:
    """How many positions of the chosen sequence carry a completion target (its labels that are not
    ``ignore_index``): every completion token, less the first one when the prompt is empty."""
    return len(pair.chosen_ids) - (0 if pair.prompt_ids else 1)
