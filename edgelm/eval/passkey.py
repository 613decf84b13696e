"""Pass-key retrieval (Mohtashami & Jaggi 2023, "Landmark Attention"): a random 5-digit key is
hidden at a given depth of repetitive filler text and the model must repeat it, greedily
(`edgelm eval passkey`). The prompt is built from token pieces so its length is exact.
"""

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from edgelm.generate import generate_step

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)


def passkey_prompt(tokenizer, num_tokens: int, depth: float, key: str) -> list[int]:
    """Token ids of at most `num_tokens`: intro, filler with the key at `depth` (0 = start), question."""

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    head = ([tokenizer.bos_token_id] if tokenizer.add_bos else []) + encode(INTRO)
    needle, question, unit = encode(NEEDLE.format(key=key)), encode(QUESTION), encode(FILLER)
    units = (num_tokens - len(head) - len(needle) - len(question)) // len(unit)
    if units < 1:
        raise ValueError(f"pass-key length {num_tokens} is too short: the question alone takes more tokens")
    at = round(depth * units)
    return head + unit * at + needle + unit * (units - at) + question


def answer_digits(text: str) -> str:
    found = re.search(r"\d+", text)
    return found.group(0) if found else ""


@dataclass
class PasskeyTrial:
    length: int  # requested length
    prompt_tokens: int
    depth: float
    key: str
    answer: str  # the generated text
    correct: bool


def passkey_trial(model, num_tokens: int, depth: float, key: str, max_tokens: int = 8) -> PasskeyTrial:
    tok = model.tokenizer
    length = min(num_tokens, model.context_length - max_tokens - 1)
    ids = passkey_prompt(tok, length, depth, key)
    out = [t for t, _ in generate_step(model, ids, max_tokens=max_tokens)]  # greedy
    answer = tok.decode(out, skip_special_tokens=True)
    return PasskeyTrial(num_tokens, len(ids), depth, key, answer.strip(), answer_digits(answer) == key)


def run_passkey(
    model,
    lengths: Sequence[int],
    depths: Sequence[float] = DEPTHS,
    trials: int = 1,
    seed: int = 0,
    progress=None,
) -> list[PasskeyTrial]:
    """One trial per (length, depth, repeat), each with its own seeded random key."""
    rng, results = random.Random(seed), []
    for length in lengths:
        for depth in depths:
            for _ in range(trials):
                results.append(passkey_trial(model, length, depth, str(rng.randint(10000, 99999))))
                if progress:
                    progress(results[-1])
    return results


def accuracy_table(results: Sequence[PasskeyTrial]) -> str:
    """Markdown table: one row per length, correct/total per depth, overall accuracy."""
    depths = sorted({r.depth for r in results})
    lines = ["| length | " + " | ".join(f"depth {d:g}" for d in depths) + " | accuracy |"]
    lines.append("|---" * (len(depths) + 2) + "|")
    for length in sorted({r.length for r in results}):
        row = [r for r in results if r.length == length]
        cells = [_score([r for r in row if r.depth == d]) for d in depths]
        accuracy = sum(r.correct for r in row) / len(row)
        lines.append(f"| {length} | " + " | ".join(cells) + f" | {accuracy:.0%} |")
    return "\n".join(lines)


def _score(rows: Sequence[PasskeyTrial]) -> str:
    return f"{sum(r.correct for r in rows)}/{len(rows)}"
