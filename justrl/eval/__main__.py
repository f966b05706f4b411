"""`python -m justrl.eval model_path=<path> ...`: the paper's evaluation (justrl.eval.command)."""
from justrl.eval.command import main

main()
