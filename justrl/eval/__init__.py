"""Evaluation: `python -m justrl.eval model_path=<path>`; sampling, the grader, the judge."""
