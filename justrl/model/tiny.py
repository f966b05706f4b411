"""The embedded default's model: a tiny Qwen2-architecture model and a locally trained tokenizer.

    python tools/make_tiny_model.py models/tiny     (or: python -m justrl.model.tiny models/tiny)

The directory holds config.json, model.safetensors, generation_config.json and a fast tokenizer
with a Qwen-style chat template; `transformers` and vLLM load it. Nothing is downloaded: the
byte-level BPE tokenizer is trained on text generated here (arithmetic problems, the recipe's
prompt, LaTeX answer formats), so it can encode any text, including real DAPO problems.

Sizes: head_dim 64 (vLLM's CPU attention needs >= 64), 2 layers, grouped-query attention
(2 query heads, 1 KV head) with QKV bias and tied embeddings, like the Qwen2 1.5B models.

Warm start (format only). A randomly initialised model never writes "\\boxed{...}", so every
reward would be -1 and GRPO would have nothing to learn from. The model is therefore first
trained for `WARM_START_STEPS` supervised steps on the training prompts of justrl's two toy sets
(justrl/data/toy.py), with answers that are unrelated to the problem:
- "toy" prompts: "\\boxed{k}<|im_end|>", k one of the question's two numbers by a coin flip;
- "toy_scratchpad" prompts (experiment=tiny): a scratchpad of 0 to MAX_SCRATCHPAD_GUESSES
  guesses, each a coin flip between the two numbers ("7? 3? 3? "), uniform in number, then k
  (a coin flip again, whatever the guesses were) in one of the toy set's surface forms with the
  shares of `WARM_START_FORM_SHARES`: "\\boxed{7}" 40%, "\\boxed{7.0}", "\\boxed{\\frac{14}{2}}",
  "\\boxed{\\text{7}}", "\\boxed{ 7 }" and "The answer is 7." 12% each.
It learns the formats, the spread of scratchpad lengths and of surface forms, not the comparison:
after the warm start about half of the values are right, and the strict `dapo` verifier accepts
only the strict ones among them. Which number to write, in which form and after how long a
scratchpad is left to GRPO (benchmarks/tiny_learning.py, benchmarks/tiny_ablations.py).
"""
from __future__ import annotations

import argparse
import json
import random
import re
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
WARM_START_STEPS = 300
WARM_START_BATCH = 32
WARM_START_LR = 1e-3
# Every WARM_START_TOY_EVERY-th warm-start batch holds "toy" rows, the others "toy_scratchpad"
# rows: one task per batch, so that the short toy rows are not padded to scratchpad length.
WARM_START_TOY_EVERY = 4
# Surface forms of the toy_scratchpad answers (justrl.data.toy.ANSWER_FORMS) and their shares:
# enough strict answers that `dapo` rewards some from the start, enough of the others that the
# lenient verifier's verdicts differ from dapo's on about a third of the responses.
WARM_START_FORM_SHARES = {"strict": 0.40, "decimal": 0.12, "fraction": 0.12, "text": 0.12, "spaced": 0.12,
                          "unboxed": 0.12}
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
    from justrl.data.prompts import BOXED_SUFFIX

    rng = random.Random(seed)
    lines = []
    for _ in range(4000):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        op = rng.choice("+-*")
        value = a + b if op == "+" else a - b if op == "-" else a * b
        lines.append(f"What is {a} {op} {b}?{BOXED_SUFFIX}")
        lines.append(f"Which number is larger, {a} or {b}?{BOXED_SUFFIX}")
        lines.append(f"Think it over: which number is larger, {a} or {b}?{BOXED_SUFFIX}")
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


def warm_start_target(problem: str, task: str, rng: random.Random) -> str:
    """A warm-start answer to a toy prompt (see the module docstring): the format, not the value."""
    from justrl.data.toy import MAX_SCRATCHPAD_GUESSES, TOY_SOURCE, scratchpad, write_answer

    numbers = [int(x) for x in re.findall(r"\d+", problem)]
    if task == TOY_SOURCE:
        return f"\\boxed{{{rng.choice(numbers)}}}"
    guesses = [rng.choice(numbers) for _ in range(rng.randint(0, MAX_SCRATCHPAD_GUESSES))]
    form = rng.choices(list(WARM_START_FORM_SHARES), weights=list(WARM_START_FORM_SHARES.values()))[0]
    return scratchpad(guesses) + write_answer(rng.choice(numbers), form)


def warm_start(model, tokenizer, seed: int, steps: int = WARM_START_STEPS) -> float:
    """Teach the answer formats on the toy training prompts with answers unrelated to the problem.

    Returns the last step's loss. Deterministic for a given seed.
    """
    import torch

    from justrl.data.prompts import encode_prompt
    from justrl.data.toy import SCRATCHPAD_SOURCE, TOY_SOURCE, toy_problems

    rng = random.Random(seed)
    prompts = {task: [(encode_prompt(tokenizer, p.problem), p.problem) for p in toy_problems("train", task=task)]
               for task in (TOY_SOURCE, SCRATCHPAD_SOURCE)}
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    optimizer = torch.optim.AdamW(model.parameters(), lr=WARM_START_LR, weight_decay=0.0)
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        task = TOY_SOURCE if step % WARM_START_TOY_EVERY == WARM_START_TOY_EVERY - 1 else SCRATCHPAD_SOURCE
        rows, labels = [], []
        for _ in range(WARM_START_BATCH):
            prompt, problem = rng.choice(prompts[task])
            target = warm_start_target(problem, task, rng)
            answer = tokenizer(target, add_special_tokens=False)["input_ids"] + [eos]
            rows.append(prompt + answer)
            labels.append([-100] * len(prompt) + answer)
        width = max(map(len, rows))
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        label_ids = torch.tensor([l + [-100] * (width - len(l)) for l in labels])
        attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        loss = model(input_ids=input_ids, attention_mask=attention, labels=label_ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return float(loss.detach())


def make_tiny_model(out_dir: str | Path, seed: int = 0, warm_start_steps: int = WARM_START_STEPS) -> Path:
    """Build the tiny model and tokenizer into `out_dir` (created; existing files replaced),
    warm-started on the answer format (see the module docstring; 0 steps: random weights)."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from justrl.data.toy import MAX_SCRATCHPAD_GUESSES

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # The warm start must see exactly the tokenisation that transformers and vLLM use when they
    # load the directory: with a qwen2 config.json beside it, AutoTokenizer picks Qwen2's
    # tokenizer class, whose pre-tokenizer splits numbers into single digits (a bare trained
    # tokenizer object would not). So: config, then tokenizer, on disk first, then read back.
    tokenizer = build_tokenizer(seed)
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen2Config(vocab_size=len(tokenizer), bos_token_id=pad_id, eos_token_id=eos_id,
                         pad_token_id=pad_id, torch_dtype="float32", **ARCHITECTURE)
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    final_loss = warm_start(model, tokenizer, seed, warm_start_steps) if warm_start_steps else None
    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(bos_token_id=pad_id, eos_token_id=eos_id, pad_token_id=pad_id).save_pretrained(out)
    (out / "justrl_tiny.json").write_text(json.dumps({
        "seed": seed, "vocab_size": len(tokenizer),
        "warm_start": {"steps": warm_start_steps, "batch": WARM_START_BATCH, "lr": WARM_START_LR,
                       "toy_every": WARM_START_TOY_EVERY, "form_shares": WARM_START_FORM_SHARES,
                       "targets": "toy: \\boxed{k}; toy_scratchpad: 0 to %d guesses, then k in one of the "
                                  "forms (k and the guesses: coin flips between the question's numbers)"
                                  % MAX_SCRATCHPAD_GUESSES,
                       "final_loss": final_loss}}) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="directory to write the model into")
    parser.add_argument("--seed", type=int, default=0, help="seed of the tokenizer corpus and the weights")
    parser.add_argument("--warm-start-steps", type=int, default=WARM_START_STEPS,
                        help="supervised steps on the answer format (0: random weights)")
    args = parser.parse_args(argv)
    path = make_tiny_model(args.out_dir, args.seed, args.warm_start_steps)
    print(f"tiny model written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
