"""The `megatron` learner backend: Megatron-core's GPTModel, DDP and distributed optimizer, with
tensor x data parallelism.

    learner.py         MegatronLearner: the model and its parallelism, as the update's
                       `justrl.learner.step.Backend`; weight exports for the engines
    model.py           the GPTModel of a Qwen2 config.json, and the layer spec (TE on GPUs)
    adapter.py         HF <-> Megatron tensor names and layouts, TP sharding (pure torch)
    vocab_parallel.py  log-probs and entropy of vocabulary-parallel logits
    checkpoint.py      distributed checkpoints: save/load, and the merge into an HF directory
    cpu.py             the scope in which Megatron runs on a CPU-only torch (tests, tiny runs)
"""
from justrl.learner.megatron.learner import MegatronLearner

__all__ = ["MegatronLearner"]
