"""`HydraCache`: the generation cache of HYDRA, a transformers `Cache` of `HydraCacheLayer`s.

One layer per effective layer (one slot per (block, recursion) pair, so a weight-shared block keeps
one slot per pass). A layer holds:

- latent post-RoPE keys and values, (B, Hk, S, h) each: Hk * h * 2 numbers per token, 1/C of a
  Llama layer of the same width and KV heads;
- per cached column: a validity flag (B, S) bool and the input step that wrote it (B, S) int32.
  A routed layer only appends the tokens it processed, so rows differ; a column some rows skipped
  is invalid for those rows. Steps give causality (a query sees columns of earlier or equal steps)
  and let `crop` remove exactly what the last n input steps wrote;
- the rolling state, kept the way transformers' linear-attention layers keep their conv state: the
  last P = Ks + Kc - 2 pre-conv latent q and k columns and the last value-shift source column of the
  tokens this layer processed, right-aligned in one (B, W, Cq + Ck + Cs) buffer with the step of each
  column (zeros and step -1 where a row has no history yet: the same as a sequence start). W is the
  working width max(P, 1); after `activate_past_recording()` the buffer keeps every column until the
  next `crop`, which puts back the state as it was after any earlier step and trims it to W again.

`get_seq_length()` is the number of input positions seen (the same for every layer, whatever routing
skipped): what `generate()` needs to slice new input ids.

`crop(tokens_to_remove)` follows transformers 5.x: a negative value removes that many of the latest input
steps, 0 removes nothing and only trims the recorded rolling states, a positive value is an error.

`HydraCache(config, max_cache_len=N)` is the static variant (`cache_implementation="static"`): buffers are
preallocated with one column per input step (column i = step i) and written in place, so a decode step has
fixed shapes and runs under `torch.compile`.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, StaticCache


def _right_aligned_append(
    buffer: torch.Tensor,  # (B, W, C) right-aligned, zeros where empty
    buffer_steps: torch.Tensor,  # (B, W) int64, -1 where empty
    new: torch.Tensor,  # (B, K, C) new columns, valid ones first
    new_steps: torch.Tensor,  # (B, K)
    counts: torch.Tensor | None,  # (B,) valid new columns per row; None = all K
    keep: int,  # width of the result
) -> tuple[torch.Tensor, torch.Tensor]:
    """Append each row's valid new columns after its old ones and keep the last `keep` columns, right-aligned."""
    B, K, C = new.shape
    full = torch.cat([buffer.to(new.dtype), new], dim=1)  # (B, W + K, C)
    full_steps = torch.cat([buffer_steps, new_steps.to(buffer_steps.dtype)], dim=1)
    if counts is None:
        return full[:, -keep:], full_steps[:, -keep:]
    # Row b's last column is at W + counts[b] - 1; gather the `keep` columns ending there (pad on the left).
    W = buffer.shape[1]
    pad = max(0, keep - W)
    full = torch.cat([full.new_zeros(B, pad, C), full], dim=1)
    full_steps = torch.cat([full_steps.new_full((B, pad), -1), full_steps], dim=1)
    idx = counts.view(B, 1) + (W + pad - keep) + torch.arange(keep, device=new.device).view(1, keep)  # (B, keep)
    return (
        torch.gather(full, 1, idx.unsqueeze(-1).expand(-1, -1, C)),
        torch.gather(full_steps, 1, idx),
    )


class HydraCacheLayer(CacheLayerMixin):
    """Cache of one effective layer: latent keys/values with per-column validity and step, and the rolling state."""

    is_sliding = False
    supports_early_init = False
    GROWTH = 256  # spare columns a dynamic layer allocates when it grows (appends are in place, not torch.cat)
    COLUMN_DIM = {"keys": 2, "values": 2, "key_valid": 1, "key_steps": 1}

    def __init__(self, rolling_width: int = 1, max_cache_len: int | None = None, step_counter: torch.Tensor | None = None):
        super().__init__()
        self.step_counter = step_counter  # static layout: the cache's shared (0-dim) step count, updated in place
        self.rolling_width = rolling_width  # W: columns of conv / value-shift history the next forward needs
        self.max_cache_len = max_cache_len  # static layout (one column per step) when set
        self.keys: torch.Tensor | None = None  # (B, Hk, S, h)
        self.values: torch.Tensor | None = None  # (B, Hk, S, h)
        self.key_valid: torch.Tensor | None = None  # (B, S) bool
        self.key_steps: torch.Tensor | None = None  # (B, S) int32
        self.all_valid = True  # no invalid column stored (lets decode skip the mask)
        self.rolling: torch.Tensor | None = None  # (B, W', Cq + Ck + Cs)
        self.rolling_steps: torch.Tensor | None = None  # (B, W') int64
        self._seen = 0  # input steps seen (dynamic layout)
        self.record_past = False
        self.record_start = 0  # first step that `crop` can go back to
        self._buffers: dict[str, torch.Tensor] = {}  # dynamic layout: storage behind keys / values / key_valid / key_steps

    @property
    def is_compileable(self) -> bool:
        return self.max_cache_len is not None

    @property
    def seen(self) -> int:
        """Input steps seen. (The static layout keeps it in a tensor, so a compiled decode step never reads it.)"""
        return int(self.step_counter) if self.step_counter is not None else self._seen

    @seen.setter
    def seen(self, value: int) -> None:
        if self.step_counter is not None:
            self.step_counter.fill_(value)
        else:
            self._seen = value

    @property
    def is_croppable(self) -> bool:
        return self.record_past or self.rolling is None

    def __repr__(self):
        return f"HydraCacheLayer(columns={self.num_columns()}, seen={self.seen})"

    # ------------------------------------------------------------------ transformers' layer contract
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, Hk, _, h = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        if self.max_cache_len is None:
            return
        S = self.max_cache_len
        self.keys = key_states.new_zeros(B, Hk, S, h)
        self.values = value_states.new_zeros(B, Hk, S, h)
        self.key_valid = torch.zeros(B, S, dtype=torch.bool, device=key_states.device)
        self.key_steps = torch.arange(S, dtype=torch.int32, device=key_states.device).expand(B, S)
        self.all_valid = False

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.max_cache_len is not None:
            return self.max_cache_len, 0
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1 if self.max_cache_len is None else self.max_cache_len

    def num_columns(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    # ------------------------------------------------------------------ key/value columns
    def update(
        self,
        key_states: torch.Tensor,  # (B, Hk, K, h)
        value_states: torch.Tensor,  # (B, Hk, K, h)
        steps: torch.Tensor,  # (B, K) input step of each new column
        valid: torch.Tensor | None = None,  # (B, K) bool; None = all valid
        first_step: int | None = None,  # steps are first_step + arange(K) in every row (a dense layer)
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Store K new columns; return all keys, values, their validity (None = all valid) and steps.

        While every column j was written at step j (a dense layer), the steps are not stored (returned as None:
        column index = step), which keeps the decode step to two concatenations, as in transformers' layers.
        """
        if self.keys is None:
            self.lazy_initialization(key_states, value_states)
        if self.max_cache_len is not None:
            # Static layout: column = step, written in place (fixed shapes for torch.compile).
            B, Hk, K, h = key_states.shape
            if valid is None:
                valid = torch.ones(B, K, dtype=torch.bool, device=key_states.device)
            col = steps.long().clamp(max=self.max_cache_len - 1)
            idx = col.view(B, 1, K, 1).expand(B, Hk, K, h)
            self.keys.scatter_(2, idx, key_states.to(self.keys.dtype))
            self.values.scatter_(2, idx, value_states.to(self.values.dtype))
            self.key_valid.scatter_(1, col, valid)
            return self.keys, self.values, self.key_valid, self.key_steps
        if valid is not None and self.all_valid:
            if bool(valid.all()):
                valid = None
            else:
                self.all_valid = False
        implicit = first_step is not None and first_step == self.num_columns() and (
            self.keys is None or self.key_steps is None
        )
        if not implicit:
            self._materialize_steps()
        first = self.keys is None
        if self.key_valid is None and valid is not None and not first:
            self.key_valid = self._ones(self.keys.shape[0], self.keys.shape[2])  # the columns so far were all valid
        self._append("keys", key_states)
        self._append("values", value_states)
        if not implicit:
            self._append("key_steps", steps.to(torch.int32))
        if self.key_valid is not None or valid is not None:
            self._append("key_valid", valid if valid is not None else self._ones(*steps.shape))
        return self.keys, self.values, (None if self.all_valid else self.key_valid), self.key_steps

    def _append(self, name: str, new: torch.Tensor) -> None:
        """Append columns to `self.<name>` in place, in a buffer with room for `GROWTH` more columns.

        A decode step then writes one column instead of copying the whole cache (`torch.cat`), so its cost does
        not grow with the context. The attribute stays a view of the first S columns; when it was replaced by
        another tensor (crop, beam reorder), the next append starts a new buffer from it.
        """
        dim = self.COLUMN_DIM[name]
        view = getattr(self, name)
        used = 0 if view is None else view.shape[dim]
        n = new.shape[dim]
        buffer = self._buffers.get(name)
        if (
            buffer is None
            or view is None
            or buffer.shape[dim] < used + n
            or view.data_ptr() != buffer.data_ptr()
            or view.shape[0] != buffer.shape[0]
        ):
            shape = list(new.shape)
            shape[dim] = used + n + self.GROWTH
            buffer = new.new_empty(shape)
            if used:
                buffer.narrow(dim, 0, used).copy_(view)
            self._buffers[name] = buffer
        buffer.narrow(dim, used, n).copy_(new)
        setattr(self, name, buffer.narrow(dim, 0, used + n))

    def _ones(self, B: int, S: int) -> torch.Tensor:
        return torch.ones(B, S, dtype=torch.bool, device=self.keys.device)

    def _materialize_steps(self) -> None:
        """Write out the implicit steps (column j = step j) before a column breaks that rule."""
        if self.keys is not None and self.key_steps is None:
            B, S = self.keys.shape[0], self.keys.shape[2]
            self.key_steps = torch.arange(S, dtype=torch.int32, device=self.keys.device).expand(B, S).contiguous()

    def column_steps(self) -> torch.Tensor | None:
        """(B, S) int32 input step of every cached column (built on the fly while they are implicit)."""
        if self.keys is not None and self.key_steps is None:
            B, S = self.keys.shape[0], self.keys.shape[2]
            return torch.arange(S, dtype=torch.int32, device=self.keys.device).expand(B, S)
        return self.key_steps

    # ------------------------------------------------------------------ rolling state
    def rolling_state(self) -> torch.Tensor | None:
        """(B, W, Cq + Ck + Cs) the last W processed pre-conv columns, or None at a sequence start."""
        if self.rolling is None:
            return None
        return self.rolling[:, -self.rolling_width :]

    def update_rolling(
        self,
        columns: torch.Tensor,  # (B, K, Cq + Ck + Cs) pre-conv q, k and value-shift source of the new tokens
        steps: torch.Tensor,  # (B, K)
        counts: torch.Tensor | None,  # (B,) valid columns per row (valid first); None = all
    ) -> None:
        B, K, C = columns.shape
        if self.rolling is None:
            self.rolling = columns.new_zeros(B, self.rolling_width, C)
            self.rolling_steps = torch.full((B, self.rolling_width), -1, dtype=steps.dtype, device=columns.device)
        keep = self.rolling.shape[1] + K if self.record_past else self.rolling_width
        rolling, rolling_steps = _right_aligned_append(self.rolling, self.rolling_steps, columns, steps, counts, keep)
        if self.max_cache_len is not None and rolling.shape == self.rolling.shape:
            self.rolling.copy_(rolling)  # static layout: in place (fixed buffers for torch.compile)
            self.rolling_steps.copy_(rolling_steps)
        else:
            self.rolling, self.rolling_steps = rolling, rolling_steps

    # ------------------------------------------------------------------ rollback and batch edits
    def activate_past_recording(self):
        if not self.record_past:
            self.record_past = True
            self.record_start = self.seen

    def crop(self, tokens_to_remove: int) -> None:
        """Remove what the last `tokens_to_remove` input steps wrote (given as a negative int, as in transformers)."""
        if tokens_to_remove > 0:
            raise ValueError(
                f"HydraCache.crop({tokens_to_remove}): pass a negative int, the number of latest tokens to remove "
                "(transformers' Cache.crop contract); 0 only trims recorded states"
            )
        n = -tokens_to_remove
        if n > 0:
            limit = self.seen - n
            if limit < 0:
                raise ValueError(f"HydraCache.crop: cannot remove {n} tokens, the cache holds {self.seen}")
            if self.rolling is not None and (not self.record_past or limit < self.record_start):
                raise RuntimeError(
                    f"HydraCache.crop({tokens_to_remove}) needs the rolling conv / value-shift states of step {limit}: "
                    "call cache.activate_past_recording() before the forward passes you may want to undo "
                    "(generate() does this for assisted decoding)"
                )
            self._drop_steps_from(limit)
            self.seen = limit
        if self.rolling is not None and self.rolling.shape[1] > self.rolling_width:
            self.rolling = self.rolling[:, -self.rolling_width :]
            self.rolling_steps = self.rolling_steps[:, -self.rolling_width :]
        self.record_start = self.seen  # the trimmed buffer cannot go back further

    def _drop_steps_from(self, limit: int) -> None:
        if self.keys is not None:
            if self.max_cache_len is not None:
                self.key_valid &= self.key_steps < limit
            elif self.key_steps is None:  # column j = step j
                self.keys, self.values = self.keys[:, :, :limit], self.values[:, :, :limit]
                if self.key_valid is not None:
                    self.key_valid = self.key_valid[:, :limit]
                    self.all_valid = bool(self.key_valid.all())
            else:
                removed = self.key_steps >= limit  # (B, S)
                kept_columns = (~removed).any(dim=0)  # (S,)
                last = int(kept_columns.nonzero().max()) + 1 if bool(kept_columns.any()) else 0
                self.keys, self.values = self.keys[:, :, :last], self.values[:, :, :last]
                self.key_steps, removed = self.key_steps[:, :last], removed[:, :last]
                if bool(removed.any()) or self.key_valid is not None:
                    valid = self.key_valid[:, :last] if self.key_valid is not None else ~removed
                    self.key_valid = valid & ~removed
                    self.all_valid = bool(self.key_valid.all())
        if self.rolling is not None:
            # Columns written at steps >= limit sit at the right end of each row: shift them out.
            B, W, C = self.rolling.shape
            r = (self.rolling_steps >= limit).sum(dim=1)  # (B,)
            padded = torch.cat([self.rolling.new_zeros(B, W, C), self.rolling], dim=1)
            padded_steps = torch.cat([self.rolling_steps.new_full((B, W), -1), self.rolling_steps], dim=1)
            idx = (W - r).view(B, 1) + torch.arange(W, device=r.device).view(1, W)  # (B, W)
            self.rolling = torch.gather(padded, 1, idx.unsqueeze(-1).expand(-1, -1, C))
            self.rolling_steps = torch.gather(padded_steps, 1, idx)

    def _map_batch(self, fn):
        for name in ("keys", "values", "key_valid", "key_steps", "rolling", "rolling_steps"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, fn(value))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices.to(t.device)])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def reset(self) -> None:
        self.__init__(self.rolling_width, self.max_cache_len, self.step_counter)
        self.seen = 0

    @property
    def batch_size(self) -> int:
        for t in (self.keys, self.rolling):
            if t is not None:
                return t.shape[0]
        return -1


class HydraCacheMixin:
    """What `HydraCache` and `HydraStaticCache` share: one `HydraCacheLayer` per effective layer."""

    def _build_layers(self, config, num_layers: int | None, max_cache_len: int | None, step_counter=None):
        rolling_width = 1
        if config is not None:
            num_layers = num_layers if num_layers is not None else config.num_hidden_layers
            conv_history = config.qk_conv_kernel_size + config.qk_channel_conv_kernel_size - 2
            rolling_width = max(1, conv_history)
        if num_layers is None:
            raise ValueError(f"{type(self).__name__} needs a HydraConfig or num_layers")
        layers = [HydraCacheLayer(rolling_width, max_cache_len, step_counter) for _ in range(num_layers)]
        Cache.__init__(self, layers=layers)
        self.max_cache_len = max_cache_len

    @property
    def seen_tokens(self) -> int:
        return self.layers[0].seen if self.layers else 0

    def advance(self, num_tokens: int) -> None:
        """Called by `HydraModel.forward` once per forward: every layer has now seen `num_tokens` more steps."""
        for layer in self.layers:
            layer.seen += num_tokens

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Input positions seen so far (identical for every layer, whatever routing skipped)."""
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.layers[layer_idx].get_mask_sizes(query_length)

    @property
    def is_initialized(self) -> bool:
        return self.seen_tokens > 0

    @property
    def batch_size(self) -> int:
        for layer in self.layers:
            if layer.batch_size > 0:
                return layer.batch_size
        return -1

    def kv_bytes(self) -> int:
        """Bytes held by latent keys and values (the part that grows with the sequence, metadata excluded)."""
        total = 0
        for layer in self.layers:
            if layer.keys is not None:
                total += layer.keys.numel() * layer.keys.element_size()
                total += layer.values.numel() * layer.values.element_size()
        return total

    def cache_bytes(self) -> int:
        """Bytes of everything the cache holds: keys, values, per-column validity and steps, rolling states."""
        total = 0
        for layer in self.layers:
            for t in (layer.keys, layer.values, layer.key_valid, layer.key_steps, layer.rolling, layer.rolling_steps):
                if t is not None and not (t is layer.key_steps and layer.max_cache_len is not None):
                    total += t.numel() * t.element_size()
        return total


class HydraCache(HydraCacheMixin, DynamicCache):
    """Cache of a `HydraForCausalLM` (the default, growing layout): one `HydraCacheLayer` per effective layer.

    `generate()` creates it (also for assisted decoding, prompt lookup and as a draft model's cache, where it
    records its rolling states so `crop` can undo rejected tokens). Supports `reorder_cache` /
    `batch_select_indices` / `batch_repeat_interleave` (beam and contrastive search), `crop` with transformers'
    semantics, and left-padded or routed batches (a skipped or padding token is never a valid column).
    """

    def __init__(self, config=None, num_layers: int | None = None, **kwargs):
        self._build_layers(config, num_layers, None)


class HydraStaticCache(HydraCacheMixin, StaticCache):
    """Preallocated `HydraCache` (`cache_implementation="static"`): one column per input step up to
    `max_cache_len`, written in place, and the step count in a tensor, so a decode step has fixed shapes, reads no
    Python state and compiles with `torch.compile(fullgraph=True)` without recompiling from step to step.
    """

    def __init__(self, config=None, max_cache_len: int = 0, num_layers: int | None = None, **kwargs):
        if max_cache_len <= 0:
            raise ValueError(f"HydraStaticCache needs max_cache_len > 0, got {max_cache_len}")
        self.step_counter = torch.zeros((), dtype=torch.long)
        self._build_layers(config, num_layers, max_cache_len, self.step_counter)

    def place(self, device: torch.device) -> None:
        """Put the step counter on the model's device (once, at the first forward)."""
        if self.step_counter.device != device:
            self.step_counter = self.step_counter.to(device)
            for layer in self.layers:
                layer.step_counter = self.step_counter

    def advance(self, num_tokens: int) -> None:
        self.step_counter.add_(num_tokens)


__all__ = ["HydraCache", "HydraStaticCache", "HydraCacheLayer"]
