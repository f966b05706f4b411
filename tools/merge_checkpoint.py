#!/usr/bin/env python
"""Merge a learner=megatron checkpoint (tensor-parallel shards) into an HF directory.

    python tools/merge_checkpoint.py outputs/<run>/checkpoints/step_000050 merged/step50
    python tools/merge_checkpoint.py <checkpoint> <out_dir> --dtype bfloat16

The output holds config.json, model.safetensors and the tokenizer: transformers and vLLM load it
as it is (and `python -m justrl.eval model_path=<out_dir>` evaluates it). The weights are the
model's own (bf16 when trained in bf16), unless --dtype says otherwise. Refuses, naming the
problem, a path that is not a complete Megatron checkpoint.
"""
import argparse
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint directory: <run>/checkpoints/step_N")
    parser.add_argument("out_dir", help="the HF directory to write (replaced if it exists)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="cast the weights (default: keep the stored dtype)")
    args = parser.parse_args()
    from justrl.learner.megatron.checkpoint import NotAMegatronCheckpoint, merge_checkpoint

    try:
        out = merge_checkpoint(args.checkpoint, args.out_dir, args.dtype)
    except NotAMegatronCheckpoint as e:
        print(f"merge_checkpoint: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
