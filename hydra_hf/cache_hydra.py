"""`HydraCache`: the generation cache of HYDRA, a subclass of transformers' `Cache`.

One `HydraCacheLayer` per effective layer (one slot per (block, recursion) pair, so a
weight-shared block keeps one slot per pass). Each slot holds:

- latent post-RoPE keys and values, (B, Hk, S, h) each: Hk * h * 2 numbers per token, 1/C of
  a Llama layer of the same width and KV heads;
- for every cached column its position (B, S) and a validity flag (B, S): a routed layer only
  appends the tokens it processed, and a column some rows skipped is masked for those rows;
- the step (index in the input stream) at which each column was written, (S,), for `crop`;
- the rolling state of the causal q/k convolutions: the last Ks + Kc - 2 pre-conv latent q and
  k columns of the tokens this layer processed, (B, P, Hq*h) and (B, P, Hk*h);
- the value-shift state: the previous processed token's value projection for the shifted
  KV heads, (B, Hs*h) (Wv is linear, so this is the same as keeping the previous hidden state).

`get_seq_length()` is the number of input positions seen (the same for every layer, whatever
routing skipped), which is what `generate()` needs to slice new input ids.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache


class HydraCacheLayer:
    """Cache slot of one effective layer. All tensors are created on the first `update`."""

    is_sliding = False
    is_compileable = False
    supports_early_init = False

    def __init__(self):
        self.keys: torch.Tensor | None = None  # (B, Hk, S, h)
        self.values: torch.Tensor | None = None  # (B, Hk, S, h)
        self.key_positions: torch.Tensor | None = None  # (B, S) int64
        self.key_valid: torch.Tensor | None = None  # (B, S) bool
        self.key_steps: torch.Tensor | None = None  # (S,) int64
        self.conv_q: torch.Tensor | None = None  # (B, P, Hq*h)
        self.conv_k: torch.Tensor | None = None  # (B, P, Hk*h)
        self.value_prev: torch.Tensor | None = None  # (B, Hs*h)
        self.record_past = False
        self._history: list[tuple[int, tuple]] = []

    @property
    def is_initialized(self) -> bool:
        return self.conv_q is not None or self.keys is not None

    @property
    def is_croppable(self) -> bool:
        return self.record_past

    def __repr__(self):
        return f"HydraCacheLayer(columns={0 if self.keys is None else self.keys.shape[2]})"

    # ------------------------------------------------------------------ key/value columns
    def update(
        self,
        key_states: torch.Tensor,  # (B, Hk, K, h)
        value_states: torch.Tensor,  # (B, Hk, K, h)
        positions: torch.Tensor,  # (B, K)
        valid: torch.Tensor,  # (B, K) bool
        step: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Append K new columns and return all keys, values, positions and validity."""
        K = key_states.shape[2]
        steps = torch.full((K,), step, dtype=torch.long, device=key_states.device)
        if self.keys is None:
            self.keys, self.values = key_states, value_states
            self.key_positions, self.key_valid, self.key_steps = positions, valid, steps
        else:
            self.keys = torch.cat([self.keys, key_states], dim=2)
            self.values = torch.cat([self.values, value_states], dim=2)
            self.key_positions = torch.cat([self.key_positions, positions], dim=1)
            self.key_valid = torch.cat([self.key_valid, valid], dim=1)
            self.key_steps = torch.cat([self.key_steps, steps], dim=0)
        return self.keys, self.values, self.key_positions, self.key_valid

    def past(self):
        """The cached keys, values, positions and validity (all None when empty)."""
        return self.keys, self.values, self.key_positions, self.key_valid

    def num_columns(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    # ------------------------------------------------------------------ rolling states
    def set_rolling_state(self, conv_q, conv_k, value_prev, seen_before: int):
        if self.record_past:
            self._history.append((seen_before, (self.conv_q, self.conv_k, self.value_prev)))
        self.conv_q, self.conv_k, self.value_prev = conv_q, conv_k, value_prev

    # ------------------------------------------------------------------ batch edits
    def _map_batch(self, fn):
        for name in ("keys", "values", "key_positions", "key_valid", "conv_q", "conv_k", "value_prev"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, fn(value))
        self._history = [
            (seen, tuple(None if t is None else fn(t) for t in states)) for seen, states in self._history
        ]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices.to(t.device)])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, max_length: int) -> None:
        """Keep only what the first `max_length` input positions wrote."""
        if self.keys is not None:
            keep = self.key_steps < max_length
            if not bool(keep.all()):
                self.keys, self.values = self.keys[:, :, keep], self.values[:, :, keep]
                self.key_positions, self.key_valid = self.key_positions[:, keep], self.key_valid[:, keep]
                self.key_steps = self.key_steps[keep]
        # Restore the rolling conv / value-shift state written before position `max_length`.
        while self._history and self._history[-1][0] >= max_length:
            _, (self.conv_q, self.conv_k, self.value_prev) = self._history.pop()

    def reset(self) -> None:
        self.__init__()


class HydraCache(Cache):
    """Cache of a `HydraForCausalLM`: one `HydraCacheLayer` per effective layer.

    Supports `reorder_cache` / `batch_select_indices` / `batch_repeat_interleave` (beam search and
    contrastive search), `crop` (after `activate_past_recording()`, which `generate` calls for
    assisted decoding) and left-padded batches (padding is never written as a valid column).
    """

    def __init__(self, config=None, num_layers: int | None = None):
        if num_layers is None:
            if config is None:
                raise ValueError("HydraCache needs a HydraConfig or num_layers")
            num_layers = config.num_hidden_layers
        super().__init__(layers=[HydraCacheLayer() for _ in range(num_layers)])
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Input positions seen so far (identical for every layer, whatever routing skipped)."""
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def has_previous_state(self, layer_idx: int | None = None, state_idx: int | None = None) -> bool:
        return self.seen_tokens > 0

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return self.seen_tokens > 0

    @property
    def is_croppable(self) -> bool:
        return all(layer.record_past for layer in self.layers)

    @property
    def batch_size(self) -> int:
        for layer in self.layers:
            for t in (layer.keys, layer.conv_q):
                if t is not None:
                    return t.shape[0]
        return -1

    def activate_past_recording(self):
        for layer in self.layers:
            layer.record_past = True

    def crop(self, max_length: int) -> None:
        """Drop everything written by input positions >= `max_length` (negative: drop that many)."""
        if max_length < 0:
            max_length = self.seen_tokens + max_length
        if max_length >= self.seen_tokens:
            return
        if not self.is_croppable and any(layer.conv_q is not None for layer in self.layers):
            raise ValueError(
                "HydraCache.crop needs the rolling conv / value-shift states of earlier steps: call "
                "cache.activate_past_recording() before the forward passes you may want to undo"
            )
        for layer in self.layers:
            layer.crop(max_length)
        self.seen_tokens = max_length

    def reset(self):
        super().reset()
        self.seen_tokens = 0

    def kv_bytes(self) -> int:
        """Bytes held by latent keys and values (the part that grows with the sequence)."""
        total = 0
        for layer in self.layers:
            if layer.keys is not None:
                total += layer.keys.numel() * layer.keys.element_size()
                total += layer.values.numel() * layer.values.element_size()
        return total


__all__ = ["HydraCache", "HydraCacheLayer"]
