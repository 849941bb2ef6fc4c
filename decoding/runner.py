"""Drive a Hugging Face decoder stack layer by layer, with a KV cache we can see and shape.

Why not ``model(...)``: cfic packs several hypotheses into one sequence with a tree-shaped attention mask, chooses the
rotary positions of every token itself, and (for acceleration) wants to run different layers for different tokens.
So we call the model's own modules — embeddings, rotary embedding, decoder layers, final norm, LM head — in the order
its modeling file does, and hand each attention layer a ``KVCache`` whose ``update`` writes into preallocated buffers.
Works for the Llama family (Llama, Qwen2/3, Mistral, SmolLM) whose decoder layers take
``(hidden_states, attention_mask, position_embeddings, past_key_values)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class KVCache:
    """Preallocated keys/values, one ``[batch, kv_heads, capacity, head_dim]`` pair per layer.

    ``length`` positions are filled. A forward pass writes its new keys at ``[length, length + n)`` in every layer,
    and ``advance(n)`` commits them once all layers ran. HF attention modules call ``update`` directly.
    """

    keys: list[Tensor]
    values: list[Tensor]
    length: int = 0

    @classmethod
    def empty(cls, runner: LayerRunner, batch: int, capacity: int) -> KVCache:
        shape = (batch, runner.num_kv_heads, capacity, runner.head_dim)
        n = runner.num_layers
        kw = {"dtype": runner.dtype, "device": runner.device}
        return cls([torch.empty(shape, **kw) for _ in range(n)], [torch.empty(shape, **kw) for _ in range(n)])

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0]

    def update(self, key: Tensor, value: Tensor, layer_idx: int, *args, **kwargs) -> tuple[Tensor, Tensor]:
        n = key.shape[2]
        end = self.length + n
        if end > self.capacity:
            raise RuntimeError(f"KV cache overflow: {end} > capacity {self.capacity}")
        self.keys[layer_idx][:, :, self.length:end] = key
        self.values[layer_idx][:, :, self.length:end] = value
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def ensure_room(self, n: int) -> None:
        """Grow the buffers (one copy) so ``n`` more tokens fit."""
        if self.length + n <= self.capacity:
            return
        grown = self.fork(n + max(64, self.capacity // 4))
        self.keys, self.values = grown.keys, grown.values

    def fork(self, extra: int, row: int = 0) -> KVCache:
        """A private copy of row ``row``'s filled part with room for ``extra`` more tokens (copy-on-write view)."""
        shape = (1, self.keys[0].shape[1], self.length + extra, self.keys[0].shape[3])
        keys, values = [], []
        for k, v in zip(self.keys, self.values, strict=True):
            nk = torch.empty(shape, dtype=k.dtype, device=k.device)
            nv = torch.empty(shape, dtype=v.dtype, device=v.device)
            nk[:, :, : self.length] = k[row: row + 1, :, : self.length]
            nv[:, :, : self.length] = v[row: row + 1, :, : self.length]
            keys.append(nk)
            values.append(nv)
        return KVCache(keys, values, self.length)

    def slice_row(self, row: int, length: int) -> KVCache:
        """Row ``row`` trimmed to ``length`` tokens, as compact contiguous tensors (for storing an encoding)."""
        keys = [k[row: row + 1, :, :length].clone() for k in self.keys]
        values = [v[row: row + 1, :, :length].clone() for v in self.values]
        return KVCache(keys, values, length)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    # Methods some HF layers query on their cache object.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length


class LayerRunner:
    """The model's modules, in order. Stateless apart from references to the weights."""

    def __init__(self, model: nn.Module):
        core = getattr(model, "model", None)
        needed = ("embed_tokens", "layers", "norm", "rotary_emb")
        if core is None or not all(hasattr(core, name) for name in needed) or not hasattr(model, "lm_head"):
            raise TypeError(
                f"{type(model).__name__} is not a Llama-family causal LM (needs model.embed_tokens/layers/norm/"
                "rotary_emb and lm_head)"
            )
        cfg = model.config
        self.model = model
        self.embed_tokens = core.embed_tokens
        self.layers = list(core.layers)
        self.norm = core.norm
        self.rotary_emb = core.rotary_emb
        self.lm_head = model.lm_head
        self.num_layers = len(self.layers)
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.max_positions = getattr(cfg, "max_position_embeddings", 2048)
        param = next(model.parameters())
        self.dtype = param.dtype
        self.device = param.device

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.embed_tokens(input_ids)

    def position_embeddings(self, hidden: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        return self.rotary_emb(hidden, positions)

    def run_layer(
        self,
        index: int,
        hidden: Tensor,
        rope: tuple[Tensor, Tensor],
        cache: KVCache | None,
        mask: Tensor | None,
    ) -> Tensor:
        out = self.layers[index](
            hidden, attention_mask=mask, position_embeddings=rope, past_key_values=cache, use_cache=cache is not None
        )
        return out[0] if isinstance(out, tuple) else out

    def logits(self, hidden: Tensor) -> Tensor:
        """Final norm + LM head, in float32 for stable log-softmax."""
        return self.lm_head(self.norm(hidden)).float()


def forward(
    runner: LayerRunner,
    input_ids: Tensor,
    positions: Tensor,
    cache: KVCache | None,
    mask: Tensor | None = None,
) -> Tensor:
    """Run all layers over ``input_ids`` ([batch, n]) and return the last hidden states (before the final norm).

    ``mask`` is a boolean ``[batch, 1, n, cache.length + n]`` (True = may attend) or None for plain causal attention
    over a cache that starts empty. New keys are written into ``cache`` and committed.
    """
    hidden = runner.embed(input_ids)
    rope = runner.position_embeddings(hidden, positions)
    for i in range(runner.num_layers):
        hidden = runner.run_layer(i, hidden, rope, cache, mask)
    if cache is not None:
        cache.advance(input_ids.shape[1])
    return hidden


def prefill(runner: LayerRunner, input_ids: Tensor, capacity: int | None = None) -> KVCache:
    """Encode a batch of right-padded prompts from scratch. Causal attention means a row's padding (at its end)
    never influences its real tokens, so no padding mask is needed; callers slice each row to its true length."""
    batch, n = input_ids.shape
    cache = KVCache.empty(runner, batch, capacity or n)
    positions = torch.arange(n, device=input_ids.device).unsqueeze(0).expand(batch, n)
    forward(runner, input_ids, positions, cache, mask=None)
    return cache


def causal_extension_mask(cache_length: int, n_new: int, device: torch.device) -> Tensor:
    """Mask for ``n_new`` tokens that continue the whole cache causally (e.g. the question after a document)."""
    total = cache_length + n_new
    mask = torch.ones(n_new, total, dtype=torch.bool, device=device)
    mask[:, cache_length:] = torch.tril(mask[:, cache_length:])
    return mask.view(1, 1, n_new, total)


class TreeMask:
    """Attention mask for hypotheses packed into one sequence after a shared prefix.

    Every hypothesis sees the shared prefix ``[0, shared)`` and its own earlier tokens, which may lie anywhere after
    the prefix (hypotheses are appended step by step, interleaved). Keeping each hypothesis's own cache positions
    explicit lets top-k search fork and drop hypotheses without copying the cache.
    """

    def __init__(self, shared: int):
        self.shared = shared

    def build(self, histories: list[list[int]], new_positions: list[list[int]], total: int,
              device: torch.device) -> Tensor:
        """``histories[h]``: cache positions hypothesis h already owns; ``new_positions[h]``: positions of its new
        tokens in this pass (consecutive, causal among themselves). Rows are ordered hypothesis by hypothesis."""
        rows = sum(len(p) for p in new_positions)
        mask = torch.zeros(rows, total, dtype=torch.bool)
        mask[:, : self.shared] = True
        r = 0
        for own, new in zip(histories, new_positions, strict=True):
            n = len(new)
            if own:
                mask[r: r + n, torch.tensor(own)] = True
            new_t = torch.tensor(new)
            tri = torch.tril(torch.ones(n, n, dtype=torch.bool))
            mask[r: r + n].index_copy_(1, new_t, mask[r: r + n].index_select(1, new_t) | tri)
            r += n
        return mask.to(device).view(1, 1, rows, total)
