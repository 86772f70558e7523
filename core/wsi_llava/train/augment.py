"""Training-data augmentation: multiple-choice questions with their options in other orders.

A close-ended A-D question gets copies whose options are permuted (the answer letter follows the right
option), so a small LLM learns to read the options rather than their positions.
"""

from __future__ import annotations

import random
import re
from dataclasses import replace

from wsi_llava.eval.bench import parse_options
from wsi_llava.train.data import Sample

_FIRST_OPTION = re.compile(r"(?:^|\s)\(?A\)")


def option_permutations(sample: Sample, n: int, seed: int) -> list[Sample]:
    """Up to ``n`` copies of ``sample`` with its options in new orders; none if it is not an A-D question."""
    if n < 1 or sample.kind != "close":
        return []
    opts = parse_options(sample.question)
    letters = sorted(opts)
    answer = sample.answer.strip()
    first = _FIRST_OPTION.search(sample.question)
    if answer not in opts or letters != list("ABCD")[: len(letters)] or first is None:
        return []
    prefix = sample.question[: first.start()].rstrip()
    texts = [opts[k] for k in letters]
    right = letters.index(answer)
    rng = random.Random(seed)
    seen = {tuple(range(len(texts)))}
    out: list[Sample] = []
    for _ in range(8 * n):
        order = list(range(len(texts)))
        rng.shuffle(order)
        if tuple(order) in seen:
            continue
        seen.add(tuple(order))
        body = " ".join(f"{k}) {texts[i]}" for k, i in zip(letters, order, strict=True))
        out.append(replace(sample, question=f"{prefix} {body}", answer=letters[order.index(right)]))
        if len(out) == n:
            break
    return out


def with_option_permutations(samples: list[Sample], n: int, seed: int = 0) -> list[Sample]:
    """``samples`` followed by ``n`` option-permuted copies of each multiple-choice one."""
    extra = [c for i, s in enumerate(samples) for c in option_permutations(s, n, seed * 1_000_003 + i)]
    return samples + extra
