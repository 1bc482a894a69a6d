"""How a family's HF tensors make our parameters: a tensor map, read both ways.

A tensor map is {our parameter name: source}, the source one of
    "model.layers.0.self_attn.q_proj.weight"   the HF tensor as is
    Part(name, index, parts, dim)                 chunk `index` of `parts` equal chunks along `dim`
                                                  (Granite's stacked gate/up: input_linear [E, 2I, H])
    Stack(names)                                  the HF tensors stacked on a new first axis
                                                  (per-expert tensors -> our [E, I, H] experts)
from_hf applies it to loaded HF tensors; to_hf inverts it (Parts concatenated back in order,
Stacks unbound) to write a checkpoint or to compute the HF shapes a config expects.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Part:
    name: str
    index: int
    parts: int
    dim: int = 0


@dataclass(frozen=True)
class Stack:
    names: tuple[str, ...]


def hf_names(tmap: dict) -> set[str]:
    """Every HF tensor name a tensor map reads."""
    out = set()
    for src in tmap.values():
        out.update(src.names if isinstance(src, Stack) else [src.name if isinstance(src, Part) else src])
    return out


def from_hf(tmap: dict, get: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state_dict from HF tensors (`get(name)` -> tensor; shapes are checked by the caller)."""
    sd = {}
    for ours, src in tmap.items():
        if isinstance(src, Part):
            sd[ours] = torch.chunk(get(src.name), src.parts, dim=src.dim)[src.index].clone()
        elif isinstance(src, Stack):
            sd[ours] = torch.stack([get(n) for n in src.names])
        else:
            sd[ours] = get(src)
    return sd


def to_hf(tmap: dict, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF tensors from our state_dict: the inverse of from_hf."""
    out, parts = {}, {}
    for ours, src in tmap.items():
        t = sd[ours].detach()
        if isinstance(src, Part):
            parts.setdefault(src.name, [None] * src.parts)[src.index] = (t, src.dim)
        elif isinstance(src, Stack):
            out.update(zip(src.names, t.unbind(0)))
        else:
            out[src] = t
    for name, chunks in parts.items():
        if any(c is None for c in chunks):
            raise ValueError(f"tensor map: HF tensor '{name}' is missing some of its {len(chunks)} parts")
        out[name] = torch.cat([c for c, _ in chunks], dim=chunks[0][1])
    return {k: v.contiguous() for k, v in out.items()}
