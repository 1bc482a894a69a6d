"""Expert residency under a memory budget (`compiler.build --memory-budget-mb N`): how many experts fit.

    plan = plan_residency(config, budget_mb, stats=None)   # ResidencyPlan, or BudgetError before any build

The budget is the model's memory at run time, not only its weights: every non-expert weight stays
resident (params.safetensors), the runtime reserve below is set aside, and what is left holds S
expert slots, one cache for all MoE layers (passes/use_expert_slots.py):
    S = min(L * E, (budget - non-expert bytes - runtime reserve) // one expert's bytes)
Runtime reserve (runtime_bytes), for a context of `--budget-context` tokens (default: the model's
max_seq_len; the runtime refuses to go past it): the KV cache at that capacity, once (a budgeted
artifact's runtime allocates it at once, so it never grows past the plan, and both its prefill and
its decode write it in place: compiler/importer.py inplace_prefill), the activations of one prefill
chunk of PREFILL_CHUNK tokens (the runtime prefills longer prompts in such chunks; the in-place
attention keeps its scores on the stack, so they do not grow with the context) and
RUNTIME_CODE_BYTES for the code the run maps (lib.so, the TVM runtime's pages, thread stacks). A budget whose S is below top_k (one layer's chosen
experts) cannot run a token and is refused, naming the sizes. Sizes are those of the INT4 artifact
(mobilemoe.quant's layout: a [N, K] weight is N * K / 2 bytes of codes + N * K / 16 of fp16 scales;
routers and norms stay float32), computed from the config before anything is built.

Resident set: with routing statistics (compiler/routing.py), the most used (layer, expert) pairs
are pinned in the first slots (loaded when the runtime opens the artifact); the other slots are an
LRU cache. Measured on the bundled model (`python -m bench.residency --policies`: 12k tokens of
Python's stdtypes docs replayed, statistics from 24k tokens of its asyncio and os docs), hit rates
at 25% / 50% / 75% of the experts: LRU 39.9 / 68.5 / 88.8%, pinning a quarter of the slots
38.1 / 68.3 / 88.9%, LFU 39.5 / 68.4 / 89.0%. Load balancing flattens global routing, so the
locality between neighbouring tokens is what pays and LRU is the policy; pinning (PIN_SHARE of the
slots) is kept only where it costs nothing measurable, when at least half the experts fit.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mobilemoe.checkpoint import shape_only_model
from mobilemoe.kv_cache import capacity_for

PAGE = 4096  # the expert file's record alignment (bytes)
MB = 1 << 20
PREFILL_CHUNK = 128  # tokens per prefill call of a budgeted artifact's runtime (bounds its activations)
# measured on this x86 host (2026-12-07): the resident set a run adds beyond its tensors is 3.5-4.2 MB
# (lib.so 1.4 MB, the TVM runtime's and numpy's pages first touched by the run, thread stacks) for the
# bundled model in a warm checkout, but up to ~6.8 MB for the test model's first run in a fresh clone
# (make test): 8 MB
RUNTIME_CODE_BYTES = 8 * MB
PIN_SHARE = 0.25  # of the slots, pinned from routing statistics when at least half the experts fit


class BudgetError(ValueError):
    """A memory budget that cannot hold the non-expert weights and one layer's top-k experts."""


def _int4_bytes(n: int, k: int) -> int:
    return n * k // 2 + n * (k // 32) * 2


def weight_bytes(config) -> tuple[int, int, int]:
    """(non-expert weight bytes, one routed expert's bytes, MoE layers) of the INT4 artifact."""
    model = shape_only_model(config)
    rest, per_layer = 0, {}
    for name, p in model.named_parameters():  # a tied table once
        shape = tuple(p.shape)
        if len(shape) == 3:  # stacked routed experts [E, N, K]: w1, w3, w2 (per expert, summed per layer)
            layer = name.rsplit(".", 1)[0]
            per_layer[layer] = per_layer.get(layer, 0) + _int4_bytes(shape[1], shape[2])
        elif len(shape) == 2 and shape[1] % 32 == 0 and not name.endswith("router.weight"):
            rest += _int4_bytes(*shape)
        else:
            rest += 4 * int(np.prod(shape))
    return rest, max(per_layer.values(), default=0), len(per_layer)


@dataclass(frozen=True)
class ResidencyPlan:
    budget_bytes: int
    nonexpert_bytes: int
    expert_bytes: int  # one routed expert (gate/up + down, codes + scales)
    num_layers: int  # MoE layers
    num_experts: int
    top_k: int
    slots: int
    pinned: list[tuple[int, int]] = field(default_factory=list)  # (layer, expert) in slots 0..len-1
    runtime_bytes: int = 0  # the reserve: KV cache at kv_capacity, activations, code
    kv_capacity: int = 0  # the runtime's KV cache capacity (tokens), allocated at once
    prefill_chunk: int = PREFILL_CHUNK  # the runtime's longest prefill call (tokens)

    def manifest(self) -> dict:
        return {"budget_bytes": self.budget_bytes, "nonexpert_bytes": self.nonexpert_bytes,
                "expert_bytes": self.expert_bytes, "slots": self.slots, "top_k": self.top_k, "policy": "lru",
                "pinned": [list(p) for p in self.pinned], "runtime_bytes": self.runtime_bytes,
                "kv_capacity": self.kv_capacity, "prefill_chunk": self.prefill_chunk}


def kv_bytes(config, context: int | None = None) -> int:
    """The float32 KV cache at `context` tokens (default: the full context) as the runtime allocates it
    (mobilemoe/kv_cache.py's capacity), all layers."""
    ctx = capacity_for(context or config.max_seq_len)
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * ctx * 4


def activation_bytes(config, tokens: int = PREFILL_CHUNK) -> int:
    """An upper estimate of one step's live float32 intermediates for `tokens` tokens written into the
    in-place cache: the residual stream and its norm, q/k/v and the attention output (the in-place
    attention's scores live on the stack, per KV head and token), the MoE's router logits and its
    top-k experts' gate/up/activation (and the shared expert's), the last position's logits."""
    c = config
    per_token = (4 * c.hidden_size + (2 * c.num_heads + 2 * c.num_kv_heads) * c.head_dim + c.num_experts
                 + 3 * max(c.top_k * c.expert_hidden, c.ffn_hidden) + 3 * c.shared_expert_hidden)
    return 4 * (tokens * per_token + c.vocab_size)


def runtime_bytes(config, context: int | None = None) -> int:
    """The runtime reserve of a budget planned for `context` tokens: the KV cache (written in place by
    prefill and decode), one prompt chunk's activations, code (the module docstring)."""
    return kv_bytes(config, context) + activation_bytes(config, PREFILL_CHUNK) + RUNTIME_CODE_BYTES


def budget_mb_for(config, experts: int, context: int | None = None) -> float:
    """The budget (MB) holding the non-expert weights, the runtime reserve at `context` and `experts`
    experts (tests, bench/residency.py)."""
    rest, one, _ = weight_bytes(config)
    return (rest + runtime_bytes(config, context) + experts * one) / MB


def pinned_experts(stats: dict, slots: int, num_layers: int, num_experts: int, top_k: int) -> list[tuple[int, int]]:
    """The (layer, expert) pairs to pin: the most used, PIN_SHARE of the slots (leaving top_k to the
    LRU part), when at least half of all experts fit; none otherwise or without statistics."""
    if not stats or 2 * slots < num_layers * num_experts or slots >= num_layers * num_experts:
        return []
    counts = np.asarray([layer["counts"] for layer in stats["layers"]], dtype=np.int64)
    if counts.shape != (num_layers, num_experts):
        raise BudgetError(f"routing statistics: {list(counts.shape)} (layers, experts), the model has "
                          f"{[num_layers, num_experts]}")
    n = min(int(PIN_SHARE * slots), slots - top_k)
    order = np.argsort(-counts, axis=None, kind="stable")[:n]
    return [(int(i) // num_experts, int(i) % num_experts) for i in order]


def plan_residency(config, budget_mb: float, stats: dict | None = None, context: int | None = None) -> ResidencyPlan:
    """The slots and pinned set of a budget (MB = 2**20 bytes) for runs of up to `context` tokens
    (default: max_seq_len); BudgetError when it cannot run."""
    if not config.is_moe:
        raise BudgetError(f"--memory-budget-mb: model '{config.name}' has no routed experts to leave out of memory")
    if context is not None and not 0 < context <= config.max_seq_len:
        raise BudgetError(f"--budget-context {context}: expected 1 to the model's max_seq_len ({config.max_seq_len})")
    context = context or config.max_seq_len
    rest, one, layers = weight_bytes(config)
    reserve = runtime_bytes(config, context)
    budget = int(budget_mb * MB)
    E, k = config.num_experts, config.top_k
    slots = min(layers * E, max(0, budget - rest - reserve) // one)
    if slots < k:
        raise BudgetError(f"--memory-budget-mb {budget_mb:g}: the non-expert weights take {rest / MB:.2f} MB, the "
                          f"runtime (KV cache at {context} tokens, activations, code) {reserve / MB:.2f} MB "
                          f"and one layer's top-{k} experts {k * one / MB:.2f} MB; a budget of at least "
                          f"{(rest + reserve + k * one) / MB:.2f} MB is needed")
    return ResidencyPlan(budget, rest, one, layers, E, k, int(slots), pinned_experts(stats, slots, layers, E, k),
                         reserve, capacity_for(context), PREFILL_CHUNK)
