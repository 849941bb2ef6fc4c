"""``cfic fit-query-heads``: train a low-rank change of a few layers' queries so the attention ranker's heads rank
evidence (issue 29, round 11), on the training side only.

Why: six forms of re-weighting the heads' attention as the LM computes it (rounds 6-9) never lifted NQ's top-3
answer hit above the prior's; the heads' queries were made for predicting the next token, not for finding the
sentence that answers. Here the rotated queries of ``LAYERS`` (all below the SwiftKV layer, so every question
token runs them) get ``q + (q a) b`` per head (:class:`~cfic.decoding.attention.QueryUpdate`, rank ``RANK``),
trained through the shipped ranker's own scoring and fusion (its weights stay) with a listwise loss: the fused
search score's log-softmax mass on the answer-bearing sentences. Only the attention the ranker reads changes; the
layer's output, the evidence's text and the LM's predictions stay the model's (the tap recomputes the weights).

Material: per question, the question pass's rotated queries of ``LAYERS`` and the cached keys they attend to (about
5 MB; ``runs/query-heads``, not committed; an interrupted collection resumes), the ranker's features of every layer,
the log prior and the answer sentences. Documents that need more than one window are left out (NQ and HotpotQA
documents fit one). Sources: NQ train after ``cfic fit-prior``'s questions (460 on) and HotpotQA train.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

LAYERS = (7, 11, 12, 13, 14)
RANK = 4
NQ_OFFSET = 460  # after cfic fit-prior's NQ questions (0-459), as cfic fit-attention reads
QUERY_RANKER_FILE = "attention_ranker_queries.safetensors"  # the adapter's ranker with the learned query update


def collect(grounder: Any, examples: list[tuple[str, Any]], folder: Path, progress: bool = True,
            layers: tuple[int, ...] = LAYERS) -> int:
    """Write one ``.pt`` per (source, example) into ``folder``; returns how many multi-window documents were left
    out. Existing files are kept (resume)."""
    from tqdm.auto import tqdm

    from cfic.decoding.attention import SentenceAttentionTap, _queries, sentence_token_bounds
    from cfic.decoding.encode import question_pass, window_segment_lengths
    from cfic.eval.metrics import contains_answer
    from cfic.prior import SentencePrior

    class CapturingTap(SentenceAttentionTap):
        """The ranker's tap, also keeping the chosen layers' rotated queries and the keys they attend to."""

        def __init__(self, bounds: torch.Tensor) -> None:
            super().__init__(bounds)
            self.queries: dict[int, torch.Tensor] = {}
            self.keys: dict[int, torch.Tensor] = {}

        def run(self, runner: Any, index: int, state: Any) -> torch.Tensor:
            if index in layers:
                self.queries[index] = _queries(runner, index, state)[0].half()  # [heads, rows, dim]
            out = super().run(runner, index, state)
            if index in layers:
                cache = state.cache
                self.keys[index] = cache.keys[cache.slot(index)][0, :, : cache.length + cache.pending].half()
            return out

    cfg = grounder.config
    folder.mkdir(parents=True, exist_ok=True)
    skipped = 0
    for source, ex in tqdm(examples, desc="query heads: question passes", unit="q", disable=not progress):
        out = folder / f"{source}-{ex.id}.pt"
        if out.exists() or not ex.answers:
            continue
        encodings = grounder.encode(list(ex.documents))
        if len(encodings) != 1 or len(encodings[0].windows) != 1:
            skipped += 1
            continue
        enc, window = encodings[0], encodings[0].windows[0]
        log_prior = SentencePrior.log_priors(grounder._signals(ex.question, encodings), cfg.prior)[0]
        ids = grounder.template.query_ids(grounder.tokenizer, ex.question, cfg.max_query_tokens)
        lengths = window_segment_lengths(enc, window)
        tap = CapturingTap(sentence_token_bounds(window.n_tokens - sum(lengths), lengths).to(grounder.runner.device))
        with torch.inference_mode():
            att = question_pass(grounder.runner, window, ids, 0, tap=tap).attention
        start = window.n_tokens  # the cache length the question continues
        answer = [contains_answer(s.text, ex.answers) for s in enc.sentences[window.first: window.last]]
        dim = tap.queries[layers[0]].shape[-1]
        scales = [float(getattr(grounder.runner.layers[i].self_attn, "scaling", dim ** -0.5)) for i in layers]
        partial = out.with_suffix(".partial")  # renamed when whole: an interrupted run never leaves half a file
        torch.save({"source": source, "id": ex.id, "doc_start": start, "bounds": tap.bounds.cpu(),
                    "layers": list(layers), "scale": scales,
                    "queries": torch.stack([tap.queries[i] for i in layers]).cpu(),
                    "keys": torch.stack([tap.keys[i] for i in layers]).cpu(),
                    "last": att.last.float().cpu(), "mean": att.mean.float().cpu(), "tokens": att.tokens.cpu(),
                    "log_prior": torch.from_numpy(log_prior[window.first: window.last].copy()),
                    "answer": torch.tensor(answer)}, partial)
        partial.replace(out)
    return skipped


def load_items(folder: Path, examples: list[tuple[str, Any]] | None = None) -> list[dict]:
    """The collected material with at least one answer sentence (the loss needs one); ``examples``: only theirs."""
    paths = (sorted(folder.glob("*.pt")) if examples is None
             else [folder / f"{source}-{ex.id}.pt" for source, ex in examples])
    items = [torch.load(p, weights_only=True) for p in paths if p.is_file()]
    return [it for it in items if bool(it["answer"].any())]


def fused_scores(item: dict, ranker: Any, update: Any | None) -> torch.Tensor:
    """The search's fused per-sentence scores for one item (``AttentionRanker.fused``), with the ranker's features
    of the item's layers recomputed from the stored queries (changed by ``update``) and keys."""
    from cfic.decoding.attention import SentenceAttention, sentence_attention_masses
    from cfic.decoding.runner import causal_extension_mask

    rows = item["queries"].shape[2]
    mask = causal_extension_mask(item["doc_start"], rows, torch.device("cpu"))
    last, mean = item["last"].float(), item["mean"].float()
    new_last, new_mean = [], []
    layers = tuple(item.get("layers", LAYERS))
    for i, layer in enumerate(layers):
        q = item["queries"][i].float().unsqueeze(0)
        if update is not None:
            q = update.apply(layer, q)
        scale = item["scale"][i] if isinstance(item["scale"], list) else item["scale"]
        masses = sentence_attention_masses(q[0], item["keys"][i], item["bounds"], scale, mask)
        new_last.append(masses[:, -1])
        new_mean.append(masses.mean(1))
    idx = torch.tensor(layers)
    last = last.index_put((idx,), torch.stack(new_last))
    mean = mean.index_put((idx,), torch.stack(new_mean))
    return ranker.fused(item["log_prior"].float(), 0, SentenceAttention(last, mean, item["tokens"]))


def train_update(items: list[dict], ranker: Any, epochs: int, lr: float = 3e-3, l2: float = 1e-3, rank: int = RANK,
                 seed: int = 0, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Adam on the listwise loss, one question per step; ``b`` starts at 0 (the heads' own queries)."""
    from tqdm.auto import tqdm

    from cfic.decoding.attention import QueryUpdate

    layers = tuple(items[0].get("layers", LAYERS))
    heads, dim = items[0]["queries"].shape[1], items[0]["queries"].shape[3]
    gen = torch.Generator().manual_seed(seed)
    a = torch.nn.Parameter(torch.randn(len(layers), heads, dim, rank, generator=gen) / dim ** 0.5)
    b = torch.nn.Parameter(torch.zeros(len(layers), heads, rank, dim))
    update = QueryUpdate(layers, a, b)
    opt = torch.optim.Adam([a, b], lr=lr)
    order = np.random.default_rng(seed)
    for _ in tqdm(range(epochs), desc="query heads: epochs", disable=not progress):
        for i in order.permutation(len(items)):
            logp = torch.log_softmax(fused_scores(items[i], ranker, update), 0)
            loss = -torch.logsumexp(logp[items[i]["answer"]], 0) + l2 * (b ** 2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return a.detach().numpy().copy(), b.detach().numpy().copy()


def _hit(scores: torch.Tensor, answer: torch.Tensor, n: int) -> bool:
    return bool(answer[torch.argsort(-scores, stable=True)[:n]].any())


def cross_validate(items: list[dict], ranker: Any, folds: int, epochs: int, lr: float, l2: float,
                   progress: bool = True) -> dict[str, Any]:
    """Held-out top-3 / top-5 answer hit per source of the prior, the shipped fusion and the learned queries, with
    the learned minus the prior and minus the shipped fusion (paired bootstrap 95%)."""
    from tqdm.auto import tqdm

    from cfic.eval.compare import paired_bootstrap

    fold_of = np.random.default_rng(0).integers(0, folds, len(items))
    rows: list[dict[str, Any]] = []
    for fold in tqdm(range(folds), desc="query heads: folds", disable=not progress):
        train = [it for it, f in zip(items, fold_of, strict=True) if f != fold]
        a, b = train_update(train, ranker, epochs, lr, l2, seed=fold)
        learned = ranker.with_query_update(tuple(items[0].get("layers", LAYERS)), a, b)
        with torch.no_grad():
            for it in (it for it, f in zip(items, fold_of, strict=True) if f == fold):
                scores = {"prior": it["log_prior"], "shipped": fused_scores(it, ranker, None),
                          "learned": fused_scores(it, learned, learned.query_update)}
                rows.append({"source": it["source"], **{f"{k}@{n}": _hit(v, it["answer"], n)
                                                        for k, v in scores.items() for n in (3, 5)}})
    report: dict[str, Any] = {}
    for source in sorted({r["source"] for r in rows}):
        mine = [r for r in rows if r["source"] == source]
        entry: dict[str, Any] = {"n": len(mine)}
        for n in (3, 5):
            col = {k: [float(r[f"{k}@{n}"]) for r in mine] for k in ("prior", "shipped", "learned")}
            entry[f"top{n}"] = {k: float(np.mean(v)) for k, v in col.items()}
            for other in ("prior", "shipped"):
                d, lo, hi = paired_bootstrap(col["learned"], col[other])
                entry[f"top{n}"][f"learned_minus_{other}"] = {"difference": d, "low": lo, "high": hi}
        report[source] = entry
    return report


def fit_query_heads(material: str | Path = "runs/query-heads", n_nq: int = 400, n_hotpot: int = 100,
                    adapter: str | None = None, epochs: int = 6, folds: int = 4, lr: float = 3e-3, l2: float = 1e-3,
                    progress: bool = True, enable: bool = False) -> dict[str, Any]:
    """Collect, cross-validate, fit on all the material and write the ranker with the query update next to the
    adapter's ranker (``QUERY_RANKER_FILE``; ``cfic.json``: ``attention.query_update`` with the report and
    ``enabled``, which makes grounding use it)."""
    from cfic.errors import CficError
    from cfic.eval import load_split
    from cfic.grounder import Grounder
    from cfic.models import ADAPTER_SETTINGS
    from cfic.training.adapter_files import adapter_folder, update_settings

    t0 = time.time()
    folder = adapter_folder(adapter, "the query heads")
    grounder = Grounder.from_pretrained(None, adapter=folder)
    ranker, prior = grounder.config.attention, grounder.config.prior
    if ranker is None or prior is None:
        raise CficError("fit-query-heads trains through the adapter's attention ranker and prior: run cfic "
                        "fit-prior and cfic fit-attention first")
    if ranker.calibrated:
        raise CficError("fit-query-heads does not train a calibrated ranker (it would need the content-free "
                        "question's pass too): refit with cfic fit-attention")
    sw = grounder.runner.swiftkv
    if sw is not None and sw.layer <= max(LAYERS):
        raise CficError(f"SwiftKV from layer {sw.layer} runs only the question's last token at layers {LAYERS}")
    base = ranker.with_query_update((), None, None)  # the adapter's ranker, reading the heads' own queries
    examples = [("nq", ex) for ex in load_split("nq", "train")[NQ_OFFSET: NQ_OFFSET + n_nq]]
    examples += [("hotpotqa", ex) for ex in load_split("hotpotqa", "train")[:n_hotpot]]
    skipped = collect(grounder, examples, Path(material), progress)
    items = load_items(Path(material), examples)
    if not items or any(tuple(it.get("layers", LAYERS)) != LAYERS for it in items):
        raise CficError(f"{material}: no material, or material of other layers than {LAYERS} (use a fresh folder)")
    cv = cross_validate(items, base, folds, epochs, lr, l2, progress)
    a, b = train_update(items, base, epochs, lr, l2, progress=progress)
    fitted = base.with_query_update(LAYERS, a, b)
    report = {"layers": list(LAYERS), "rank": RANK, "epochs": epochs, "lr": lr, "l2": l2, "folds": folds,
              "items": {s: sum(it["source"] == s for it in items) for s in sorted({it["source"] for it in items})},
              "skipped_multi_window": skipped, "cross_validated": cv,
              "source": f"training splits only: nq train {NQ_OFFSET}-{NQ_OFFSET + n_nq - 1}, hotpotqa train "
                        f"0-{n_hotpot - 1}", "seconds": round(time.time() - t0, 1)}
    fitted.save(folder / QUERY_RANKER_FILE, {"source": report["source"], "items": json.dumps(report["items"])})
    update_settings(folder / ADAPTER_SETTINGS, lambda s: s["attention"].update(
        {"query_update": {"file": QUERY_RANKER_FILE, "enabled": enable, "fit": report}}))
    return report
