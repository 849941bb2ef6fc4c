"""Training-side material for the abstention model: for each item (a question on a document, with or without
evidence) what the grounder sees before it decides whether to answer — per window, the last question token's hidden
state after each candidate probe layer, the end-of-evidence probability at the first answer position and the peak of
the attention ranker's reading; per item, the sentence prior's best cosines and its best (plain and fused) log prior.

Written one ``.npz`` per item into a folder, so an interrupted collection resumes where it stopped. Only training
splits are read (:func:`cfic.training.fit_abstention.training_items`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# Per-window scalars, in this order (``AbstentionMaterial.window_features``).
WINDOW_FEATURES = ("log_p_end_first", "attention_peak", "fused_peak")
# Per-item scalars (``AbstentionMaterial.item_features``).
ITEM_FEATURES = ("max_sentence_cosine", "max_paragraph_cosine", "prior_peak")


@dataclass(frozen=True)
class AbstentionMaterial:
    """``states``: [windows, layers, hidden] float32; ``window_features``: [windows, len(WINDOW_FEATURES)];
    ``item_features``: [len(ITEM_FEATURES)]."""

    states: np.ndarray
    window_features: np.ndarray
    item_features: np.ndarray


def window_material(grounder: Any, enc: Any, window: Any, ids: Sequence[int], layers: Sequence[int],
                    log_prior: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """One window's question pass as the grounder runs it (the attention tap on, split at each probe layer):
    the hidden states ``[layers, hidden]`` and the :data:`WINDOW_FEATURES`."""
    import torch

    from cfic.decoding.attention import SentenceAttentionTap, sentence_token_bounds
    from cfic.decoding.encode import window_segment_lengths
    from cfic.decoding.prefix import end_probability
    from cfic.decoding.runner import causal_extension_mask, forward

    runner = grounder.runner
    lengths = window_segment_lengths(enc, window)
    tap = SentenceAttentionTap(sentence_token_bounds(window.n_tokens - sum(lengths), list(lengths)).to(runner.device))
    cache = window.kv.fork(len(ids))
    start = cache.length
    tokens = torch.tensor([list(ids)], dtype=torch.long, device=runner.device)
    positions = torch.arange(start, start + len(ids), device=runner.device).unsqueeze(0)
    mask = causal_extension_mask(start, len(ids), runner.device)
    states = np.zeros((len(layers), runner.model.config.hidden_size), dtype=np.float32)
    hidden, done = None, 0
    for j, layer in enumerate(layers):
        hidden = forward(runner, tokens, positions, cache, mask, start=done, hidden=hidden, stop=layer, layers=tap)
        states[j] = hidden[0, -1].float().cpu().numpy()
        done = layer
    last = torch.tensor([len(ids) - 1], device=runner.device)
    hidden = forward(runner, tokens, positions, cache, mask, outputs=last, start=done, hidden=hidden, layers=tap)
    first = torch.log_softmax(runner.logits(hidden[0, -1]), dim=-1)
    p_end = end_probability(first, grounder.template.eos_ids)
    ranker = grounder.config.attention
    attention_peak = fused_peak = 0.0
    if ranker is not None:
        lp = ranker.log_probabilities(tap.result()).numpy()
        attention_peak = float(lp.max())  # how sure the LM's reading is of one sentence (0 = all on one)
        if log_prior is not None:
            fused = ranker.fused(torch.from_numpy(log_prior), window.first, tap.result()).numpy()
            fused_peak = float(fused[window.first: window.last].max())
    return states, np.array([np.log(max(p_end, 1e-9)), attention_peak, fused_peak], dtype=np.float32)


def collect(folder: str | Path, items: Sequence[Any], grounder: Any, layers: Sequence[int],
            progress: bool = True) -> Path:
    """Write each item's :class:`AbstentionMaterial` as ``<folder>/<index>.npz`` (existing files are kept)."""
    import torch
    from tqdm.auto import tqdm

    from cfic.prior import SentencePrior

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cached: tuple[str, Any] | None = None
    cfg = grounder.config
    for i, item in enumerate(tqdm(items, desc="abstention material", unit="q", disable=not progress)):
        path = folder / f"{i:05d}.npz"
        if path.exists():
            continue
        if cached is None or cached[0] != item.doc_key:
            cached = (item.doc_key, grounder.encode(list(item.documents))[0])
        enc = cached[1]
        signals = grounder._signals(item.question, [enc])
        log_prior = None if signals is None else SentencePrior.log_priors(signals, cfg.prior)[0]
        ids = grounder.template.query_ids(grounder.tokenizer, item.question, cfg.max_query_tokens)
        with torch.inference_mode():
            parts = [window_material(grounder, enc, w, ids, layers, log_prior) for w in enc.windows]
        sig = signals[0] if signals is not None else np.zeros((1, 2), dtype=np.float32)
        item_features = np.array([float(sig[:, 0].max()), float(sig[:, 1].max()),
                                  float(log_prior.max()) if log_prior is not None else 0.0], dtype=np.float32)
        tmp = path.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, states=np.stack([p[0] for p in parts]).astype(np.float16),
                            window_features=np.stack([p[1] for p in parts]), item_features=item_features,
                            question=np.array(item.question))
        tmp.replace(path)
    return folder


def load(folder: str | Path, items: Sequence[Any]) -> list[AbstentionMaterial]:
    """The material of ``items`` (in order); refuses a folder collected for other items."""
    from cfic.errors import CficError

    out = []
    for i, item in enumerate(items):
        path = Path(folder) / f"{i:05d}.npz"
        if not path.is_file():
            raise CficError(f"abstention material {path} is missing: collect it first")
        with np.load(path) as z:
            if str(z["question"]) != item.question:
                raise CficError(f"abstention material {path} was collected for another question")
            out.append(AbstentionMaterial(z["states"].astype(np.float32), z["window_features"], z["item_features"]))
    return out
