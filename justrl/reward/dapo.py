"""The recipe's `dapo` verifier: strict, rule-based, +1 / -1.

Exactly the authors' `compute_score(..., strict_box_verify=True)` from
`verl/utils/reward_score/math_dapo.py` in the JustRL training code:

1. keep the response's last 300 characters (the reference's cut for speed), then of those the
   last 100 (the strict check's window); together: the last 100 characters;
2. find the last "\\boxed{" there and its matching "}" by counting braces;
3. the text between must equal the ground-truth string exactly: +1.0, else -1.0.

No sympy, no normalisation, no stripping of spaces: "\\boxed{ 42}" does not match "42". A box
whose opening is more than 100 characters from the end, or whose brace never closes inside the
window, scores -1.
"""
from __future__ import annotations

# The reference's two windows. The second is the one that decides; the first only exists so that
# a 15k-character response is not scanned. Kept as named constants so the scorer pool can ship
# only the tail of each response to its workers.
FIRST_CUT_CHARS = 300
STRICT_WINDOW_CHARS = 100

BOXED = "\\boxed{"


def last_boxed_content(text: str) -> str | None:
    """Content of the last `\\boxed{...}` in `text`, braces balanced; None if absent or unclosed."""
    start = text.rfind(BOXED)
    if start < 0:
        return None
    depth = 0
    for i in range(start + len(BOXED) - 1, len(text)):
        char = text[i]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[start + len(BOXED):i]
    return None


def dapo_score(response: str, ground_truth: str) -> float:
    """+1.0 if the last boxed answer in the last 100 characters equals `ground_truth`, else -1.0."""
    window = response[-FIRST_CUT_CHARS:][-STRICT_WINDOW_CHARS:]
    return 1.0 if last_boxed_content(window) == ground_truth else -1.0
