"""The built-in reasoning task: multi-step addition with worked answers, and its preference pairs.

A problem adds a few small numbers; the worked answer writes every partial sum, then the result:

    prompt   "7+5+9+3="
    chosen   "7+5=12,12+9=21,21+3=24#24"
    rejected "7+5=12,12+9=22,22+3=25#25"      (one slip, here a wrong units digit at step 2)

The rejected answer is a plausible wrong one: one arithmetic slip at a random step (a units digit off by
one, or a dropped/extra carry), after which every later step is done correctly from the wrong value.
So chosen and rejected share the prompt and a prefix of the work, then differ in a short run of digits;
that is the regime where DPO is known to lower the chosen response's likelihood along with the rejected
one. Everything is generated from a seed with Python's ``random.Random``: no files, no downloads.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import List, Optional


@dataclass
class Problem:
    terms: List[int]

    @property
    def prompt(self) -> str:
        return "+".join(str(t) for t in self.terms) + "="

    @property
    def answer(self) -> int:
        return sum(self.terms)


def worked_answer(terms: List[int], slip_step: Optional[int] = None, slip: int = 0) -> str:
    """The step-by-step solution; with ``slip_step`` the partial sum of that step is off by ``slip``
    and the remaining steps continue correctly from the wrong value."""
    total = terms[0]
    steps = []
    for k, term in enumerate(terms[1:]):
        result = total + term + (slip if k == slip_step else 0)
        steps.append(f"{total}+{term}={result}")
        total = result
    return ",".join(steps) + f"#{total}"


def final_answer(text: str) -> Optional[int]:
    """The number after the last ``#`` of a generated answer, or None when there is none."""
    if "#" not in text:
        return None
    digits = text.rsplit("#", 1)[1].strip()
    return int(digits) if digits.isdigit() else None


def _slip(rng: random.Random, true_result: int) -> int:
    # Plausible mistakes: a units digit off by one, or a carry dropped/added (off by ten).
    for _ in range(10):
        slip = rng.choice((-1, 1, -10, 10))
        if true_result + slip >= 0:
            return slip
    return 1


def make_problems(count: int, seed: int, min_terms: int = 3, max_terms: int = 5,
                  max_term: int = 9) -> List[Problem]:
    rng = random.Random(seed)
    return [Problem([rng.randint(1, max_term) for _ in range(rng.randint(min_terms, max_terms))])
            for _ in range(count)]


def make_pairs(problems: List[Problem], seed: int) -> List[dict]:
    """One ``{"prompt", "chosen", "rejected"}`` row per problem (TRL's format)."""
    rng = random.Random(seed)
    rows = []
    for problem in problems:
        step = rng.randrange(len(problem.terms) - 1)
        true_partial = sum(problem.terms[:step + 2])
        rows.append({"prompt": problem.prompt,
                     "chosen": worked_answer(problem.terms),
                     "rejected": worked_answer(problem.terms, step, _slip(rng, true_partial))})
    return rows


def split_problems(train_count: int, heldout_count: int, seed: int, **kwargs):
    """Train and held-out problems with no prompt in common."""
    problems = make_problems(4 * (train_count + heldout_count), seed, **kwargs)
    seen, unique = set(), []
    for p in problems:
        if p.prompt not in seen:
            seen.add(p.prompt)
            unique.append(p)
    if len(unique) < train_count + heldout_count:
        raise ValueError("not enough distinct problems for this split; allow more terms or larger terms")
    return unique[:train_count], unique[train_count:train_count + heldout_count]
