"""A character-level tokenizer for the built-in task, and one loader for either kind.

The built-in model must run with nothing downloaded, so it cannot use a Hugging Face vocabulary. This
tokenizer maps each character of a fixed alphabet to one id and answers the small part of the Hugging
Face tokenizer interface the trainer uses: ``tokenizer(text, add_special_tokens=False)["input_ids"]``,
``decode``, ``pad_token_id`` / ``eos_token_id`` / ``bos_token_id``, ``save_pretrained`` and
``from_pretrained``.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Iterable, List

TOKENIZER_FILE = "char_tokenizer.json"

# Digits and arithmetic signs for the built-in task, plus letters and punctuation so that a user's
# small JSONL file of plain text works with the built-in model too.
DEFAULT_ALPHABET = (
    "0123456789+-*/=()#,.;:?! \n"
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'\""
)


class CharTokenizer:
    """One id per character; id 0 is ``<pad>``, id 1 is ``<eos>``; there is no BOS token."""

    pad_token = "<pad>"
    eos_token = "<eos>"
    bos_token = None
    pad_token_id = 0
    eos_token_id = 1
    bos_token_id = None

    def __init__(self, alphabet: str = DEFAULT_ALPHABET):
        if len(set(alphabet)) != len(alphabet):
            raise ValueError("alphabet has repeated characters")
        self.alphabet = alphabet
        self._id_of: Dict[str, int] = {ch: i + 2 for i, ch in enumerate(alphabet)}

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet) + 2

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str) -> List[int]:
        try:
            return [self._id_of[ch] for ch in text]
        except KeyError as err:
            raise ValueError(f"character {err.args[0]!r} is not in the tokenizer's alphabet") from None

    def __call__(self, text: str, add_special_tokens: bool = False) -> Dict[str, List[int]]:
        # No special tokens are ever added in front (no BOS), matching add_special_tokens=False.
        return {"input_ids": self.encode(text)}

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_token_id or i == self.pad_token_id:
                if skip_special_tokens:
                    continue
                out.append(self.eos_token if i == self.eos_token_id else self.pad_token)
            else:
                out.append(self.alphabet[i - 2])
        return "".join(out)

    def save_pretrained(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, TOKENIZER_FILE), "w") as f:
            json.dump({"alphabet": self.alphabet}, f)

    @classmethod
    def from_pretrained(cls, path: str) -> "CharTokenizer":
        with open(os.path.join(path, TOKENIZER_FILE)) as f:
            return cls(json.load(f)["alphabet"])


def load_tokenizer(path: str):
    """The tokenizer saved at ``path``: this package's character tokenizer if its file is there,
    otherwise a Hugging Face tokenizer (local files only; nothing is downloaded)."""
    if os.path.exists(os.path.join(path, TOKENIZER_FILE)):
        return CharTokenizer.from_pretrained(path)
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer at {path} has no EOS token; completions end with EOS (as in TRL)")
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out of the loss, so any id works; EOS is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
