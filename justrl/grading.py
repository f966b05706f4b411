"""The evaluation grader: is a response's final answer equivalent to the ground truth?

Used by `python -m justrl.evaluate` and by training-time validation; training rewards use the
recipe's verifiers (justrl.reward) instead. Rule-based, in the spirit of the math graders used
to report the paper's table (Hendrycks' MATH normalisation + sympy equivalence):

1. extraction: the content of the response's last \\boxed{...} (or \\fbox{...}), braces balanced;
   no box, no answer (counted as "no boxed answer" in the results);
2. normalisation of both sides: `$`, `\\left`/`\\right`, spacing commands, `\\dfrac`/`\\tfrac`,
   degrees (`^\\circ`, `°`), percent signs, trailing units in `\\text{}`/`\\mbox{}`, a leading
   "x =", thousands separators (`1,000`), `\\frac12`, `.5`;
3. equal strings, or equal numbers (relative tolerance 1e-6);
4. tuples and intervals element by element, with the brackets of an interval compared exactly;
5. otherwise math-verify (sympy): equivalent expressions, fractions vs decimals, and so on.

Step 5 can take very long on adversarial input; run `grade` through justrl.reward.ScorerPool
(verifier name "grader"), which kills a worker that exceeds its timeout and counts it.
"""
from __future__ import annotations

import math
import re

from justrl.data.benchmarks import strip_boxed

_BOX_COMMANDS = ("\\boxed", "\\fbox")
# Spacing and sizing commands that never change a value.
_NOISE = ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\displaystyle", "\\bigl", "\\bigr", "\\Bigl", "\\Bigr")
_UNIT_TEXT = re.compile(r"(\\text|\\mbox|\\mathrm)\{\s*[A-Za-z][A-Za-z\s.^0-9]*\}\s*$")
_THOUSANDS = re.compile(r"-?\d{1,3}(,\d{3})+(\.\d+)?")
_ASSIGNMENT = re.compile(r"^[A-Za-z](_\{?\w+\}?)?\s*=\s*(?=\S)")


def extract_answer(response: str) -> str | None:
    """Content of the last \\boxed{...} or \\fbox{...} in `response` (None if there is none or it
    is not closed). `\\boxed 5` (no braces) gives "5"."""
    best, best_at = None, -1
    for command in _BOX_COMMANDS:
        at = response.rfind(command)
        if at <= best_at:
            continue
        rest = response[at + len(command):]
        if rest.startswith("{"):
            depth = 0
            for i, ch in enumerate(rest):
                depth += ch == "{"
                depth -= ch == "}"
                if depth == 0:
                    best, best_at = rest[1:i], at
                    break
        elif rest.startswith(" "):
            token = rest.strip().split("$")[0].split()
            if token:
                best, best_at = token[0], at
    return best


def _unwrap(text: str, command: str) -> str:
    """`\\text{abc}` -> `abc` for every occurrence of `command` (balanced braces)."""
    while (at := text.find(command + "{")) >= 0:
        depth, start = 0, at + len(command)
        for i in range(start, len(text)):
            depth += text[i] == "{"
            depth -= text[i] == "}"
            if depth == 0:
                text = text[:at] + text[start + 1:i] + text[i + 1:]
                break
        else:
            return text
    return text


def normalize(answer: str) -> str:
    """A canonical string form of a final answer (see the module docstring)."""
    s = answer.strip().replace("\n", " ")
    s = s.replace("\\$", "").replace("$", "").replace("\\(", "").replace("\\)", "").replace("\\[", "").replace("\\]", "")
    for noise in _NOISE:
        s = s.replace(noise, "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    # degrees and percent: 90^\circ, 90^{\circ}, 90°, 50\%, 50%
    s = re.sub(r"\^\s*\{?\\circ\}?", "", s).replace("°", "").replace("\\circ", "")
    s = s.replace("\\%", "").replace("%", "")
    # units after a value: "5 \text{ cm}" -> "5" (a lone \text{B} is an answer, kept below)
    if (m := _UNIT_TEXT.search(s)) and s[:m.start()].strip():
        s = s[:m.start()]
    for command in ("\\text", "\\mbox", "\\mathrm", "\\textbf", "\\mathbf"):
        s = _unwrap(s, command)
    s = s.replace("\\ ", "").replace("~", "")
    s = _ASSIGNMENT.sub("", s.strip())
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt(\d)", r"\\sqrt{\1}", s)
    s = s.replace(" ", "").rstrip(".")
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    s = re.sub(r"(^|[^\d])\.(\d)", r"\g<1>0.\2", s)
    return s


def _number(s: str) -> float | None:
    try:
        return float(s)
    except ValueError:
        m = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(\d+)\}", s)
        if m and int(m.group(3)):
            return (-1 if m.group(1) else 1) * int(m.group(2)) / int(m.group(3))
        return None


def _split_top_level(s: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(s):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(s[start:i])
            start = i + 1
    parts.append(s[start:])
    return parts


def _sequence(s: str) -> tuple[str, list[str], str] | None:
    """(open bracket, elements, close bracket) of a tuple/interval/list; None if `s` is not one."""
    if len(s) >= 2 and s[0] in "([" and s[-1] in ")]":
        inner = _split_top_level(s[1:-1])
        if len(inner) >= 2:
            return s[0], inner, s[-1]
    if "," in s:
        inner = _split_top_level(s)
        if len(inner) >= 2:
            return "", inner, ""
    return None


def _math_verify(pred: str, gold: str) -> bool:
    from math_verify import parse, verify  # sympy: imported where it is used

    gold_parsed = parse(f"${gold}$", parsing_timeout=None)
    pred_parsed = parse(f"${pred}$", parsing_timeout=None)
    return bool(gold_parsed and pred_parsed and verify(gold_parsed, pred_parsed, timeout_seconds=None))


def answers_match(pred: str, gold: str) -> bool:
    """True if the extracted answer `pred` is equivalent to the ground truth `gold`."""
    p, g = normalize(pred), normalize(strip_boxed(gold))
    if not p:
        return False
    if p == g:
        return True
    pn, gn = _number(p), _number(g)
    if pn is not None and gn is not None:
        return math.isclose(pn, gn, rel_tol=1e-6, abs_tol=1e-9)
    ps, gs = _sequence(p), _sequence(g)
    if ps and gs:
        is_interval = {ps[0], ps[2], gs[0], gs[2]} & {"["} or "]" in (ps[2], gs[2])
        if is_interval and (ps[0], ps[2]) != (gs[0], gs[2]):
            return False
        return len(ps[1]) == len(gs[1]) and all(answers_match(a, b) for a, b in zip(ps[1], gs[1]))
    return _math_verify(p, g)


def grade(response: str, ground_truth: str) -> bool:
    """Extract the response's final answer and compare it with the ground truth."""
    pred = extract_answer(response)
    return pred is not None and answers_match(pred, ground_truth)


def grader_score(answer: str, ground_truth: str) -> float:
    """+1.0 / -1.0 for an answer already extracted by `extract_answer` (the ScorerPool entry:
    the parent extracts, so only the short answer travels to a worker)."""
    return 1.0 if answer and answers_match(answer, ground_truth) else -1.0
