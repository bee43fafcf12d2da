"""Which training blocks each process reads at each step: a pure function of (seed, step), so resuming is exact.

The blocks are read epoch by epoch, each epoch in a fresh permutation drawn from a generator seeded by
(seed, epoch). One optimizer step consumes world_size * accumulation * micro_batch_size consecutive positions of
that stream; process r takes the r-th micro-batch of each accumulation round, so processes read disjoint blocks.
"""

import torch


class BlockOrder:
    """Deterministic, resumable assignment of training blocks to (step, micro-step, process)."""

    def __init__(self, n_blocks: int, seed: int, micro_batch_size: int, accumulation_steps: int, world_size: int):
        self.n_blocks = n_blocks
        self.seed = seed
        self.micro_batch_size = micro_batch_size
        self.accumulation_steps = accumulation_steps
        self.world_size = world_size
        self._permutations: dict[int, torch.Tensor] = {}

    @property
    def blocks_per_step(self) -> int:
        return self.world_size * self.accumulation_steps * self.micro_batch_size

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._permutations:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._permutations = {epoch: torch.randperm(self.n_blocks, generator=generator)}  # keep one epoch
        return self._permutations[epoch]

    def indices(self, step: int, micro_step: int, rank: int) -> torch.Tensor:
        """Block indices (micro_batch_size,) for 0-based `step`, `micro_step` (< accumulation) and `rank`."""
        first = ((step * self.accumulation_steps + micro_step) * self.world_size + rank) * self.micro_batch_size
        positions = range(first, first + self.micro_batch_size)
        return torch.stack([self._permutation(p // self.n_blocks)[p % self.n_blocks] for p in positions])
