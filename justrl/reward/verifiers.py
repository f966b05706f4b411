"""The scoring functions by name: the two training verifiers (the recipe's strict `dapo` and the
`lenient` ablation's) and the evaluation grader."""
from __future__ import annotations

from justrl.reward.dapo import dapo_score
from justrl.reward.lenient import lenient_score

VERIFIERS = {"dapo": dapo_score, "lenient": lenient_score}
# What a ScorerPool can run: the training verifiers, and the evaluation grader (justrl.eval.grading),
# which receives an answer already extracted from the response.
SCORER_NAMES = (*VERIFIERS, "grader")


def scorer(name: str):
    """The (response_or_answer, ground_truth) -> +1/-1 function called `name`."""
    if name == "grader":
        from justrl.eval.grading import grader_score

        return grader_score
    return VERIFIERS[name]
