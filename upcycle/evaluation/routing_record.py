"""What routing a model did on the tokens it was fed, read from its own routers while it runs.

`record_routing(model)` hooks every router of a model (an MoE++ checkpoint's `MoePPRouter`s, or a source
checkpoint's own routers: transformers' `*TopKRouter` modules, OpenMoE's sparse blocks) and counts, for every
forward inside the context, the experts each router selected: the selection the model computed with, whatever
called it (our evaluation, lm-evaluation-harness, generation). Positions that the call's attention mask marks as
padding are left out. One definition of routing serves every reader: `upcycle eval --tasks` per task, `upcycle
analyze` per token, FFN experts by kind of token.

Counted per MoE layer: FFN experts each token used (0..k), and for an MoE++ model the slots that went to Zero,
Copy and Constant experts. A source uses k FFN experts for every token (OpenMoE's capacity drops are not counted:
the router's selection is). Under a routing rule (a trained control) a dropped slot is no expert: it counts as
neither FFN nor zero-computation, as `upcycle eval` reports it.
"""

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

ZERO_COMPUTATION_TYPES = ("zero", "copy", "constant")
ROUTER_CLASS_SUFFIXES = ("TopKRouter", "TopkRouter")  # transformers' MoE families: forward -> (logits, w, index)
OPENMOE_SOURCE_BLOCK = "OpenMoeSparseBlock"  # forward -> (output, logits): the router is inside the block
LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass
class _Router:
    """One MoE layer's router: where it sits and how to read its selection."""

    module: torch.nn.Module
    layer: int  # decoder-layer index
    n_ffn: int
    top_k: int
    type_bounds: tuple[int, int, int, int] | None  # MoE++: (zero start, copy start, constant start, end)
    index_of: object  # forward output -> (T, k) selected experts


@dataclass
class RoutingRecord:
    """Routing counted over every forward in a `record_routing` context (see the module docstring)."""

    layers: list[int]  # decoder-layer index of each MoE layer
    top_k: int
    keep_tokens: bool = False
    tokens: int = 0  # counted (non-padding) token positions
    used_counts: torch.Tensor | None = None  # (L, k+1) token positions that used 0..k FFN experts
    type_counts: torch.Tensor | None = None  # (L, 3) slots that went to zero, copy, constant experts
    _token_ids: list[torch.Tensor] = field(default_factory=list, repr=False)  # (T,) per forward
    _ffn_used: list[torch.Tensor] = field(default_factory=list, repr=False)  # (T, L) per forward
    _slot_types: list[torch.Tensor] = field(default_factory=list, repr=False)  # (T, L, 3) per forward

    @property
    def token_ids(self) -> torch.Tensor:
        """(T,) every counted token, in the order the model was fed them (keep_tokens only)."""
        return torch.cat(self._token_ids) if self._token_ids else torch.zeros(0, dtype=torch.long)

    @property
    def ffn_used(self) -> torch.Tensor:
        """(T, L) FFN experts each counted token used in each MoE layer (keep_tokens only)."""
        return torch.cat(self._ffn_used) if self._ffn_used else torch.zeros(0, len(self.layers), dtype=torch.long)

    @property
    def slot_types(self) -> torch.Tensor:
        """(T, L, 3) slots each counted token sent to zero, copy and constant experts (keep_tokens only)."""
        return (torch.cat(self._slot_types) if self._slot_types
                else torch.zeros(0, len(self.layers), 3, dtype=torch.long))

    def add(self, token_ids: torch.Tensor, ffn_used: torch.Tensor, slot_types: torch.Tensor) -> None:
        """One forward's counted tokens: token_ids (T,), ffn_used (T, L), slot_types (T, L, 3)."""
        used = torch.stack([torch.bincount(column, minlength=self.top_k + 1) for column in ffn_used.T])  # (L, k+1)
        types = slot_types.sum(dim=0)  # (L, 3)
        self.used_counts = used if self.used_counts is None else self.used_counts + used
        self.type_counts = types if self.type_counts is None else self.type_counts + types
        self.tokens += len(token_ids)
        if self.keep_tokens:
            self._token_ids.append(token_ids)
            self._ffn_used.append(ffn_used)
            self._slot_types.append(slot_types)

    def summary(self) -> dict:
        """FFN experts per token (overall and per layer), the zero-computation shares of the k slots, and the
        share of (token, layer) pairs that used 0..k FFN experts; every number None before any token."""
        if not self.tokens:
            return {"tokens": 0, "layers": self.layers, "ffn_experts_per_token": None,
                    "ffn_experts_per_token_per_layer": None, "zero_computation_share": None,
                    "ffn_experts_histogram": None}
        used = self.used_counts.double()  # (L, k+1)
        count = torch.arange(self.top_k + 1, dtype=torch.float64)  # (k+1,)
        per_layer = ((used * count).sum(dim=1) / self.tokens).tolist()  # (L,)
        type_share = self.type_counts.double().sum(dim=0) / (self.tokens * len(self.layers) * self.top_k)  # (3,)
        histogram = used.sum(dim=0) / used.sum()  # (k+1,)
        return {
            "tokens": self.tokens,
            "layers": self.layers,
            "ffn_experts_per_token": sum(per_layer) / len(per_layer),
            "ffn_experts_per_token_per_layer": per_layer,
            "zero_computation_share": dict(zip(ZERO_COMPUTATION_TYPES, type_share.tolist())),
            "ffn_experts_histogram": {str(used): share for used, share in enumerate(histogram.tolist())},
        }


def _layer_of(name: str, position: int) -> int:
    match = LAYER_INDEX.search(name)
    return int(match.group(1)) if match else position


def find_routers(model) -> list[_Router]:
    """The model's routers in layer order: MoE++ routers, else a source family's own (empty: not an MoE)."""
    names = {id(module): name for name, module in model.named_modules()}
    if hasattr(model, "moe_blocks"):
        routers = []
        for position, block in enumerate(model.moe_blocks()):
            router, layout = block.gate, block.gate.layout
            bounds = None if router.routing_rule is not None else (
                layout.n_ffn, layout.copy_start, layout.constant_start, layout.n_total)
            routers.append(_Router(router, _layer_of(names[id(block)], position), layout.n_ffn, router.top_k,
                                   bounds, lambda output: output[2]))
        return routers
    routers = []
    for name, module in model.named_modules():
        kind = type(module).__name__
        if kind.endswith(ROUTER_CLASS_SUFFIXES):
            n_ffn = getattr(module, "num_experts", None) or getattr(module, "n_routed_experts", None) or \
                module.weight.shape[0]
            routers.append(_Router(module, _layer_of(name, len(routers)), n_ffn, module.top_k, None,
                                   lambda output: output[2]))
        elif kind == OPENMOE_SOURCE_BLOCK:
            top_k = module.top_k
            routers.append(_Router(module, _layer_of(name, len(routers)), module.gate_weight.shape[0], top_k, None,
                                   lambda output, top_k=top_k: output[1].topk(top_k, dim=-1).indices))
    return routers


@contextlib.contextmanager
def record_routing(model, keep_tokens: bool = False) -> Iterator[RoutingRecord]:
    """Within the context, count the routing of every forward of `model` (see the module docstring); with
    `keep_tokens`, keep each counted token's id and per-layer counts for per-token analyses."""
    routers = find_routers(model)
    if not routers:
        raise ValueError("the model has no MoE routers to record")  # a caller's bug, not a user's input
    record = RoutingRecord(layers=[router.layer for router in routers], top_k=routers[0].top_k,
                           keep_tokens=keep_tokens)
    pending: dict = {}  # the forward in flight: its valid positions and each layer's selection

    def before_forward(module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)  # (B, S) or None (inputs_embeds)
        mask = kwargs.get("attention_mask")
        shape = input_ids.shape if input_ids is not None else kwargs["inputs_embeds"].shape[:2]
        valid = torch.ones(shape, dtype=torch.bool)  # (B, S)
        if mask is not None and mask.dim() == 2:  # (B, past + S) 0/1: this call's positions are the last S
            valid = mask[:, -shape[1]:].bool().cpu()
        pending.clear()
        pending["valid"] = valid.reshape(-1)  # (T,)
        pending["tokens"] = (input_ids.reshape(-1).cpu() if input_ids is not None
                             else torch.full((valid.numel(),), -1, dtype=torch.long))  # (T,)
        pending["layers"] = {}

    def after_router(router: _Router):
        def hook(module, inputs, output):
            index = router.index_of(output).detach().cpu()  # (T, k)
            ffn_used = (index < router.n_ffn).sum(dim=-1)  # (T,)
            types = torch.zeros(index.shape[0], 3, dtype=torch.long)  # (T, 3)
            if router.type_bounds is not None:
                for position, (start, end) in enumerate(zip(router.type_bounds[:-1], router.type_bounds[1:])):
                    types[:, position] = ((index >= start) & (index < end)).sum(dim=-1)
            pending.setdefault("layers", {})[id(router.module)] = (ffn_used, types)
        return hook

    def after_forward(module, args, output):
        layers = pending.get("layers", {})
        if len(layers) != len(routers) or "valid" not in pending:
            return  # a forward that did not reach every router (or an inner call): nothing consistent to count
        valid = pending["valid"]
        ffn_used = torch.stack([layers[id(router.module)][0] for router in routers], dim=1)[valid]  # (T, L)
        types = torch.stack([layers[id(router.module)][1] for router in routers], dim=1)[valid]  # (T, L, 3)
        record.add(pending["tokens"][valid], ffn_used, types)
        pending.clear()

    handles = [model.register_forward_pre_hook(before_forward, with_kwargs=True),
               model.register_forward_hook(after_forward)]
    handles += [router.module.register_forward_hook(after_router(router)) for router in routers]
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()
