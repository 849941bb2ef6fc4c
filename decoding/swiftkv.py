"""SwiftKV (Snowflake, arXiv 2410.03960) for cfic: SingleInputKV and AcrossKV over the model's own decoder layers.

SingleInputKV: for every layer ``j >= l`` the K/V of a token are computed from one input, ``s = norm(x_l)`` (``x_l``
= the hidden state entering layer ``l``), as ``K_j = k_proj_j(s)``, ``V_j = v_proj_j(s)`` (plus the layer's own
``k_norm`` and rotary embedding). Tokens whose outputs nobody reads then run layers ``>= l`` not at all — for cfic
that is the whole document (the question pass reads only the cache), the question except its last token, and the
teacher-forced skip-decoding tokens except those at sentence ends. AcrossKV: one K/V per group of ``group``
adjacent layers from ``l`` on (the cache keeps one buffer per group).

Zero-training initialisation ("own norm"): the norm is a plain RMS normalisation (weight 1) and each layer's own
input-norm weight is folded into its projections, ``k_proj_j' = k_proj_j * w_j`` — so layer ``l`` itself is exact
and layers ``> l`` apply their own norm and projections to ``x_l`` instead of ``x_j``. With AcrossKV a group's
projection starts as the mean of its layers' (folded) projections, as in SwiftKV. Distillation
(``cfic.training.distill``) trains the norm, the K/V projections and an optional low-rank correction of the queries
of layers ``>= l``; ``save``/``load`` keep those in a small safetensors file tied to the model by a weight fingerprint.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from cfic.errors import CficError, require_positive_int
from cfic.files import read_safetensors, write_atomic

if TYPE_CHECKING:
    from cfic.models import LoadedModel

FORMAT = "cfic-swiftkv/1"


class LowRankLinear(nn.Module):
    """``base(x) + scale * B(A(x))`` with ``base`` frozen: the distilled query correction of one layer. ``B`` starts
    at zero, so an untrained correction changes nothing; at inference the sum is merged into one weight."""

    def __init__(self, base: nn.Linear, rank: int, scale: float = 1.0):
        super().__init__()
        object.__setattr__(self, "base", base)  # not a submodule: the model owns it (and it stays frozen)
        self.scale = scale
        init = torch.randn(rank, base.in_features, dtype=base.weight.dtype) / math.sqrt(base.in_features)
        self.A = nn.Parameter(init)
        self.B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype))
        object.__setattr__(self, "_merged", None)  # a cache, never a submodule (not saved)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return self.merged()(x)
        return self.base(x) + (x @ self.A.t()) @ self.B.t() * self.scale

    def merged(self) -> nn.Linear:
        if self._merged is None:
            with torch.no_grad():
                lin = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                                dtype=self.base.weight.dtype, device=self.base.weight.device)
                lin.weight.copy_(self.base.weight + self.scale * (self.B.float() @ self.A.float()).to(lin.weight.dtype))
                if self.base.bias is not None:
                    lin.bias.copy_(self.base.bias)
            lin.requires_grad_(False)
            object.__setattr__(self, "_merged", lin)
        return self._merged

    def forget_merged(self) -> None:
        object.__setattr__(self, "_merged", None)

    def train(self, mode: bool = True) -> LowRankLinear:
        self.forget_merged()
        return super().train(mode)

    def _apply(self, fn, recurse=True):
        self.forget_merged()
        return super()._apply(fn, recurse)


def _with_query(layer: nn.Module, q_proj: nn.Module) -> nn.Module:
    """A shallow copy of an HF decoder layer whose attention uses ``q_proj``; every other weight is shared."""
    attn = copy.copy(layer.self_attn)
    attn._modules = dict(attn._modules)
    attn._modules["q_proj"] = q_proj
    new = copy.copy(layer)
    new._modules = dict(new._modules)
    new._modules["self_attn"] = attn
    return new


def _rounded_bytes(t: Tensor) -> bytes:
    """Bytes that do not depend on the dtype the model was loaded in (float32 or bfloat16 weights agree)."""
    return t.detach().float().to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes()


FINGERPRINT_VERSION = 3
# Set by ``cfic.models.load_model`` when it merges an adapter: (what the weights were built from -- the base weights'
# version-2 print and the adapter's file hash --, the version-2 print of the merged weights as loaded).
WEIGHTS_ID_ATTR = "cfic_weights_id"


def model_fingerprint(model: nn.Module, version: int = FINGERPRINT_VERSION) -> str:
    """Short hash of the model's shape and a sample of its weights: distilled SwiftKV parameters are only valid for
    the exact weights they were trained against (e.g. not after a LoRA adapter was merged).

    Version 2 samples the first rows of every weight of every decoder layer (any merged LoRA, whatever modules it
    targets — PEFT's default for Llama is q_proj and v_proj only — changes them) plus every norm; version 1 (files
    written before it) sampled only k_proj and down_proj, which a q/v-only adapter leaves alone.

    Version 3 is the id ``cfic.models.load_model`` records (``WEIGHTS_ID_ATTR``): the base weights' version-2 print
    and the merged adapter's file hash. Merged weights themselves differ in the last bit between a float32 and a
    bfloat16 merge, so a version-2 print of them ties a file to the dtype it was distilled in; base weights do not
    (they are exact in both). A model not loaded by ``load_model``, or whose weights changed since (the recorded
    merged print no longer matches), falls back to the version-2 print."""
    if version == 3:
        now = model_fingerprint(model, 2)
        recorded = getattr(model, WEIGHTS_ID_ATTR, None)
        return recorded[0] if isinstance(recorded, tuple) and recorded[1] == now else now
    core = model.model
    cfg = model.config
    h = hashlib.sha256()
    h.update(json.dumps([type(model).__name__, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads,
                         cfg.num_key_value_heads, cfg.vocab_size]).encode())
    h.update(_rounded_bytes(core.embed_tokens.weight[:256]))
    if version == 1:
        for layer in core.layers:
            h.update(_rounded_bytes(layer.self_attn.k_proj.weight[:8]))
            h.update(_rounded_bytes(layer.mlp.down_proj.weight[:8]))
        return h.hexdigest()[:16]
    if version != 2:
        raise ValueError(f"unknown weight fingerprint version {version}")
    for layer in core.layers:
        for name, param in sorted(layer.named_parameters()):
            h.update(name.encode())
            h.update(_rounded_bytes(param[:8]))
    h.update(_rounded_bytes(core.norm.weight))
    return h.hexdigest()[:16]


class SwiftKV(nn.Module):
    """The SingleInputKV/AcrossKV parameters of one model (its weights are not copied, only referenced)."""

    def __init__(self, model: nn.Module, layer: int, group: int = 1, *, q_rank: int = 0, q_scale: float = 1.0):
        super().__init__()
        layers = list(model.model.layers)
        n = len(layers)
        if not isinstance(layer, int) or not 1 <= layer <= n:
            raise ValueError(f"the SwiftKV layer must lie in [1, {n}], got {layer!r}")
        require_positive_int("the AcrossKV group size", group)
        self.layer, self.group, self.num_layers = layer, group, n
        self.q_rank, self.q_scale = q_rank, q_scale
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_layers", layers)
        ref = layers[min(layer, n - 1)]
        self.norm = copy.deepcopy(ref.input_layernorm)
        param = next(model.parameters())
        self.norm.to(dtype=param.dtype, device=param.device)
        with torch.no_grad():
            self.norm.weight.fill_(1.0)
        self.k_proj, self.v_proj = nn.ModuleList(), nn.ModuleList()
        for g in range(self.num_groups):
            members = [layers[j] for j in range(layer + g * group, min(n, layer + (g + 1) * group))]
            self.k_proj.append(self._mean_projection([(m.self_attn.k_proj, m.input_layernorm) for m in members]))
            self.v_proj.append(self._mean_projection([(m.self_attn.v_proj, m.input_layernorm) for m in members]))
        self.q_proj = nn.ModuleList(
            [LowRankLinear(layers[j].self_attn.q_proj, q_rank, q_scale) for j in range(layer, n)] if q_rank else []
        )
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def _mean_projection(parts: list[tuple[nn.Linear, nn.Module]]) -> nn.Linear:
        first = parts[0][0]
        lin = nn.Linear(first.in_features, first.out_features, bias=first.bias is not None,
                        dtype=first.weight.dtype, device=first.weight.device)
        with torch.no_grad():
            lin.weight.copy_(torch.stack([p.weight.float() * norm.weight.float()[None, :] for p, norm in parts])
                             .mean(0).to(lin.weight.dtype))
            if first.bias is not None:
                lin.bias.copy_(torch.stack([p.bias.float() for p, _ in parts]).mean(0).to(lin.bias.dtype))
        return lin

    @property
    def num_groups(self) -> int:
        return math.ceil((self.num_layers - self.layer) / self.group)

    def decoder_layers(self, layers: list[nn.Module]) -> list[nn.Module]:
        """The decoder layers the runner calls: the model's own, with the corrected query projection where distilled."""
        if not self.q_rank:
            return list(layers)
        return [*layers[: self.layer], *(_with_query(layers[j], self.q_proj[j - self.layer])
                                         for j in range(self.layer, self.num_layers))]

    def _rope(self, layer: int, key: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """The rotary embedding exactly as the layer's own modeling file applies it."""
        attn = self._layers[layer].self_attn
        fn = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        return fn(key[:, :0], key, cos, sin)[1]  # an empty query: only the keys are rotated

    def kv(self, hidden: Tensor, rope: tuple[Tensor, Tensor]) -> list[tuple[Tensor, Tensor]]:
        """K/V ``[batch, kv_heads, n, head_dim]`` of every group, from the hidden states entering layer ``l``.
        (One projection per group: fusing them into one matrix multiply measured twice as slow on CPU, from the
        strided copies it needs afterwards.)"""
        s = self.norm(hidden)
        cos, sin = rope
        b, n, _ = hidden.shape
        out = []
        for g, (kp, vp) in enumerate(zip(self.k_proj, self.v_proj, strict=True)):
            first = self.layer + g * self.group
            attn = self._layers[first].self_attn
            head_dim = attn.head_dim
            k = kp(s).view(b, n, -1, head_dim)
            if getattr(attn, "k_norm", None) is not None:
                k = attn.k_norm(k)
            k = self._rope(first, k.transpose(1, 2), cos, sin)
            v = vp(s).view(b, n, -1, head_dim).transpose(1, 2)
            out.append((k, v))
        return out

    def write_kv(self, cache, hidden: Tensor, rope: tuple[Tensor, Tensor]) -> None:
        """Fill the current pass's K/V of layers ``>= l`` in ``cache`` (one buffer per AcrossKV group)."""
        for g, (k, v) in enumerate(self.kv(hidden, rope)):
            cache.write(cache.slot(self.layer + g * self.group), k.to(cache.keys[0].dtype),
                        v.to(cache.values[0].dtype))

    def digest(self) -> str:
        """Hash of the parameters (part of the document-encoding key)."""
        h = hashlib.sha256(json.dumps([self.layer, self.group, self.q_rank, self.q_scale]).encode())
        for name, t in sorted(self.state_dict().items()):
            h.update(name.encode())
            h.update(_rounded_bytes(t))
        return h.hexdigest()[:16]

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path, *, model_name: str = "", info: dict | None = None,
             dtype: torch.dtype = torch.bfloat16) -> Path:
        """Write the parameters (``dtype``; bfloat16 halves the file) with what ties them to the model."""
        from safetensors.torch import save

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to(dtype).contiguous().cpu() for k, v in self.state_dict().items()}
        meta = {"format": FORMAT, "layer": str(self.layer), "group": str(self.group), "q_rank": str(self.q_rank),
                "q_scale": str(self.q_scale), "num_layers": str(self.num_layers),
                "fingerprint": model_fingerprint(self._model), "fingerprint_version": str(FINGERPRINT_VERSION),
                "model_name": model_name,
                "info": json.dumps(info or {})}
        write_atomic(path, save(tensors, metadata=meta))
        return path

    @classmethod
    def load(cls, path: str | Path, model: nn.Module, *, check: bool = True) -> SwiftKV:
        """Distilled parameters for ``model``; raises ValueError when the file does not belong to this model."""
        meta, tensors = read_safetensors(path, "pt", "SwiftKV parameters")
        if meta.get("format") != FORMAT:
            raise ValueError(f"SwiftKV parameters {str(path)!r}: unknown format {meta.get('format')!r}")
        n = len(model.model.layers)
        if int(meta["num_layers"]) != n:
            raise ValueError(f"SwiftKV parameters {str(path)!r} are for a {meta['num_layers']}-layer model, not {n}")
        version = int(meta.get("fingerprint_version") or 1)
        if check and meta.get("fingerprint") != (own_print := model_fingerprint(model, version)):
            raise ValueError(f"SwiftKV parameters {str(path)!r} were distilled for other weights "
                             f"({meta.get('model_name') or 'unknown model'}, weight fingerprint "
                             f"{meta.get('fingerprint')}; this model's is {own_print}: a merged LoRA adapter changes "
                             "it too): load the model they were distilled for (e.g. without the adapter: "
                             "--no-adapter / adapter=None) or re-run cfic distill-swiftkv against this one")
        sw = cls(model, int(meta["layer"]), int(meta["group"]), q_rank=int(meta["q_rank"]),
                 q_scale=float(meta["q_scale"]))
        own = sw.state_dict()
        if set(tensors) != set(own):
            raise ValueError(f"SwiftKV parameters {str(path)!r}: unexpected tensors")
        sw.load_state_dict({k: v.to(own[k].dtype) for k, v in tensors.items()})
        for q in sw.q_proj:
            q.forget_merged()
        sw.info = json.loads(meta.get("info") or "{}")
        sw.source = str(path)
        return sw

    @staticmethod
    def read_header(path: str | Path) -> dict[str, str]:
        """The metadata of a parameter file (layer, group, model name, training info) without loading it."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})


# ---------------------------------------------------------------- choosing the parameters
def bundled_swiftkv(model_name: str) -> str | None:
    """The distilled SwiftKV parameters shipped for ``model_name`` (``cfic/data/swiftkv-<name>.safetensors``; a
    model with an adapter merged has its own name, e.g. ``smollm2-135m-instruct+cfic-lora``)."""
    from importlib import resources

    path = resources.files("cfic").joinpath(f"data/swiftkv-{model_name}.safetensors")
    return str(path) if path.is_file() else None


def load_swiftkv(loaded: LoadedModel, swiftkv: str | os.PathLike | SwiftKV | None) -> SwiftKV | None:
    """Distilled SwiftKV parameters for ``loaded``: ``"auto"`` (the default: the file shipped for exactly these
    weights when there is one, else none), ``"bundled"`` (that file -- with the CFIC adapter merged, its own file --
    else the base model's, which the weight-fingerprint check then refuses with a message saying why), a file, an
    already loaded :class:`SwiftKV`, or ``None`` / ``"none"`` (off)."""
    if swiftkv is None or isinstance(swiftkv, SwiftKV):
        return swiftkv
    path = swiftkv
    if str(swiftkv) == "none":
        return None
    if str(swiftkv) == "auto":
        path = bundled_swiftkv(loaded.name)
        if path is None:
            return None
    elif str(swiftkv) == "bundled":
        path = bundled_swiftkv(loaded.name) or bundled_swiftkv(loaded.name.split("+")[0])
        if path is None:
            raise CficError(f"no bundled SwiftKV parameters for {loaded.name}; pass a file from cfic distill-swiftkv")
    try:
        return SwiftKV.load(path, loaded.model)
    except ValueError as exc:
        raise CficError(str(exc)) from exc


def configure_swiftkv(model: nn.Module, params: SwiftKV | None, layer: int | None, group: int
                      ) -> tuple[SwiftKV | None, int | None, int]:
    """The SwiftKV a grounder runs with, and the ``(swiftkv_layer, swiftkv_group)`` its configuration then says.

    Distilled ``params`` set the layout (a configuration that names another is refused); a layer alone runs
    zero-training SwiftKV (the model's own projections) there; AcrossKV needs a layer."""
    n_layers = len(model.model.layers) if hasattr(model, "model") else 0
    if params is not None:
        if layer not in (None, params.layer) or group not in (1, params.group):
            raise CficError(f"the SwiftKV parameters are for layer {params.layer}, group {params.group}; "
                            f"swiftkv_layer={layer}, swiftkv_group={group} differ")
        return params, params.layer, params.group
    if layer is not None:
        if layer > n_layers:
            raise CficError(f"swiftkv_layer {layer} exceeds the model's {n_layers} layers")
        return SwiftKV(model, layer, group), layer, group
    if group != 1:
        raise CficError("swiftkv_group (AcrossKV) needs swiftkv_layer")
    return None, layer, group
