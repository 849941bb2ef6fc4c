"""Drive a Hugging Face decoder stack layer by layer, with a KV cache we can see and shape.

Why not ``model(...)``: cfic packs several hypotheses into one sequence with a tree-shaped attention mask, chooses the
rotary positions of every token itself, and (for acceleration) runs different layers for different tokens. So we call
the model's own modules — embeddings, rotary embedding, decoder layers, final norm, LM head — in the order its
modeling file does, and hand each attention layer a ``KVCache`` whose ``update`` writes into preallocated buffers.
Works for the Llama family (Llama, Qwen2/3, Mistral, SmolLM) whose decoder layers take
``(hidden_states, attention_mask, position_embeddings, cache)`` (``past_key_values`` before transformers 5.2x).

A pass (``forward``) is one plain loop over the layers. Three accelerations change it, each in one place:

- SwiftKV (``runner.swiftkv``): at the SwiftKV layer ``l`` every column's K/V for the layers above are computed from
  its layer-``l`` input (``SwiftKV.write_kv``, SingleInputKV) and the pass narrows to the ``outputs`` columns the
  caller reads, so the upper layers run for those only (``_swiftkv_boundary``).
- a ``LayerHook`` (``decoding.layerskip``: SkipDecode layer skipping, FFN skipping) runs a layer for the pass in its
  own way; ``PLAIN`` runs it for every column.
- the cache layout (``KVLayout``): with AcrossKV, adjacent SwiftKV layers share one K/V buffer.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ATTENTION = "cfic_sdpa"


@dataclass(frozen=True)
class KVLayout:
    """Which buffer holds each layer's K/V, and from which layer on the K/V are written by SwiftKV (the attention
    modules of those layers only read them)."""

    slots: tuple[int, ...]
    external_from: int

    @classmethod
    def plain(cls, num_layers: int) -> KVLayout:
        return cls(tuple(range(num_layers)), num_layers)

    @classmethod
    def swiftkv(cls, num_layers: int, layer: int, group: int) -> KVLayout:
        """Layers below ``layer`` own their K/V; from ``layer`` on, each group of ``group`` layers shares one."""
        slots = [*range(layer), *(layer + (j - layer) // group for j in range(layer, num_layers))]
        return cls(tuple(slots), layer)

    @property
    def num_slots(self) -> int:
        return (max(self.slots) + 1) if self.slots else 0


@dataclass
class KVCache:
    """Preallocated keys/values, one ``[batch, kv_heads, capacity, head_dim]`` pair per buffer (``layout`` maps
    layers to buffers; without AcrossKV one buffer per layer).

    ``length`` positions are filled. A forward pass writes its new keys at ``[length, length + n)`` and
    ``advance(n)`` commits them once all layers ran. HF attention modules call ``update`` directly; during a pass
    ``pending`` is its token count and ``rows`` (when a layer runs for some columns only) their cache positions.
    """

    keys: list[Tensor]
    values: list[Tensor]
    length: int = 0
    layout: KVLayout | None = None
    pending: int = field(default=0, repr=False)
    rows: Tensor | None = field(default=None, repr=False)

    @classmethod
    def empty(cls, runner: LayerRunner, batch: int, capacity: int) -> KVCache:
        layout = runner.layout
        shape = (batch, runner.num_kv_heads, capacity, runner.head_dim)
        kw = {"dtype": runner.dtype, "device": runner.device}
        n = layout.num_slots
        return cls([torch.empty(shape, **kw) for _ in range(n)], [torch.empty(shape, **kw) for _ in range(n)],
                   layout=layout)

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0]

    def slot(self, layer: int) -> int:
        return layer if self.layout is None else self.layout.slots[layer]

    def begin(self, n: int) -> None:
        """Start a pass of ``n`` tokens (set by ``forward``)."""
        if self.length + n > self.capacity:
            raise RuntimeError(f"KV cache overflow: {self.length + n} > capacity {self.capacity}")
        self.pending, self.rows = n, None

    def update(self, key: Tensor, value: Tensor, layer_idx: int, *args, **kwargs) -> tuple[Tensor, Tensor]:
        n = self.pending or key.shape[2]
        end = self.length + n
        if end > self.capacity:
            raise RuntimeError(f"KV cache overflow: {end} > capacity {self.capacity}")
        s = self.slot(layer_idx)
        if self.layout is None or layer_idx < self.layout.external_from:
            if self.rows is None:
                self.keys[s][:, :, self.length:end] = key
                self.values[s][:, :, self.length:end] = value
            else:
                self.keys[s].index_copy_(2, self.rows, key)
                self.values[s].index_copy_(2, self.rows, value)
        return self.keys[s][:, :, :end], self.values[s][:, :, :end]

    def write(self, slot: int, key: Tensor, value: Tensor) -> None:
        """Write the current pass's K/V of one buffer directly (SwiftKV)."""
        n = key.shape[2]
        self.keys[slot][:, :, self.length:self.length + n] = key
        self.values[slot][:, :, self.length:self.length + n] = value

    def advance(self, n: int) -> None:
        self.length += n
        self.pending, self.rows = 0, None

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
        return KVCache(keys, values, self.length, self.layout)

    def slice_row(self, row: int, length: int) -> KVCache:
        """Row ``row`` trimmed to ``length`` tokens, as compact contiguous tensors (for storing an encoding)."""
        keys = [k[row: row + 1, :, :length].clone() for k in self.keys]
        values = [v[row: row + 1, :, :length].clone() for v in self.values]
        return KVCache(keys, values, length, self.layout)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def bytes_per_token(self) -> int:
        """K/V bytes one cached token takes (all buffers, one batch row)."""
        return sum(t.shape[1] * t.shape[3] * t.element_size() for t in (*self.keys, *self.values))

    # Methods some HF layers query on their cache object.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length


def _cfic_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, cfic_gqa=False, **kwargs):
    """Transformers' SDPA attention, except for calls from ``LayerRunner`` with an explicit mask on CPU.

    Those (the question, every prefix-search step, the packed teacher-forced pass) would go through ``repeat_kv``,
    which copies the whole cached K/V of every layer at every step to expand the grouped KV heads: for a 3-token
    decode step over a 2,600-token cache that copy costs ~10x the attention itself. SDPA's own ``enable_gqa``
    broadcasts the KV heads without the copy. Any other call (plain ``model(...)``) is forwarded unchanged.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    if not cfic_gqa or attention_mask is None or groups == 1 or query.device.type != "cpu":
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                         scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def _use_cfic_attention(model: nn.Module) -> bool:
    """Route the model's SDPA attention through ``_cfic_sdpa`` (identical for every caller but ``LayerRunner``)."""
    cfg = model.config
    if getattr(cfg, "_attn_implementation", None) == ATTENTION:
        return True
    if getattr(cfg, "_attn_implementation", None) != "sdpa":
        return False
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:  # an older transformers: keep its own SDPA path
        return False
    AttentionInterface.register(ATTENTION, _cfic_sdpa)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    cfg._attn_implementation = ATTENTION
    return True


class LayerRunner:
    """The model's modules, in order. Stateless apart from references to the weights (and, with SwiftKV, to the
    SwiftKV parameters: ``swiftkv``)."""

    def __init__(self, model: nn.Module, swiftkv=None):
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
        self._gqa = _use_cfic_attention(model)
        self.swiftkv = None
        self.layout = KVLayout.plain(self.num_layers)
        if swiftkv is not None:
            self.set_swiftkv(swiftkv)

    def set_swiftkv(self, swiftkv) -> None:
        """Use SwiftKV (a ``decoding.swiftkv.SwiftKV``); its layers replace ours where it changes the queries."""
        if not 0 < swiftkv.layer <= self.num_layers:
            raise ValueError(f"the SwiftKV layer must lie in [1, {self.num_layers}], got {swiftkv.layer}")
        self.swiftkv = swiftkv
        self.layout = KVLayout.swiftkv(self.num_layers, swiftkv.layer, swiftkv.group)
        self.layers = swiftkv.decoder_layers(list(self.model.model.layers))

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.embed_tokens(input_ids)

    def position_embeddings(self, hidden: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        return self.rotary_emb(hidden, positions)

    def _attention_kwargs(self, module: nn.Module, cache: KVCache | None) -> dict[str, Any]:
        """Keywords for a decoder layer or attention module: the cache (under its transformers name) and, on the
        CPU GQA path, the flag that routes it to ``_cfic_sdpa``."""
        extra: dict[str, Any] = {"cfic_gqa": True} if self._gqa else {}
        extra[_cache_keyword(type(module))] = cache
        return extra

    def run_layer(
        self,
        index: int,
        hidden: Tensor,
        rope: tuple[Tensor, Tensor],
        cache: KVCache | None,
        mask: Tensor | None,
    ) -> Tensor:
        layer = self.layers[index]
        out = layer(hidden, attention_mask=mask, position_embeddings=rope, use_cache=cache is not None,
                    **self._attention_kwargs(layer, cache))
        return out[0] if isinstance(out, tuple) else out

    def run_layer_sparse_ffn(self, index: int, state: LayerPass, ffn_columns: Tensor) -> tuple[Tensor, Tensor]:
        """The decoder layer with its FFN block run for ``ffn_columns`` only (FFN skipping): the steps of the
        Llama-family decoder layer's forward — attention for every column (so the K/V stay complete), then the FFN
        where asked. Returns the hidden states and, per column in ``ffn_columns``, cos(FFN block input, output)."""
        layer = self.layers[index]
        attended, _ = layer.self_attn(hidden_states=layer.input_layernorm(state.hidden), attention_mask=state.mask,
                                      position_embeddings=state.rope, use_cache=state.cache is not None,
                                      **self._attention_kwargs(layer.self_attn, state.cache))
        hidden = state.hidden + attended
        x = hidden[:, ffn_columns]
        y = x + layer.mlp(layer.post_attention_layernorm(x))
        cosine = F.cosine_similarity(x.float(), y.float(), dim=-1)[0]
        return hidden.index_copy(1, ffn_columns, y), cosine

    def logits(self, hidden: Tensor) -> Tensor:
        """Final norm + LM head, in float32 for stable log-softmax."""
        return self.lm_head(self.norm(hidden)).float()


@functools.cache
def _cache_keyword(layer_class: type) -> str:
    """``cache`` on transformers >= 5.2x (``past_key_values`` is deprecated there and goes away in 5.40), else
    ``past_key_values``: read from the decoder layer's own signature, once per class."""
    try:
        params = inspect.signature(layer_class.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


@dataclass
class LayerPass:
    """What flows from layer to layer in one pass: the hidden states of the columns still running, their rotary
    embeddings and mask rows, the cache, and where this pass's tokens start in it (``past``)."""

    hidden: Tensor
    rope: tuple[Tensor, Tensor]
    mask: Tensor | None
    cache: KVCache | None
    past: int


class LayerHook(Protocol):
    """How a pass runs each layer (``decoding.layerskip`` has the accelerated ones)."""

    def begin(self, runner: LayerRunner, state: LayerPass, start: int) -> None:
        """Check the pass and prepare the cache before the first layer runs."""

    def run(self, runner: LayerRunner, index: int, state: LayerPass) -> Tensor:
        """The hidden states leaving layer ``index``."""


class PlainLayers:
    """Every layer for every column."""

    def begin(self, runner: LayerRunner, state: LayerPass, start: int) -> None:
        return None

    def run(self, runner: LayerRunner, index: int, state: LayerPass) -> Tensor:
        return runner.run_layer(index, state.hidden, state.rope, state.cache, state.mask)


PLAIN = PlainLayers()


def forward(
    runner: LayerRunner,
    input_ids: Tensor,
    positions: Tensor,
    cache: KVCache | None,
    mask: Tensor | None = None,
    *,
    outputs: Tensor | None = None,
    layers: LayerHook = PLAIN,
    start: int = 0,
    hidden: Tensor | None = None,
    stop: int | None = None,
) -> Tensor:
    """Run the layers over ``input_ids`` ([batch, n]) and return the last hidden states (before the final norm).

    ``mask`` is a boolean ``[batch or 1, 1, n, cache.length + n]`` (True = may attend) or None for plain causal
    attention over a cache that starts empty. New keys are written into ``cache`` and committed.
    ``outputs``: column indices whose hidden states are returned (None: all), in that order; with SwiftKV the layers
    from the SwiftKV layer on run for these columns only. ``layers``: how each layer runs (SkipDecode or FFN
    skipping, see ``decoding.layerskip``; default every layer for every column).
    ``start``/``hidden``: resume at layer ``start`` from the hidden states entering it (distillation reuses the
    teacher's lower layers); only the cache buffers of layers ``>= start`` are written.
    ``stop``: run layers ``[start, stop)`` only and return every column's hidden states leaving them, without
    committing the cache: a second call with ``start=stop, hidden=...`` finishes the pass (the answerability probe
    reads a middle layer of the question pass this way).
    """
    n = input_ids.shape[1]
    sw = runner.swiftkv
    end = runner.num_layers if stop is None else stop
    _check_pass(runner, cache, start, end, stop is not None, hidden is not None, outputs is not None)
    if hidden is None:
        hidden = runner.embed(input_ids)
    state = LayerPass(hidden, runner.position_embeddings(hidden, positions), mask, cache,
                      cache.length if cache is not None else 0)
    if cache is not None:
        cache.begin(n)
    layers.begin(runner, state, start)
    narrowed = False
    for j in range(start, end):
        if sw is not None and j == sw.layer:
            narrowed = _swiftkv_boundary(sw, state, outputs, n)
            if narrowed and state.hidden.shape[1] == 0:
                break
        state.hidden = layers.run(runner, j, state)
    if cache is not None and stop is None:
        cache.advance(n)
    if outputs is not None and not narrowed:
        return state.hidden[:, outputs]
    return state.hidden


def _check_pass(runner: LayerRunner, cache: KVCache | None, start: int, end: int, stopped: bool, resumed: bool,
                selected: bool) -> None:
    sw = runner.swiftkv
    if sw is not None and cache is None:
        raise ValueError("SwiftKV needs a KV cache (the upper layers read K/V written from the layer-l input)")
    if start and not resumed:
        raise ValueError("forward from a middle layer needs the hidden states entering it")
    if sw is not None and start > sw.layer:
        raise ValueError("forward cannot resume above the SwiftKV layer (its K/V come from that layer's input)")
    if not start <= end <= runner.num_layers:
        raise ValueError(f"stop must lie in [{start}, {runner.num_layers}], got {end}")
    if stopped and (selected or (sw is not None and end > sw.layer)):
        raise ValueError("a pass that stops early returns every column, below the SwiftKV layer")


def _swiftkv_boundary(sw: Any, state: LayerPass, outputs: Tensor | None, n: int) -> bool:
    """SingleInputKV at the SwiftKV layer: write every column's upper-layer K/V from its input here, then keep
    only the ``outputs`` columns (True when narrowed) -- the layers above run for those alone."""
    sw.write_kv(state.cache, state.hidden, state.rope)
    if outputs is None:
        return False
    cos, sin = state.rope
    state.hidden, state.rope = state.hidden[:, outputs], (cos[:, outputs], sin[:, outputs])
    # below l a mask-free pass used is_causal (fast kernel); the narrowed rows need explicit rows
    mask = state.mask if state.mask is not None else causal_extension_mask(state.past, n, state.hidden.device)
    state.mask = mask[:, :, outputs]
    return True


def prefill(runner: LayerRunner, input_ids: Tensor, capacity: int | None = None,
            outputs: Tensor | None = None) -> KVCache:
    """Encode a batch of right-padded prompts from scratch. Causal attention means a row's padding (at its end)
    never influences its real tokens, so no padding mask is needed; callers slice each row to its true length.

    A document's encoding needs no outputs at all (the question pass reads the cache): with SwiftKV the layers from
    the SwiftKV layer on are then not run for the document, only their K/V projections."""
    batch, n = input_ids.shape
    cache = KVCache.empty(runner, batch, capacity or n)
    positions = torch.arange(n, device=input_ids.device).unsqueeze(0).expand(batch, n)
    if outputs is None and runner.swiftkv is not None:
        outputs = torch.zeros(0, dtype=torch.long, device=input_ids.device)
    forward(runner, input_ids, positions, cache, mask=None, outputs=outputs)
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
