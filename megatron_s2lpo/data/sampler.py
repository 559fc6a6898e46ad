"""Deterministic, resumable prompt sampler.

Each epoch is a permutation of range(num_prompts) drawn from a private generator seeded by
(seed, epoch), so the order never depends on global RNG state and a resumed run recomputes the
current epoch's permutation from its saved (epoch, position) and continues with exactly the
batches the uninterrupted run would have produced.

Batches never span epochs, so a batch never holds the same prompt twice (groups are keyed by
prompt_id). With drop_last=True (default) every batch has batch_size prompts and the
num_prompts % batch_size left over at the end of an epoch are skipped for that epoch only; with
drop_last=False the last batch of each epoch is shorter. batch_size > num_prompts is an error.
"""

from __future__ import annotations

import random


class PromptSampler:
    """Yields lists of prompt indices; `next_batch()` runs forever across epochs."""

    def __init__(self, num_prompts: int, batch_size: int, seed: int, shuffle: bool = True, drop_last: bool = True):
        if num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if batch_size > num_prompts:
            raise ValueError(
                f"batch_size {batch_size} > num_prompts {num_prompts}: a batch would repeat prompts; "
                "lower the batch size or add prompts"
            )
        self.num_prompts = num_prompts
        self.batch_size = batch_size
        self.seed = int(seed)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.position = 0  # index into the current epoch's order where the next batch starts
        self._order: list[int] | None = None  # cache of epoch_order(self.epoch)

    @property
    def batches_per_epoch(self) -> int:
        full, rest = divmod(self.num_prompts, self.batch_size)
        return full + (rest > 0 and not self.drop_last)

    def epoch_order(self, epoch: int) -> list[int]:
        """The visiting order of epoch `epoch` (a pure function of seed and epoch)."""
        order = list(range(self.num_prompts))
        if self.shuffle:
            # A str seed is hashed with sha512: stable across processes and Python versions.
            random.Random(f"prompt-sampler:{self.seed}:{epoch}").shuffle(order)
        return order

    def _epoch_ended(self) -> bool:
        remaining = self.num_prompts - self.position
        return remaining == 0 or (self.drop_last and remaining < self.batch_size)

    def next_batch(self) -> list[int]:
        if self._epoch_ended():
            self.epoch += 1
            self.position = 0
            self._order = None
        if self._order is None:
            self._order = self.epoch_order(self.epoch)
        batch = self._order[self.position : self.position + self.batch_size]
        self.position += len(batch)
        return batch

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_prompts": self.num_prompts,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume from `state_dict()`; the dataset and batching must match the saved run."""
        for key in ("num_prompts", "batch_size", "seed", "shuffle", "drop_last"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state has {key}={state[key]!r} but this sampler has {getattr(self, key)!r}; "
                    "resume with the same dataset and batching, or start a fresh sampler"
                )
        for key in ("epoch", "position"):
            if key not in state:
                raise ValueError(f"sampler state lacks {key!r}; expected the dict from PromptSampler.state_dict()")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.num_prompts:
            raise ValueError(
                f"sampler state has epoch={epoch}, position={position}; "
                f"expected epoch >= 0 and 0 <= position <= {self.num_prompts}"
            )
        self.epoch, self.position, self._order = epoch, position, None
