#!/usr/bin/env python
"""Write a tiny Qwen2-architecture model and a locally trained tokenizer into a directory.

    python tools/make_tiny_model.py models/tiny

The directory holds config.json, model.safetensors, generation_config.json and a fast tokenizer
with a Qwen-style chat template; `transformers` and vLLM load it. Nothing is downloaded: the
byte-level BPE tokenizer is trained on text generated here (arithmetic problems, the recipe's
prompt, LaTeX answer formats), so it can encode any text, including real DAPO problems.

Sizes: head_dim 64 (vLLM's CPU attention needs >= 64), 2 layers, grouped-query attention
(2 query heads, 1 KV head) with QKV bias and tied embeddings, like the Qwen2 1.5B models.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
VOCAB_SIZE = 1024
ARCHITECTURE = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=64,
    max_position_embeddings=2048,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)


def _corpus(seed: int) -> list[str]:
    """Text the tokenizer learns its merges from (any text still encodes: byte-level BPE)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from justrl.data.prompts import BOXED_SUFFIX

    rng = random.Random(seed)
    lines = []
    for _ in range(4000):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        op = rng.choice("+-*")
        value = a + b if op == "+" else a - b if op == "-" else a * b
        lines.append(f"What is {a} {op} {b}?{BOXED_SUFFIX}")
        lines.append(f"We compute {a} {op} {b} = {value}. The answer is \\boxed{{{value}}}.")
    lines += [
        "Let $x$ be a real number such that $x^2 + 2x + 1 = 0$. Find \\frac{1}{2} + \\sqrt{3}.",
        "Solve the following math problem step by step. The last line of your response should be",
        "of the form Answer: $Answer (without quotes) where $Answer is the answer to the problem.",
        "Remember to put your answer on its own line after \"Answer:\".",
        "\\left( 3, \\frac{\\pi}{2} \\right) \\text{ cm} 90^\\circ \\dfrac{13}{32} (0, 1] 1,000",
    ] * 20
    return lines


def build_tokenizer(seed: int = 0):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_model(out_dir: str | Path, seed: int = 0) -> Path:
    """Build the tiny model and tokenizer into `out_dir` (created; existing files replaced)."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(seed)
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen2Config(vocab_size=len(tokenizer), bos_token_id=pad_id, eos_token_id=eos_id,
                         pad_token_id=pad_id, torch_dtype="float32", **ARCHITECTURE)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(bos_token_id=pad_id, eos_token_id=eos_id, pad_token_id=pad_id).save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "justrl_tiny.json").write_text(json.dumps({"seed": seed, "vocab_size": len(tokenizer)}) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="directory to write the model into")
    parser.add_argument("--seed", type=int, default=0, help="seed of the tokenizer corpus and the weights")
    args = parser.parse_args(argv)
    path = make_tiny_model(args.out_dir, args.seed)
    print(f"tiny model written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
