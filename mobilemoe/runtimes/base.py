"""What every runtime shares: opening a verified artifact, the token checks, the KV cache holder,
and generation on top of prefill(ids, kv) / decode(token, kv).

A runtime subclasses Runtime, names the manifest `backend` it runs (and `where`: "local" or "rpc"),
and implements prefill/decode; mobilemoe/runtimes/__init__.py registers it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..artifact import verify
from ..config import MobileMoEConfig
from ..generate import GenerationStats, generate_with
from ..tokenizer import load_tokenizer


def check_ids(config: MobileMoEConfig, ids: list[int], past: int) -> None:
    bad = [i for i in ids if not 0 <= i < config.vocab_size]
    if bad:  # the compiled embedding lookup does not bounds-check (it would read out of bounds)
        raise ValueError(f"token ids {bad[:5]} are outside the model's vocabulary [0, {config.vocab_size})")
    if past + len(ids) > config.max_seq_len:
        raise ValueError(f"sequence of {past + len(ids)} tokens exceeds max_seq_len {config.max_seq_len}")


class Runtime:
    """One artifact opened for running: .dir, .manifest (verified), .config; prefill/decode/generate."""

    backend: str  # the manifest's "backend" this runtime runs
    where = "local"  # "local": this machine; "rpc": a TVM RPC session (load_artifact(session=...))

    @classmethod
    def load(cls, artifact_dir, num_threads: int | None = None, kv_capacity: int | None = None, session=None):
        """What load_artifact calls; runtimes that take more options override it."""
        return cls(artifact_dir, num_threads)

    def _open_manifest(self, artifact_dir) -> None:
        """Verify every hash and the backend before anything is parsed; read the config."""
        self.dir = Path(artifact_dir)
        self.manifest = verify(self.dir, self.backend)
        self.config = MobileMoEConfig.from_dict(self.manifest["config"], source=f"{self.dir}/manifest.json:config")

    def prefill(self, ids: list[int], kv=None):
        """Run `ids` (after `kv`, if given); -> (last-position logits [V], kv)."""
        raise NotImplementedError

    def decode(self, token: int, kv):
        return self.prefill([token], kv)

    def step(self, ids: list[int], kv):
        return self.prefill(ids, kv)

    def generate(self, prompt: list[int], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 eos_id=None, seed: int | None = None, on_token=None) -> tuple[list[int], GenerationStats]:
        return generate_with(self.step, prompt, max_new_tokens, self.config.max_seq_len, temperature, top_p,
                             eos_id, seed, on_token)

    def tokenizer(self):
        return load_tokenizer(self.dir / "tokenizer.json")


def kv_shape(config: MobileMoEConfig, length: int) -> tuple:
    return (config.num_layers, 2, 1, config.num_kv_heads, length, config.head_dim)


@dataclass
class LayerKV:
    """A runtime's KV cache: the K and V of each layer, [1, nkv, P, D] each (K [1, nkv, D, P] when
    keys_t), in the order k_0, v_0, k_1, v_1, ... (TVM tensors, or OrtValues present.{i}.key / .value)."""
    values: list
    length: int  # P
    shape: tuple  # (L, 2, 1, nkv, P, D): the stacked layout's shape (mobilemoe/model.py)
    keys_t: bool = False
    capacity: int | None = None  # the in-place cache: the buffers hold C slots, the first P valid

    def numpy(self) -> np.ndarray:
        """The stacked layout [L, 2, 1, nkv, P, D] (a copy; for checks, not the hot path)."""
        if not self.length:
            return np.zeros(self.shape, np.float32)
        arrays = [v.numpy() for v in self.values]
        if self.capacity is not None:
            arrays = [a[..., :self.length] if i % 2 == 0 else a[:, :, :self.length] for i, a in enumerate(arrays)]
        if self.keys_t:
            arrays[0::2] = [k.swapaxes(-1, -2) for k in arrays[0::2]]
        return np.stack(arrays).reshape(self.shape)
