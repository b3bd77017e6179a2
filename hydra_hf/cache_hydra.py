"""The generation cache of HYDRA, built on transformers' own cache classes.

`HydraCache` is a `DynamicCache` of `HydraDynamicLayer`s; `HydraStaticCache` is a `StaticCache` of
`HydraStaticLayer`s (`cache_implementation="static"`: preallocated, written in place, so a decode step has
fixed shapes and compiles with `torch.compile(fullgraph=True)`). There is one layer per effective layer, i.e.
one slot per (block, recursion) pair: a weight-shared block keeps one slot per pass.

A layer holds, like a transformers layer that keeps KV plus conv state (Zaya, Qwen3-Next):

- latent post-RoPE keys and values, (B, Hk, S, h) each: Hk * h * 2 numbers per token, 1/C of a Llama layer
  of the same width and KV heads. `update(keys, values, *args, **kwargs) -> (keys, values)` keeps the base
  class's contract; HYDRA's per-column data travels in its keyword arguments:
  - `steps` (B, K): the input step of each new column. A routed layer only appends the tokens it processed, so
    rows differ; steps give causality (a query sees columns of earlier or equal steps) and let `crop` remove
    exactly what the last n input steps wrote. Without `steps` the columns are the next steps in order (what a
    dense layer writes, and what `cache.update(k, v, layer_idx)` means for any transformers cache);
  - `valid` (B, K) bool: a column some rows skipped (routing) or never had (padding) is invalid for them.
  `column_steps()` / `column_valid()` return the metadata of every stored column (None = all valid).
- the rolling state, kept the way transformers' linear-attention layers keep their conv state: the last
  P = Ks + Kc - 2 pre-conv latent q and k columns and the last value-shift source column of the tokens this
  layer processed, right-aligned in one (B, W, Cq + Ck + Cs) buffer with the step of each column (zeros and
  step -1 where a row has no history yet: the same as a sequence start). W is the working width max(P, 1);
  after `activate_past_recording()` the buffer keeps every column until the next `crop`, which puts back the
  state as it was after any earlier step and trims it to W again.

Every tensor a layer keeps owns its storage (never a view into a prefill activation), so the cache costs what
it holds: see `HydraCacheMixin.storage_bytes`.

`get_seq_length()` is the number of input positions seen (the same for every layer, whatever routing skipped):
what `generate()` needs to slice new input ids. The model advances it once per forward (`advance`).

`crop(tokens_to_remove)` follows transformers 5.x: a negative value removes that many of the latest input
steps, 0 removes nothing and only trims the recorded rolling states, a positive value is an error.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, StaticCache, StaticLayer


def _right_aligned_append(
    buffer: torch.Tensor,  # (B, W, C) right-aligned, zeros where empty
    buffer_steps: torch.Tensor,  # (B, W) int64, -1 where empty
    new: torch.Tensor,  # (B, K, C) new columns, valid ones first
    new_steps: torch.Tensor,  # (B, K)
    counts: torch.Tensor | None,  # (B,) valid new columns per row; None = all K
    keep: int,  # width of the result
) -> tuple[torch.Tensor, torch.Tensor]:
    """Append each row's valid new columns after its old ones and keep the last `keep` columns, right-aligned.

    The result owns its storage (never a view of `new`, which may be a whole prefill's activations)."""
    B, K, C = new.shape
    if counts is None:
        if K >= keep:
            return new[:, K - keep :].clone(), new_steps[:, K - keep :].to(buffer_steps.dtype).clone()
        start = buffer.shape[1] + K - keep  # the old columns that stay: one concatenation, a new tensor
        return (
            torch.cat([buffer[:, start:].to(new.dtype), new], dim=1),
            torch.cat([buffer_steps[:, start:], new_steps.to(buffer_steps.dtype)], dim=1),
        )
    full = torch.cat([buffer.to(new.dtype), new], dim=1)  # (B, W + K, C)
    full_steps = torch.cat([buffer_steps, new_steps.to(buffer_steps.dtype)], dim=1)
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


class HydraLayerMixin:
    """What both HYDRA layer classes add to transformers' layer: column metadata, the rolling state, rollback."""

    is_sliding = False
    supports_early_init = False

    def _init_hydra_state(self, rolling_width: int) -> None:
        self.rolling_width = rolling_width  # W: columns of conv / value-shift history the next forward needs
        self.rolling: torch.Tensor | None = None  # (B, W', Cq + Ck + Cs)
        self.rolling_steps: torch.Tensor | None = None  # (B, W') int64
        self.record_past = False
        self.record_start = 0  # first step that `crop` can go back to

    @property
    def is_croppable(self) -> bool:
        return self.record_past or self.rolling is None

    def get_seq_length(self) -> int:
        return self.seen

    # ------------------------------------------------------------------ rolling state
    def rolling_state(self) -> torch.Tensor | None:
        """(B, W, Cq + Ck + Cs) the last W processed pre-conv columns, or None at a sequence start."""
        if self.rolling is None:
            return None
        return self.rolling[:, -self.rolling_width :]

    def update_rolling_state(
        self,
        columns: torch.Tensor,  # (B, K, Cq + Ck + Cs) pre-conv q, k and value-shift source of the new tokens
        steps: torch.Tensor,  # (B, K)
        counts: torch.Tensor | None,  # (B,) valid columns per row (valid first); None = all
    ) -> None:
        B, K, C = columns.shape
        if self.rolling is None:
            self.rolling = columns.new_zeros(B, self.rolling_width, C)
            self.rolling_steps = torch.full((B, self.rolling_width), -1, dtype=torch.long, device=columns.device)
        keep = self.rolling.shape[1] + K if self.record_past else self.rolling_width
        rolling, rolling_steps = _right_aligned_append(self.rolling, self.rolling_steps, columns, steps, counts, keep)
        self._store_rolling(rolling, rolling_steps)

    def _store_rolling(self, rolling: torch.Tensor, rolling_steps: torch.Tensor) -> None:
        self.rolling, self.rolling_steps = rolling, rolling_steps

    # ------------------------------------------------------------------ rollback
    def activate_past_recording(self, recurrent_states_to_keep: int | None = None, **kwargs) -> None:
        """Keep every rolling-state column until the next `crop` (assisted decoding; transformers' signature)."""
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
            if self.keys is not None:
                self._drop_columns_from(limit)
            if self.rolling is not None:
                self._rewind_rolling(limit)
            self.seen = limit
        if self.rolling is not None and self.rolling.shape[1] > self.rolling_width:
            self._store_rolling(
                self.rolling[:, -self.rolling_width :].clone(), self.rolling_steps[:, -self.rolling_width :].clone()
            )
        self.record_start = self.seen  # the trimmed buffer cannot go back further

    def _rewind_rolling(self, limit: int) -> None:
        """Shift out the rolling columns written at steps >= limit (they sit at the right end of each row)."""
        B, W, C = self.rolling.shape
        r = (self.rolling_steps >= limit).sum(dim=1)  # (B,)
        padded = torch.cat([self.rolling.new_zeros(B, W, C), self.rolling], dim=1)
        padded_steps = torch.cat([self.rolling_steps.new_full((B, W), -1), self.rolling_steps], dim=1)
        idx = (W - r).view(B, 1) + torch.arange(W, device=r.device).view(1, W)  # (B, W)
        self._store_rolling(
            torch.gather(padded, 1, idx.unsqueeze(-1).expand(-1, -1, C)), torch.gather(padded_steps, 1, idx)
        )

    # ------------------------------------------------------------------ batch edits (beam search, contrastive)
    def _map_batch(self, fn) -> None:
        for name in self._batch_tensors:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, fn(value))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices.to(t.device)])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def offload(self):
        self._map_batch(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        if self.keys is not None and self.keys.device != self.device:
            self._map_batch(lambda t: t.to(self.device, non_blocking=True))

    @property
    def batch_size(self) -> int:
        for t in (self.keys, self.rolling):
            if t is not None:
                return t.shape[0]
        return -1

    def num_columns(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def owned_tensors(self) -> list[torch.Tensor]:
        """Every tensor this layer keeps alive (what `storage_bytes` counts)."""
        return [t for t in (getattr(self, n) for n in self._batch_tensors) if t is not None]

    def __repr__(self):
        return f"{type(self).__name__}(columns={self.num_columns()}, seen={self.seen})"


class HydraDynamicLayer(HydraLayerMixin, DynamicLayer):
    """Growing layer of `HydraCache`: appends in place into a buffer with spare columns (no `torch.cat` of the whole
    cache per decode step), keeps the steps implicit (column j = step j) while a layer is dense."""

    _batch_tensors = ("keys", "values", "key_valid", "key_steps", "rolling", "rolling_steps")
    MAX_SPARE = 256  # spare columns a growing buffer allocates at most (at least 32; 1/16 of its length between)

    def __init__(self, rolling_width: int = 1, **kwargs):
        super().__init__(**kwargs)
        self._init_hydra_state(rolling_width)
        self.key_valid: torch.Tensor | None = None  # (B, S) bool; None = every column valid
        self.key_steps: torch.Tensor | None = None  # (B, S) int32; None = column j is step j
        self.seen = 0  # input steps seen

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.is_initialized = True

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def update(
        self,
        key_states: torch.Tensor,  # (B, Hk, K, h)
        value_states: torch.Tensor,  # (B, Hk, K, h)
        *args,
        steps: torch.Tensor | int | None = None,  # (B, K) input step of each new column; int s = s, s+1, .. in every row
        valid: torch.Tensor | None = None,  # (B, K) bool; None = all valid
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store K new columns and return all keys and values, (B, Hk, S, h) each (transformers' contract).

        Without `steps` the columns are the steps after the last one stored (what `cache.update(k, v, layer_idx)`
        means for any transformers cache), and the layer's sequence length grows with them."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        B, _, K, _ = key_states.shape
        used = self.num_columns()
        outside_model = steps is None
        if outside_model:
            steps = max(self.seen, used if self.key_steps is None else (int(self.key_steps.max()) + 1 if used else 0))
        if isinstance(steps, int):
            if self.key_steps is None and steps != used:
                self._materialize_steps(B)
            if self.key_steps is not None:
                steps = (torch.arange(K, device=key_states.device) + steps).expand(B, K)
        else:
            self._materialize_steps(B)  # routed columns: rows differ, the steps are stored
        if valid is not None and not torch.compiler.is_exporting() and bool(valid.all()):
            valid = None  # (an exported graph keeps the validity: no branch on the data)
        if valid is not None and self.key_valid is None:
            self.key_valid = torch.ones(B, used, dtype=torch.bool, device=key_states.device)  # the columns so far
        if self.key_valid is not None:
            self.key_valid = self._cat(self.key_valid, valid if valid is not None else self._ones(B, K))
        if self.key_steps is not None:
            self.key_steps = self._cat(self.key_steps, steps.to(torch.int32))
        self.keys = self._append(self.keys, key_states)
        self.values = self._append(self.values, value_states)
        if outside_model:
            self.seen = max(self.seen, int(self.column_steps().max()) + 1)
        return self.keys, self.values

    def column_steps(self) -> torch.Tensor | None:
        """(B, S) int32 input step of every stored column (built on the fly while they are implicit)."""
        if self.keys is None:
            return None
        if self.key_steps is None:
            B, S = self.keys.shape[0], self.keys.shape[2]
            return torch.arange(S, dtype=torch.int32, device=self.keys.device).expand(B, S)
        return self.key_steps

    def column_valid(self) -> torch.Tensor | None:
        """(B, S) bool columns that may be attended to, or None when all may."""
        return self.key_valid

    @property
    def steps_are_implicit(self) -> bool:
        return self.key_steps is None

    def _append(self, view: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
        """Append columns (dim 2) in place into the buffer behind `view` (with spare room); return the view of the used
        columns. A decode step then writes one column instead of copying the whole cache. The buffer is the view's
        base, not an attribute of its own (the layer's tensors are what an export flattens: a spare-column buffer
        would be one more, uninitialised, input and output); when `view` was replaced by another tensor (crop keeps
        a view of the same buffer; beam reorder, batch select make new tensors), the next append starts a new buffer."""
        used = 0 if view is None else view.shape[2]
        n = new.shape[2]
        buffer = None if view is None else view._base
        if (
            buffer is None
            or buffer.dim() != 4
            or buffer.shape[2] < used + n
            or view.data_ptr() != buffer.data_ptr()
            or buffer.shape[:2] != view.shape[:2]
            or buffer.shape[3] != view.shape[3]
        ):
            spare = 0 if used == 0 else max(32, min(self.MAX_SPARE, (used + n) // 16))  # a prefill allocates exactly
            shape = list(new.shape)
            shape[2] = used + n + spare
            buffer = new.new_empty(shape)
            if used:
                buffer[:, :, :used].copy_(view)
        buffer[:, :, used : used + n].copy_(new)
        return buffer[:, :, : used + n]

    @staticmethod
    def _cat(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        return torch.cat([old, new.to(old.device)], dim=1)  # (B, S + K): metadata of routed layers only, 5 bytes/col

    def _ones(self, B: int, S: int) -> torch.Tensor:
        return torch.ones(B, S, dtype=torch.bool, device=self.device)

    def _materialize_steps(self, B: int) -> None:
        """Write out the implicit steps (column j = step j) before a column breaks that rule."""
        if self.key_steps is None:
            S = self.num_columns()
            self.key_steps = torch.arange(S, dtype=torch.int32, device=self.device).expand(B, S).contiguous()

    def _drop_columns_from(self, limit: int) -> None:
        """Remove every column written at a step >= limit (for dense layers: the last columns)."""
        if self.key_steps is None:  # column j = step j
            last = min(limit, self.num_columns())
            kept = None
        else:
            removed = self.key_steps >= limit  # (B, S)
            kept_columns = (~removed).any(dim=0)  # (S,)
            last = int(kept_columns.nonzero().max()) + 1 if bool(kept_columns.any()) else 0
            kept = ~removed[:, :last]
            self.key_steps = self.key_steps[:, :last]
        self.keys, self.values = self.keys[:, :, :last], self.values[:, :, :last]
        if self.key_valid is not None or (kept is not None and not bool(kept.all())):
            valid = self.key_valid[:, :last] if self.key_valid is not None else self._ones(self.keys.shape[0], last)
            self.key_valid = valid & kept if kept is not None else valid
            if bool(self.key_valid.all()):
                self.key_valid = None

    def reset(self) -> None:
        self.__init__(self.rolling_width)


class HydraStaticLayer(HydraLayerMixin, StaticLayer):
    """Preallocated layer of `HydraStaticCache`: column i holds step i, written in place; the step count is a 0-dim
    tensor (`cumulative_length`, as in transformers' `StaticLayer`), so a compiled decode step reads no Python state.

    Every layer owns its counter and the cache advances them together (no tensor is shared between layers: an
    exported graph takes each counter as its own input, and aliased inputs do not export)."""

    is_compileable = True
    _batch_tensors = ("keys", "values", "key_valid", "rolling", "rolling_steps")

    def __init__(self, max_cache_len: int, rolling_width: int = 1, **kwargs):
        super().__init__(max_cache_len=max_cache_len, **kwargs)
        self._init_hydra_state(rolling_width)
        self.cumulative_length = torch.zeros((), dtype=torch.long)  # input steps seen (transformers' field name)
        self.key_valid: torch.Tensor | None = None  # (B, max_cache_len) bool
        self.key_steps: torch.Tensor | None = None  # (B, max_cache_len) int32 = arange (a broadcast view, no storage)

    @property
    def step_counter(self) -> torch.Tensor:
        """The 0-dim step count (`cumulative_length`)."""
        return self.cumulative_length

    @property
    def seen(self) -> int:
        return int(self.cumulative_length)

    @seen.setter
    def seen(self, value: int) -> None:
        self.cumulative_length.fill_(value)

    @property
    def is_croppable(self) -> bool:
        return self.record_past or self.rolling is None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, Hk, _, h = key_states.shape
        S = self.max_cache_len
        self.device, self.dtype = key_states.device, key_states.dtype
        self.keys = key_states.new_zeros(B, Hk, S, h)
        self.values = value_states.new_zeros(B, Hk, S, h)
        self.key_valid = torch.zeros(B, S, dtype=torch.bool, device=key_states.device)
        self.key_steps = torch.arange(S, dtype=torch.int32, device=key_states.device).expand(B, S)
        self.is_initialized = True

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.max_cache_len, 0

    def get_max_length(self) -> int:
        return self.max_cache_len

    def update(
        self,
        key_states: torch.Tensor,  # (B, Hk, K, h)
        value_states: torch.Tensor,  # (B, Hk, K, h)
        *args,
        steps: torch.Tensor | None = None,  # (B, K) input step = column of each new entry; None = the next steps
        valid: torch.Tensor | None = None,  # (B, K) bool; None = all valid
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write K new columns in place at their steps; return the whole (B, Hk, max_cache_len, h) keys and values."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        B, Hk, K, h = key_states.shape
        if steps is None:
            steps = (torch.arange(K, device=key_states.device) + self.cumulative_length).expand(B, K)
        if valid is None:
            valid = torch.ones(B, K, dtype=torch.bool, device=key_states.device)
        col = steps.long().clamp(max=self.max_cache_len - 1)  # (B, K)
        idx = col.view(B, 1, K, 1).expand(B, Hk, K, h)
        self.keys.scatter_(2, idx, key_states.to(self.keys.dtype))
        self.values.scatter_(2, idx, value_states.to(self.values.dtype))
        self.key_valid.scatter_(1, col, valid)
        return self.keys, self.values

    def column_steps(self) -> torch.Tensor | None:
        return self.key_steps

    def column_valid(self) -> torch.Tensor | None:
        return self.key_valid

    steps_are_implicit = False

    def _store_rolling(self, rolling: torch.Tensor, rolling_steps: torch.Tensor) -> None:
        if self.rolling is not None and rolling.shape == self.rolling.shape:
            self.rolling.copy_(rolling)  # in place: fixed buffers for torch.compile
            self.rolling_steps.copy_(rolling_steps)
        else:
            self.rolling, self.rolling_steps = rolling, rolling_steps

    def _drop_columns_from(self, limit: int) -> None:
        self.key_valid &= self.key_steps < limit  # column = step: invalidate, the next write overwrites

    def reset(self) -> None:
        if self.is_initialized:
            self.keys.zero_()
            self.values.zero_()
            self.key_valid.zero_()
        self.rolling = self.rolling_steps = None
        self.record_past, self.record_start = False, 0
        self.cumulative_length.zero_()


class HydraCacheMixin:
    """What `HydraCache` and `HydraStaticCache` share: one HYDRA layer per effective layer, one step count."""

    @staticmethod
    def _layer_layout(cache_name: str, config, num_layers: int | None) -> tuple[int, int]:
        """(number of layers, rolling width) from a HydraConfig or an explicit layer count."""
        if config is None and num_layers is None:
            raise ValueError(f"{cache_name} needs a HydraConfig (config=...) or num_layers")
        rolling_width = 1
        if config is not None:
            if not hasattr(config, "qk_conv_kernel_size"):
                raise TypeError(f"{cache_name}(config=...) needs a HydraConfig, got a {type(config).__name__}")
            num_layers = num_layers if num_layers is not None else config.num_hidden_layers
            rolling_width = max(1, config.qk_conv_kernel_size + config.qk_channel_conv_kernel_size - 2)
        return num_layers, rolling_width

    def advance(self, num_tokens: int) -> None:
        """Called by `HydraModel.forward` once per forward: every layer has now seen `num_tokens` more steps."""
        for layer in self.layers:
            layer.seen += num_tokens

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Input positions seen so far (identical for every layer, whatever routing skipped)."""
        return self.layers[layer_idx].seen if self.layers else 0

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.layers[layer_idx].get_mask_sizes(query_length)

    @property
    def is_initialized(self) -> bool:
        return self.get_seq_length() > 0

    @property
    def batch_size(self) -> int:
        for layer in self.layers:
            if layer.batch_size > 0:
                return layer.batch_size
        return -1

    def activate_past_recording(self, recurrent_states_to_keep: int | None = None, **kwargs) -> None:
        for layer in self.layers:
            layer.activate_past_recording(recurrent_states_to_keep)

    def kv_bytes(self) -> int:
        """Bytes of the stored latent keys and values (the part that grows with the sequence)."""
        return sum(
            t.numel() * t.element_size() for layer in self.layers for t in (layer.keys, layer.values) if t is not None
        )

    def storage_bytes(self) -> int:
        """Bytes of every distinct storage the cache keeps alive: keys, values, spare columns, per-column validity
        and steps, rolling states. Counted by storage, so a view into a larger tensor costs that whole tensor."""
        return storage_bytes(t for layer in self.layers for t in layer.owned_tensors())

    cache_bytes = storage_bytes  # the name used before


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (a view costs the whole tensor it looks into)."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(seen.values())


class HydraCache(HydraCacheMixin, DynamicCache):
    """Cache of a `HydraForCausalLM` (the default, growing layout): one `HydraDynamicLayer` per effective layer.

    `generate()` creates it (also for assisted decoding, prompt lookup and as a draft model's cache, where it
    records its rolling states so `crop` can undo rejected tokens). Supports `reorder_cache` /
    `batch_select_indices` / `batch_repeat_interleave` (beam and contrastive search), `crop` with transformers'
    semantics, and left-padded or routed batches (a skipped or padding token is never a valid column).
    For a preallocated cache (`torch.compile`), use `HydraStaticCache`.
    """

    def __init__(self, config=None, num_layers: int | None = None, offloading: bool = False, **kwargs):
        if kwargs.get("max_cache_len") is not None:
            raise TypeError(
                "HydraCache is the growing (dynamic) cache and takes no max_cache_len; for a preallocated cache use "
                f"HydraStaticCache(config, max_cache_len={kwargs['max_cache_len']})"
            )
        if kwargs:
            raise TypeError(f"HydraCache got unexpected arguments {sorted(kwargs)}; it takes config, num_layers, offloading")
        num_layers, rolling_width = self._layer_layout("HydraCache", config, num_layers)
        super().__init__(offloading=offloading)  # DynamicCache with no layer structure: HYDRA gives its own layers
        self.layers = [HydraDynamicLayer(rolling_width) for _ in range(num_layers)]
        self.layer_class_to_replicate = None


class HydraStaticCache(HydraCacheMixin, StaticCache):
    """Preallocated HYDRA cache (`cache_implementation="static"`): one column per input step up to `max_cache_len`,
    written in place, and the step count in a tensor, so a decode step has fixed shapes, reads no Python state and
    compiles with `torch.compile(fullgraph=True)` without recompiling from step to step.
    """

    def __init__(self, config=None, max_cache_len: int | None = None, num_layers: int | None = None, **kwargs):
        if max_cache_len is None or max_cache_len <= 0:
            raise ValueError(
                f"HydraStaticCache needs max_cache_len > 0 (the positions it preallocates), got {max_cache_len}; "
                "for a growing cache use HydraCache(config)"
            )
        if config is None:
            raise ValueError("HydraStaticCache needs the model's HydraConfig (config=model.config), as StaticCache does")
        num_layers, rolling_width = self._layer_layout("HydraStaticCache", config, num_layers)
        super().__init__(config=config, max_cache_len=max_cache_len, **kwargs)  # StaticCache's own constructor ...
        # ... then HYDRA's layers, each with its step counter (advanced together)
        self.layers = [HydraStaticLayer(max_cache_len, rolling_width) for _ in range(num_layers)]
        self.layer_class_to_replicate = None
        self.max_cache_len = max_cache_len

    @property
    def step_counter(self) -> torch.Tensor:
        """The 0-dim tensor of input steps seen (every layer keeps the same count; this is the first layer's)."""
        return self.layers[0].cumulative_length

    def place(self, device: torch.device) -> None:
        """Put the step counters on the model's device (once, at the first forward)."""
        for layer in self.layers:
            if layer.cumulative_length.device != device:
                layer.cumulative_length = layer.cumulative_length.to(device)

    def advance(self, num_tokens: int) -> None:
        for layer in self.layers:
            layer.cumulative_length.add_(num_tokens)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.layers[layer_idx].cumulative_length)


HydraCacheLayer = HydraDynamicLayer  # the name before the dynamic / static split

__all__ = ["HydraCache", "HydraStaticCache", "HydraDynamicLayer", "HydraStaticLayer", "HydraCacheLayer"]
