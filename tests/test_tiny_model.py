"""tools/make_tiny_model.py writes a model that transformers and vLLM load."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def test_tiny_model_loads_in_transformers(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["architectures"] == ["Qwen2ForCausalLM"]
    assert config["head_dim"] >= 64  # vLLM's CPU attention needs it
    assert config["num_key_value_heads"] < config["num_attention_heads"]  # GQA like the 1.5B models
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.config.vocab_size == len(tok)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    # byte-level BPE: any text round-trips, LaTeX and unicode included
    text = "Find $\\frac{1}{2}$ of 90° — é ∑ \\boxed{42}"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True,
                                  tokenize=False)
    batch = tok(ids, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], len(tok))
    assert torch.isfinite(logits).all()
    n_params = sum(p.numel() for p in model.parameters())
    assert 100_000 < n_params < 2_000_000


def test_make_tiny_model_cli_is_deterministic(tiny_model_dir, tmp_path):
    """The CLI, in its own process, writes exactly the session's model (built in this process by
    `make_tiny_model` with the same defaults): same weights to the bit, same tokenizer."""
    from safetensors.torch import load_file

    subprocess.run([sys.executable, str(REPO / "tools" / "make_tiny_model.py"), str(tmp_path / "cli")],
                   check=True, capture_output=True)
    a, b = load_file(tiny_model_dir / "model.safetensors"), load_file(tmp_path / "cli" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tiny_model_dir / "tokenizer.json").read_text() == (tmp_path / "cli" / "tokenizer.json").read_text()


VLLM_SCRIPT = r"""
import sys
from vllm import LLM, SamplingParams
if __name__ == "__main__":
    llm = LLM(model=sys.argv[1], dtype="float32", max_model_len=256, enforce_eager=True, seed=0,
              gpu_memory_utilization=0.2)
    out = llm.generate({"prompt_token_ids": [1, 5, 6, 7]}, SamplingParams(max_tokens=6, temperature=1.0,
                       ignore_eos=True))
    print("TOKENS", list(out[0].outputs[0].token_ids))
"""


@pytest.mark.slow
def test_tiny_model_loads_in_vllm(tiny_model_dir, tmp_path):
    """The real vLLM (CPU build here) loads the directory and generates from token ids."""
    script = tmp_path / "run_vllm.py"
    script.write_text(VLLM_SCRIPT)
    result = subprocess.run([sys.executable, str(script), str(tiny_model_dir)], capture_output=True, text=True,
                            timeout=600, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    tokens = json.loads(result.stdout.split("TOKENS", 1)[1].splitlines()[0])
    assert len(tokens) == 6 and all(0 <= t < 1024 for t in tokens)
