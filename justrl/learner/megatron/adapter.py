"""HF <-> Megatron-core state dicts for Qwen2-architecture models, with tensor-parallel sharding.

Pure torch, no Megatron import: the one place that knows both naming schemes. Weight sync to the
rollout engines, checkpoint export and the merge tool are meant to use it and nothing else.

Megatron's GPTModel (local layer spec; `fused_norms=True` for the Transformer Engine spec, where
the norms live inside the linear layers) names and lays out a Qwen2 model as follows:

    model.embed_tokens.weight            -> embedding.word_embeddings.weight   [V_pad, H], vocab-parallel (dim 0)
    layers.i.input_layernorm.weight      -> decoder.layers.i.input_layernorm.weight
                                            (TE: ...self_attention.linear_qkv.layer_norm_weight)
    layers.i.self_attn.{q,k,v}_proj.*    -> decoder.layers.i.self_attention.linear_qkv.{weight,bias}
                                            fused per query group g: [q of g's heads; k_g; v_g]; column-parallel
    layers.i.self_attn.o_proj.weight     -> decoder.layers.i.self_attention.linear_proj.weight, row-parallel (dim 1)
    layers.i.post_attention_layernorm    -> decoder.layers.i.pre_mlp_layernorm.weight
                                            (TE: ...mlp.linear_fc1.layer_norm_weight)
    layers.i.mlp.{gate,up}_proj.weight   -> decoder.layers.i.mlp.linear_fc1.weight  [gate; up], column-parallel
                                            (each rank holds [its gate rows; its up rows])
    layers.i.mlp.down_proj.weight        -> decoder.layers.i.mlp.linear_fc2.weight, row-parallel (dim 1)
    model.norm.weight                    -> decoder.final_layernorm.weight
    lm_head.weight (untied models only)  -> output_layer.weight  [V_pad, H], vocab-parallel (dim 0)

The vocabulary is padded with zero rows to a multiple of `VOCAB_DIVISOR x tp` (Megatron's
make_vocab_size_divisible_by x TP) and the padding is dropped again on the way back. Whether the
output layer is tied to the embedding comes from the HF config's `tie_word_embeddings`: the
Qwen2.5-1.5B-based models tie it, DeepSeek-R1-Distill-Qwen-1.5B does not (converters that assume
one or the other silently drop or invent a 233M-parameter matrix).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Megatron's default make_vocab_size_divisible_by.
VOCAB_DIVISOR = 128


@dataclass(frozen=True)
class Qwen2Shape:
    """What the mapping needs from a Qwen2 config.json."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    tie_word_embeddings: bool
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int

    @classmethod
    def from_hf_config(cls, config: dict) -> "Qwen2Shape":
        if config.get("model_type") not in ("qwen2", None):
            raise ValueError(f"not a Qwen2 config (model_type={config.get('model_type')!r})")
        heads = config["num_attention_heads"]
        # transformers 5 writes rope settings under rope_parameters; older files at the top level
        rope = config.get("rope_parameters") or {}
        return cls(num_layers=config["num_hidden_layers"], hidden_size=config["hidden_size"], num_heads=heads,
                   num_kv_heads=config.get("num_key_value_heads", heads),
                   head_dim=config.get("head_dim") or config["hidden_size"] // heads,
                   ffn_hidden_size=config["intermediate_size"], vocab_size=config["vocab_size"],
                   tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                   rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
                   rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                   max_position_embeddings=config.get("max_position_embeddings", 32768))


def padded_vocab_size(vocab_size: int, tp: int, divisor: int = VOCAB_DIVISOR) -> int:
    multiple = divisor * tp
    return -(-vocab_size // multiple) * multiple


def _check_tp(shape: Qwen2Shape, tp: int) -> None:
    if shape.num_kv_heads % tp or shape.num_heads % tp or shape.ffn_hidden_size % tp:
        raise ValueError(f"tensor parallel size {tp} must divide the KV heads ({shape.num_kv_heads}), the heads "
                         f"({shape.num_heads}) and the FFN size ({shape.ffn_hidden_size})")


def _names(i: int, fused_norms: bool) -> dict[str, str]:
    p = f"decoder.layers.{i}."
    return {
        "input_norm": p + ("self_attention.linear_qkv.layer_norm_weight" if fused_norms else "input_layernorm.weight"),
        "qkv_w": p + "self_attention.linear_qkv.weight",
        "qkv_b": p + "self_attention.linear_qkv.bias",
        "proj": p + "self_attention.linear_proj.weight",
        "mlp_norm": p + ("mlp.linear_fc1.layer_norm_weight" if fused_norms else "pre_mlp_layernorm.weight"),
        "fc1": p + "mlp.linear_fc1.weight",
        "fc2": p + "mlp.linear_fc2.weight",
    }


def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: Qwen2Shape) -> torch.Tensor:
    """[q; k; v] (HF) -> per query group [q heads of the group; k; v] (Megatron), along dim 0."""
    g, d = shape.num_kv_heads, shape.head_dim
    per = shape.num_heads // g
    q = q.reshape(g, per * d, *q.shape[1:])
    k = k.reshape(g, d, *k.shape[1:])
    v = v.reshape(g, d, *v.shape[1:])
    return torch.cat([q, k, v], dim=1).reshape(-1, *q.shape[2:])


def _split_qkv(qkv: torch.Tensor, shape: Qwen2Shape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g, d = shape.num_kv_heads, shape.head_dim
    per = shape.num_heads // g
    grouped = qkv.reshape(g, (per + 2) * d, *qkv.shape[1:])
    q, k, v = torch.split(grouped, [per * d, d, d], dim=1)
    return (q.reshape(-1, *qkv.shape[1:]), k.reshape(-1, *qkv.shape[1:]), v.reshape(-1, *qkv.shape[1:]))


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])]) if rows > t.shape[0] else t


def hf_to_mcore(hf: dict[str, torch.Tensor], shape: Qwen2Shape, tp: int = 1,
                fused_norms: bool = False) -> list[dict[str, torch.Tensor]]:
    """One Megatron state dict per tensor-parallel rank from an HF Qwen2 state dict."""
    _check_tp(shape, tp)
    vocab = padded_vocab_size(shape.vocab_size, tp)
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]

    def column(name: str, t: torch.Tensor) -> None:
        for r, piece in enumerate(torch.chunk(t, tp, dim=0)):
            shards[r][name] = piece.clone()

    def row(name: str, t: torch.Tensor) -> None:
        for r, piece in enumerate(torch.chunk(t, tp, dim=1)):
            shards[r][name] = piece.clone()

    def replicated(name: str, t: torch.Tensor) -> None:
        for r in range(tp):
            shards[r][name] = t.clone()

    column("embedding.word_embeddings.weight", _pad_rows(hf["model.embed_tokens.weight"], vocab))
    for i in range(shape.num_layers):
        h, n = f"model.layers.{i}.", _names(i, fused_norms)
        replicated(n["input_norm"], hf[h + "input_layernorm.weight"])
        a = h + "self_attn."
        column(n["qkv_w"], _fuse_qkv(hf[a + "q_proj.weight"], hf[a + "k_proj.weight"], hf[a + "v_proj.weight"], shape))
        column(n["qkv_b"], _fuse_qkv(hf[a + "q_proj.bias"], hf[a + "k_proj.bias"], hf[a + "v_proj.bias"], shape))
        row(n["proj"], hf[a + "o_proj.weight"])
        replicated(n["mlp_norm"], hf[h + "post_attention_layernorm.weight"])
        gates = torch.chunk(hf[h + "mlp.gate_proj.weight"], tp, dim=0)
        ups = torch.chunk(hf[h + "mlp.up_proj.weight"], tp, dim=0)
        for r in range(tp):
            shards[r][n["fc1"]] = torch.cat([gates[r], ups[r]]).clone()
        row(n["fc2"], hf[h + "mlp.down_proj.weight"])
    replicated("decoder.final_layernorm.weight", hf["model.norm.weight"])
    if not shape.tie_word_embeddings:
        column("output_layer.weight", _pad_rows(hf["lm_head.weight"], vocab))
    return shards


def mcore_to_hf(shards: list[dict[str, torch.Tensor]], shape: Qwen2Shape,
                fused_norms: bool = False) -> dict[str, torch.Tensor]:
    """The HF Qwen2 state dict from the Megatron state dicts of every tensor-parallel rank
    (in rank order). Tied models get no `lm_head.weight` (HF ties it on load)."""
    tp = len(shards)
    _check_tp(shape, tp)

    def column(name: str) -> torch.Tensor:
        return torch.cat([s[name] for s in shards], dim=0)

    def row(name: str) -> torch.Tensor:
        return torch.cat([s[name] for s in shards], dim=1)

    def replicated(name: str) -> torch.Tensor:
        return shards[0][name].clone()

    hf = {"model.embed_tokens.weight": column("embedding.word_embeddings.weight")[:shape.vocab_size].clone()}
    for i in range(shape.num_layers):
        h, n = f"model.layers.{i}.", _names(i, fused_norms)
        hf[h + "input_layernorm.weight"] = replicated(n["input_norm"])
        a = h + "self_attn."
        for suffix, key in (("weight", "qkv_w"), ("bias", "qkv_b")):
            q, k, v = _split_qkv(column(n[key]), shape)
            hf[a + f"q_proj.{suffix}"], hf[a + f"k_proj.{suffix}"], hf[a + f"v_proj.{suffix}"] = q, k, v
        hf[a + "o_proj.weight"] = row(n["proj"])
        hf[h + "post_attention_layernorm.weight"] = replicated(n["mlp_norm"])
        halves = [torch.chunk(s[n["fc1"]], 2, dim=0) for s in shards]
        hf[h + "mlp.gate_proj.weight"] = torch.cat([g for g, _ in halves])
        hf[h + "mlp.up_proj.weight"] = torch.cat([u for _, u in halves])
        hf[h + "mlp.down_proj.weight"] = row(n["fc2"])
    hf["model.norm.weight"] = replicated("decoder.final_layernorm.weight")
    if not shape.tie_word_embeddings:
        hf["lm_head.weight"] = column("output_layer.weight")[:shape.vocab_size].clone()
    return {k: v.contiguous() for k, v in hf.items()}


def merge_tp(shards: list[dict[str, torch.Tensor]], shape: Qwen2Shape, fused_norms: bool = False) -> dict[str, torch.Tensor]:
    """Tensor-parallel shards -> the TP=1 Megatron state dict (through the HF layout)."""
    return hf_to_mcore(mcore_to_hf(shards, shape, fused_norms), shape, 1, fused_norms)[0]
