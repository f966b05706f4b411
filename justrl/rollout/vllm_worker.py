"""justrl's vLLM worker extension: the in-place reload the file weight sync calls.

Engines are started with `--worker-extension-cls justrl.rollout.vllm_worker.ReloadExtension`; vLLM mixes
this class into its worker, so `POST /collective_rpc {"method": "justrl_reload_weights"}` runs
`justrl_reload_weights` in every worker process of the engine.

Why not vLLM's own `reload_weights` alone: vLLM 0.32's layer-wise reload re-processes a layer only
when the checkpoint loads its weights. A *tied* output layer (`lm_head` sharing `embed_tokens`'
weight, as in Qwen2.5-1.5B and the tiny model) loads nothing of its own, so the reload puts the
new values into the shared tensor but never re-runs the output layer's
`process_weights_after_loading`. On GPU that is harmless (the layer reads the shared tensor). On
the CPU build it is not: that step packs the weight into a oneDNN (or sgl) copy that the logits
are computed from, so the engine kept sampling with the initial model's output layer and the new
input embedding (found by the probe check in justrl.weight_sync.sync; a resumed run, whose engines load
the checkpoint fresh, then diverged from an uninterrupted one). After the reload, this re-runs that
step for every output layer whose weight is an input embedding's, which rebuilds the packed copy.

TRL and veRL also extend vLLM's worker for weight sync (TRL's `WeightSyncWorkerExtension`, an NCCL
receive); here the transport stays vLLM's own and the extension only repairs what the reload
misses. Runs inside vLLM's worker processes: imports vLLM, nothing of justrl's.
"""
from __future__ import annotations

import torch


def tied_output_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The output layers (vLLM's ParallelLMHead) whose weight is an input embedding's tensor."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    modules = list(model.modules())
    embeddings = {m.weight.data_ptr() for m in modules
                  if type(m) is VocabParallelEmbedding and getattr(m, "weight", None) is not None}
    return [m for m in modules if isinstance(m, ParallelLMHead) and getattr(m, "weight", None) is not None
            and m.weight.numel() > 0 and m.weight.data_ptr() in embeddings]


def refresh_tied_output_layers(model: torch.nn.Module) -> int:
    """Re-run the weight processing of every tied output layer (CPU: rebuilds its packed copy of
    the weight). Returns how many layers it refreshed."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return 0  # the layer reads the shared tensor itself
    layers = tied_output_layers(model)
    for layer in layers:
        layer.quant_method.process_weights_after_loading(layer)
    return len(layers)


class ReloadExtension:
    """Mixed into vLLM's worker class (`self` is the worker)."""

    def justrl_reload_weights(self, weights_path: str) -> int:
        """vLLM's in-place reload from a directory of HF safetensors, then the tied output layers'
        refresh. Returns the number of output layers refreshed (0 on GPU and for untied models)."""
        self.reload_weights(weights_path=weights_path, is_checkpoint_format=True)
        return refresh_tied_output_layers(self.model_runner.get_model())
