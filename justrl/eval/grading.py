"""The evaluation grader: the authors' rule-based check, reproduced.

The paper's table was graded by `grade_answer_verl` in the authors' `evals/utils.py`
(thunlp/JustRL; it descends from Hendrycks' MATH grader through DeepScaleR/POLARIS), then a judge
model for what the rules reject (justrl.eval.judge). This module is written from what that function
does, so that `tools/compare_results.py` compares like with like; a grader more lenient than
theirs would inflate every figure. Their behaviour, quirks included:

1. extraction: the last "\\boxed" in the response must be followed directly by "{"; the content up
   to the brace that closes it is the answer. `\\boxed 5`, `\\boxed {5}` (a space), an unclosed box
   and `\\fbox{5}` give no answer. A ground truth containing "\\boxed" is extracted the same way.
2. a string check after the MATH normalisation (`hendrycks_normalize`: `\\text{...}` around the
   whole answer, `\\left`/`\\right`, `\\dfrac`, degrees, `\\$`, `\\%`, a units `\\text{ ...}`, a short
   "x =", `\\frac12`, `\\sqrt2`, a/b for integers, 0.5 -> 1/2, spaces);
3. else a sympy check (`sympy_normalize`, then element by element for tuples and intervals whose
   brackets must be the same): an unreduced fraction is compared as a string (2/4 is not 1/2),
   an integer ground truth needs an integer answer (7/1 is not 7), and sympy only runs when the
   difference has at most two distinct letters and no large power (`^{`, `^(`, `^12`, `^2^`).
   Anything that raises is "not equal". There is no rule for full-width digits, trailing periods
   or `\\text{Answer: }` prefixes; Python's float() happens to read "12." and "１２" (an integer
   answer), so those pass, as in the reference, and "\\frac{1}{2}." or "\\text{Answer: }5" do not.

justrl adds, around it: the sympy step can run for minutes, so the evaluation runs `grader_score`
in justrl.reward.ScorerPool workers (verifier name "grader"), which kills one that passes its
timeout and scores the answer wrong; and the optional judge pass (justrl.eval.judge).
"""
from __future__ import annotations

import re

BOXED = "\\boxed"
_BOXED_OPEN = "\\boxed{"


# --- 1. extraction -------------------------------------------------------------------------------

def extract_answer(response: str) -> str | None:
    """Content of the last `\\boxed{...}` of `response`, or None (see the module docstring, 1.).

    The brace count starts at the last "\\boxed" and the first "}" that brings it to zero ends the
    box, wherever the first "{" is; only a box whose text starts "\\boxed{" gives an answer.
    """
    start = response.rfind(BOXED)
    if start < 0:
        return None
    depth = 0
    for i in range(start, len(response)):
        char = response[i]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                box = response[start:i + 1]
                return box[len(_BOXED_OPEN):-1] if box.startswith(_BOXED_OPEN) else None
    return None


# --- 2. the MATH normalisation and string check -------------------------------------------------

_WHOLE_TEXT = re.compile(r"^\\text\{(?P<text>.+?)\}$")  # "\text{...}" around the whole answer


class _Unnormalisable(Exception):
    """The MATH normalisation gives up: the answer is then compared as it was."""


def _braced_fracs(s: str) -> str:
    # \frac12 -> \frac{1}{2}, \frac1{72} -> \frac{1}{72}; a "\frac" with under two characters
    # after it leaves the whole string as it was.
    pieces = s.split("\\frac")
    out = [pieces[0]]
    for piece in pieces[1:]:
        if not piece:
            raise _Unnormalisable  # "\frac" at the very end
        if piece[0] == "{":
            out.append("\\frac" + piece)
        elif len(piece) < 2:
            return s
        elif piece[1] != "{":
            out.append("\\frac{" + piece[0] + "}{" + piece[1] + "}" + piece[2:])
        else:
            out.append("\\frac{" + piece[0] + "}" + piece[1:])
    return "".join(out)


def _braced_sqrts(s: str) -> str:
    # \sqrt3 -> \sqrt{3}
    pieces = s.split("\\sqrt")
    out = [pieces[0]]
    for piece in pieces[1:]:
        if not piece:
            raise _Unnormalisable  # "\sqrt" at the very end
        out.append("\\sqrt" + piece if piece[0] == "{" else "\\sqrt{" + piece[0] + "}" + piece[1:])
    return "".join(out)


def _int_slash_int(s: str) -> str:
    # "3/4" -> "\frac{3}{4}", only for two plain integers written canonically
    parts = s.split("/")
    if len(parts) == 2:
        try:
            a, b = int(parts[0]), int(parts[1])
        except ValueError:
            return s
        if s == f"{a}/{b}":
            return f"\\frac{{{a}}}{{{b}}}"
    return s


def _math_strip(s: str) -> str:
    s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")
    s = s.replace("\\$", "")
    if "\\text{ " in s:  # a units text ("5 \text{ cm}"); more than one and the normalisation gives up
        parts = s.split("\\text{ ")
        if len(parts) != 2:
            raise _Unnormalisable
        s = parts[0]
    s = s.replace("\\%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    sides = s.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:  # "x = 3", "k=3"
        s = sides[1]
    s = _braced_sqrts(s)
    s = s.replace(" ", "")
    s = _braced_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _int_slash_int(s)


def hendrycks_normalize(answer: str) -> str:
    """The MATH normalisation of an answer, for the string check (step 2)."""
    answer = answer.strip()
    if m := _WHOLE_TEXT.search(answer):
        answer = m.group("text").strip()
    try:
        return _math_strip(answer)
    except _Unnormalisable:
        return answer


# --- 3. the sympy check -------------------------------------------------------------------------

_UNIT_WORDS = ("degree", "cm", "centimeter", "meter", "mile", "second", "minute", "hour", "day", "week",
               "month", "year", "foot", "feet", "inch", "yard")
# Each word is removed wherever it occurs (also inside other words), with a plural ending, spaces
# and a numeric power after it.
_UNITS = [re.compile(word + r"(es)?(s)? *(\^[0-9]+)?") for word in _UNIT_WORDS]
_DEGREES = re.compile(r"\^ *\\circ")
_THIN_SPACE_COMMA = re.compile(r",\\! *")
_MIXED_NUMBER = re.compile(r"([0-9]) +([0-9])")  # "7 3/4" -> "7+3/4"
_THOUSANDS = re.compile(r"(\d)(,)(\d\d\d)($|\D)")
_UNICODE_TO_SYMPY = (("√", "sqrt"), ("π", "pi"), ("∞", "inf"), ("∪", "U"), ("·", "*"), ("×", "*"))
_TUPLE_BRACKETS = "()[]"
_FRACTION = re.compile(r"^-?[0-9]+.?/0*[1-9][0-9]*.?$")
# sympy may never finish on these; the reference does not try (a difference of powers, towers).
_TOO_HARD = ("^{", "^(")
_TOO_HARD_RE = (re.compile(r"\^[0-9]+\^"), re.compile(r"\^[0-9][0-9]+"))
MAX_SYMPY_LETTERS = 2  # more distinct letters than this: text or a many-variable function, no sympy


def _float_or_none(s: str) -> float | None:
    try:
        return float(s)
    except ValueError:
        return None


def _close_to_int(x: float) -> bool:
    try:
        return abs(x - int(round(x))) <= 1e-7
    except (OverflowError, ValueError):  # inf, nan
        return False


def _drop_thousands_commas(s: str) -> str:
    # "1,234,567" -> "1234567", but "(1,2)" keeps its comma
    while (next_s := _THOUSANDS.sub(r"\1\3\4", s)) != s:
        s = next_s
    return s


def _is_int_text(s: str) -> bool:
    x = _float_or_none(_drop_thousands_commas(s))
    return x is not None and _close_to_int(x)


def _latex_to_text(s: str) -> str:
    from pylatexenc.latex2text import LatexNodes2Text  # imported where it is used

    s = s.replace("\\tfrac", "\\frac").replace("\\dfrac", "\\frac").replace("\\frac", " \\frac")
    s = LatexNodes2Text().latex_to_text(s)
    for symbol, name in _UNICODE_TO_SYMPY:
        s = s.replace(symbol, name)
    return s.strip()


def sympy_normalize(answer: str) -> str:
    """The normalisation before the sympy check (step 3): LaTeX to plain text, lower case."""
    s = m.group("text") if (m := _WHOLE_TEXT.search(answer)) else answer
    s = s.replace("\\%", "%").replace("\\$", "$").replace("$", "").replace("%", "")
    s = s.replace(" or ", " , ").replace(" and ", " , ")
    s = s.replace("million", "*10^6").replace("billion", "*10^9").replace("trillion", "*10^12")
    for unit in _UNITS:
        s = unit.sub("", s)
    s = _DEGREES.sub("", s)
    if s and s[0] == "{" and s[-1] == "}":
        s = s[1:-1]
    s = _THIN_SPACE_COMMA.sub("", s)
    x = _float_or_none(s)
    if x is not None and _close_to_int(x):
        s = str(int(round(x)))
    if "\\" in s:
        try:
            s = _latex_to_text(s)
        except Exception:  # pylatexenc is tolerant; whatever it still rejects stays LaTeX
            pass
    s = re.sub("- *", "-", s)
    s = _MIXED_NUMBER.sub(r"\1+\2", s)
    s = s.replace(" ", "").replace("{", "").replace("}", "").lower()
    if _is_int_text(s):
        s = str(int(float(s.replace(",", ""))))
    return s


def _elements(s: str) -> list[str]:
    """Elements of a tuple/interval "(a,b)" / "[a,b)" with no bracket inside; else [s]."""
    s = _drop_thousands_commas(s)
    if not s:
        return []
    if len(s) > 2 and s[0] in _TUPLE_BRACKETS and s[-1] in _TUPLE_BRACKETS \
            and not any(ch in s[1:-1] for ch in _TUPLE_BRACKETS):
        return [e.strip() for e in s[1:-1].split(",")]
    return [s]


def _sympy_may_run(expr: str) -> bool:
    letters = {ch for ch in expr.replace("sqrt", "").replace("frac", "") if ch.isalpha()}
    if len(letters) > MAX_SYMPY_LETTERS:
        return False
    return not any(bad in expr for bad in _TOO_HARD) and not any(r.search(expr) for r in _TOO_HARD_RE)


def _sympy_equal(gold: str, pred: str) -> bool:
    """True if sympy simplifies (gold) - (pred) to 0 (parsed as Python with implicit products)."""
    expr = f"({gold})-({pred})"
    if not _sympy_may_run(expr):
        return False
    import sympy  # heavy: imported where it is used
    from sympy.parsing import sympy_parser

    try:
        transformations = sympy_parser.standard_transformations + (sympy_parser.implicit_multiplication_application,)
        diff = sympy_parser.parse_expr(expr.replace("^", "**"), transformations=transformations)
        return sympy.simplify(diff) == 0
    except Exception:  # the reference counts any parse or simplify error as "not equal"
        return False


def _sympy_match(pred: str, gold: str) -> bool:
    g, p = sympy_normalize(gold), sympy_normalize(pred)
    if g == p:
        return True
    if not p:
        return False
    gold_elems, pred_elems = _elements(g), _elements(p)
    if len(gold_elems) > 1 and (g[0] != p[0] or g[-1] != p[-1]):
        return False  # a tuple/interval with other brackets
    if len(gold_elems) != len(pred_elems):
        return False
    for ge, pe in zip(gold_elems, pred_elems):
        if _FRACTION.search(ge) and _FRACTION.search(pe):
            ok = ge == pe  # fractions must be reduced the same way: no sympy
        elif _is_int_text(ge) != _is_int_text(pe):
            ok = False  # an integer answer must be an integer
        else:
            ok = _sympy_equal(ge, pe)
        if not ok:
            return False
    return True


# --- the grader ---------------------------------------------------------------------------------

def answers_match(pred: str, ground_truth: str) -> bool:
    """True if the extracted answer `pred` is correct for `ground_truth` (bare, or boxed as in the
    veRL-format files: then its box content is the ground truth)."""
    if not ground_truth:
        return False
    if BOXED in ground_truth:
        gold = extract_answer(ground_truth)
        if gold is None:
            return False
    else:
        gold = ground_truth
    return hendrycks_normalize(gold) == hendrycks_normalize(pred) or _sympy_match(pred, gold)


def grade(response: str, ground_truth: str) -> bool:
    """The authors' verdict on a whole response: its last box's content against the ground truth."""
    pred = extract_answer(response)
    return pred is not None and answers_match(pred, ground_truth)


def grader_score(answer: str, ground_truth: str) -> float:
    """+1.0 / -1.0 for an answer already extracted by `extract_answer` (the ScorerPool entry: the
    parent extracts, so only the short answer travels to a worker). "" stands for "no answer"."""
    return 1.0 if answer and answers_match(answer, ground_truth) else -1.0
