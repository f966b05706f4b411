"""Seeded, resumable order over the training rows.

The recipe makes one pass over the shuffled data set. The first pass's order is veRL's: its
trainer draws from `RandomSampler(dataset, generator=torch.Generator().manual_seed(data.seed))`
(thunlp/JustRL `train/verl/trainer/main_ppo.py`, `create_rl_sampler`; veRL's `data.seed` is 1),
which is one `torch.randperm(len(dataset), generator=...)`, the permutation drawn here for pass 0.
The order is held as one int64 tensor (14 MB for the release's 1.79M rows), not a Python list. The sampler's whole state is (seed, epoch,
position, dataset size); it goes into every checkpoint, and a resumed run draws exactly the
prompts the uninterrupted run would have drawn. A batch never straddles two epochs: the tail of
an epoch that is shorter than a batch is skipped (like a DataLoader with drop_last=True), and the
next epoch is a new permutation seeded by (seed, epoch).
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


class PromptSampler:
    def __init__(self, num_items: int, seed: int):
        if num_items < 1:
            raise ValueError(f"cannot sample from {num_items} items")
        self.num_items = num_items
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        import torch  # here, not at import: justrl.config reads justrl.data's names on a login node

        generator = torch.Generator().manual_seed(self.seed + epoch * 1_000_003)
        return torch.randperm(self.num_items, generator=generator)

    def batches_per_epoch(self, batch_size: int) -> int:
        return self.num_items // batch_size

    def next_batch(self, batch_size: int) -> list[int]:
        """Indices of the next `batch_size` items."""
        if batch_size > self.num_items:
            raise ValueError(f"batch of {batch_size} prompts from a data set of {self.num_items}")
        if self.position + batch_size > self.num_items:
            self.epoch += 1
            self.position = 0
            self._order = self._permutation(self.epoch)
            log.warning("training data: pass %d over the %d rows ended; pass %d starts (a new permutation): "
                        "trainer.total_steps is longer than one pass", self.epoch, self.num_items, self.epoch + 1)
        batch = self._order[self.position:self.position + batch_size].tolist()
        self.position += batch_size
        return batch

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position, "num_items": self.num_items}

    def load_state_dict(self, state: dict) -> None:
        if state["num_items"] != self.num_items or state["seed"] != self.seed:
            raise ValueError(
                f"checkpointed sampler was over {state['num_items']} prompts with seed {state['seed']}, "
                f"this run has {self.num_items} with seed {self.seed}: the data set or data.seed changed, "
                "so resuming would not see the prompts the run would have seen")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)
