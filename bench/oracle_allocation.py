"""How much can token-dependent compute win at 1.0 FFN experts per token on the demo model? An oracle's answer.

At a mean of one FFN expert per (token, layer), a router can only beat top-1 by giving some pairs two FFN experts
and as many pairs none. This script measures what the best such reallocation is worth when it is chosen with
knowledge no router has (the next token), on the converted demo source (routing exactly the source's, untrained):

1. per (position, MoE layer), the held-out loss change of giving that position a second expert (gain g2) or
   none (cost c0) in that layer, measured by changing one layer for a random tenth of the positions at a time
   and reading each changed position's own next-token loss (attention spreads the rest);
2. the oracle pairs the largest gains with the smallest costs while gain > cost (mean stays exactly 1.0), and
   also at fixed shares (15% of pairs at two, 15% at none: the issue's goal shape);
3. each allocation is run for real (forced per-position counts in every router) and compared with top-1, paired
   on the same blocks; controls at the same histogram: the router's own confidence (upgrade the smallest margin
   between its two best experts, skip the most confident) and random pairs.

    python bench/oracle_allocation.py [--max-heldout-blocks 256] [--work /tmp/upcycle-oracle]
"""

import argparse
import math
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from upcycle.checkpoint.loading import load_causal_lm
from upcycle.data.blocks import load_checkpoint_tokenizer, load_token_blocks
from upcycle.data.corpus import write_demo_corpus
from upcycle.demo import BLOCK_SIZE, DEMO_MODEL
from upcycle.evaluation.evaluate import paired_ratio
from upcycle.surgery.convert import ConvertOptions, convert


class ForcedCounts:
    """Every router of an MoE++ model keeps the source's best experts, as many as `counts` (T, L) says."""

    def __init__(self, model):
        self.routers = [block.gate for block in model.moe_blocks()]
        self.counts: torch.Tensor | None = None  # (T, L) FFN experts per position and MoE layer, for one batch
        for position, router in enumerate(self.routers):
            router.select_experts = self._forced(router, router.select_experts, position)

    def _forced(self, router, select, position):
        def select_experts(logits, selection_bias=None):
            index = select(logits, selection_bias)  # (T, k): the source's top-k (zero-computation experts off)
            probabilities = router.routing_probabilities(logits).gather(-1, index)  # (T, k)
            index = index.gather(-1, probabilities.argsort(dim=-1, descending=True))  # best first
            keep = torch.arange(index.shape[1]) < self.counts[:, position, None]  # (T, k)
            return index.masked_fill(~keep, router.layout.n_ffn)  # a dropped slot: the Zero expert, weight 0
        return select_experts

    def margins(self, model, blocks: torch.Tensor) -> torch.Tensor:
        """(n*S, L) the router's probability gap between its two best experts (small: unsure)."""
        gaps = []
        for batch in blocks.split(16):
            logits = model(batch, output_router_logits=True, use_cache=False).router_logits  # L x (T, N+Z)
            layer_gaps = []
            for router, layer_logits in zip(self.routers, logits):
                top = router.routing_probabilities(layer_logits.float()).topk(2, dim=-1).values  # (T, 2)
                layer_gaps.append(top[:, 0] - top[:, 1])
            gaps.append(torch.stack(layer_gaps, dim=1))
        return torch.cat(gaps)


@torch.no_grad()
def position_losses(model, forced: ForcedCounts, blocks: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(n, S-1) next-token losses with forced counts (n*S, L)."""
    losses, start = [], 0
    for batch in blocks.split(16):
        forced.counts = counts[start:start + batch.numel()]
        start += batch.numel()
        logits = model(batch, use_cache=False).logits  # (B, S, V)
        losses.append(F.cross_entropy(logits[:, :-1].transpose(1, 2), batch[:, 1:], reduction="none"))
    return torch.cat(losses).double()


def pair_up(gain: torch.Tensor, cost: torch.Tensor, share: float | None) -> torch.Tensor:
    """Counts (P, L) at a mean of exactly 1: the largest gains get two experts, the smallest costs none, either
    while gain > cost (share None) or for a fixed share of pairs each."""
    counts = torch.ones_like(gain, dtype=torch.long)
    up = gain.flatten().argsort(descending=True)
    down = cost.flatten().argsort()
    if share is None:
        n = int((gain.flatten()[up] > cost.flatten()[down]).sum())
    else:
        n = int(share * gain.numel())
    counts.view(-1)[up[:n]] = 2
    counts.view(-1)[down[:n]] = 0
    overlap = set(up[:n].tolist()) & set(down[:n].tolist())  # a pair chosen both ways keeps one expert
    for index in overlap:
        counts.view(-1)[index] = 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-heldout-blocks", type=int, default=256)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--groups", type=int, default=10, help="Positions changed together when measuring.")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="upcycle-oracle-"))
    write_demo_corpus(work / "data")
    tokenizer = load_checkpoint_tokenizer(DEMO_MODEL)
    heldout = load_token_blocks(work / "data" / "heldout.txt", tokenizer, BLOCK_SIZE, heldout_fraction=0.5)
    blocks = torch.cat([heldout.train, heldout.heldout])[: args.max_heldout_blocks]  # (n, S)
    if not (work / "moepp").exists():
        convert(DEMO_MODEL, work / "moepp", ConvertOptions())
    model = load_causal_lm(work / "moepp").eval()
    forced = ForcedCounts(model)
    n_layers = len(forced.routers)
    positions = blocks.numel()
    ones = torch.ones(positions, n_layers, dtype=torch.long)

    def run(counts: torch.Tensor) -> torch.Tensor:
        return position_losses(model, forced, blocks, counts)  # (n, S-1)

    top1 = run(ones)
    print(f"{blocks.shape[0]} blocks, {top1.numel()} predicted tokens, {n_layers} MoE layers")
    gain = torch.zeros(positions, n_layers, dtype=torch.float64)
    cost = torch.zeros(positions, n_layers, dtype=torch.float64)
    predicted = torch.zeros(blocks.shape, dtype=torch.bool)
    predicted[:, :-1] = True
    predicted = predicted.reshape(-1)  # (n*S,) positions whose own loss exists
    # each group of positions (a random tenth by default) is changed alone, so a position's own loss change
    # measures its own routing with the rest of the text routed as before
    groups = torch.randperm(positions, generator=torch.Generator().manual_seed(0)) % args.groups  # (n*S,)
    for layer in range(n_layers):
        for value, target in ((2, gain), (0, cost)):
            for group in range(args.groups):
                members = groups == group  # (n*S,)
                counts = ones.clone()
                counts[members, layer] = value
                full = torch.zeros(blocks.shape, dtype=torch.float64)
                full[:, :-1] = run(counts) - top1  # (n, S)
                change = full.reshape(-1)[members]
                target[members, layer] = -change if value == 2 else change
    gain[~predicted], cost[~predicted] = float("-inf"), float("inf")  # the last position: nothing to attribute

    def report(name: str, counts: torch.Tensor) -> None:
        if name.startswith("oracle"):  # what the measured gains and costs promise if they simply added up
            promised = (cost[counts == 0].sum() - gain[counts == 2].sum()) / top1.numel()
            print(f"{'  (additive promise)':<44} perplexity {math.exp(top1.mean() + promised):7.2f}")
        losses = run(counts)
        ratio, (low, high) = paired_ratio(losses.mean(dim=1), top1.mean(dim=1))
        histogram = torch.bincount(counts.flatten(), minlength=3).double() / counts.numel()
        print(f"{name:<44} perplexity {math.exp(losses.mean()):7.2f}  FFN/token {counts.double().mean():.3f}  "
              f"0/1/2 {100 * histogram[0]:4.1f}/{100 * histogram[1]:4.1f}/{100 * histogram[2]:4.1f}%  "
              f"vs top-1 {ratio:.3f} ({low:.3f}-{high:.3f})")

    print(f"{'top-1 (every pair one FFN expert)':<44} perplexity {math.exp(top1.mean()):7.2f}")
    report("source top-2 (2.0)", ones * 2)
    margins = forced.margins(model, blocks)  # (n*S, L)
    for share in (None, 0.05, 0.15, 0.30):
        oracle = pair_up(gain, cost, share)
        label = "gain > cost" if share is None else f"{100 * share:.0f}% / {100 * share:.0f}%"
        report(f"oracle, {label}", oracle)
        moved = float((oracle == 2).double().mean())
        confident = pair_up(-margins, -margins, moved)  # unsure pairs get two, the most confident none
        report("router confidence, same shares", confident)
        generator = torch.Generator().manual_seed(0)
        shuffled = oracle.flatten()[torch.randperm(oracle.numel(), generator=generator)].view_as(oracle)
        report("random pairs, same shares", shuffled)


if __name__ == "__main__":
    main()
