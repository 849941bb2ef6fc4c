"""Constrained Sentence Prefix Decoding (CFIC): find where the evidence starts.

Decoding may only follow the document's sentence trie. At every step each live prefix is extended by its allowed
next tokens only (gathered from the full-vocabulary log-softmax, so scores are the model's real probabilities), the
top-k prefixes by average log-probability survive, and a prefix stops as soon as it identifies one sentence. The
surviving prefixes are fed together, one ``decode_step`` per step (packed after the shared document + question with a
tree mask, so forking a prefix never copies the cache).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cfic.decoding.layerskip import FFNSkip, LayerSkip
from cfic.decoding.runner import KVCache, LayerRunner
from cfic.decoding.step import Branch, decode_step
from cfic.decoding.trie import SentenceTrie


@dataclass(frozen=True)
class Prefix:
    """A decoded sentence prefix.

    ``tokens``: the chosen tokens t1..tn. ``positions``: cache positions of the tokens already fed to the model, a
    leading run t1..t(n-1) (tn is chosen but not yet fed; none are fed when the search ran without LM steps).
    ``sentences``: the sentence(s) it identifies once finished.
    """

    node: int
    tokens: tuple[int, ...]
    logprob_sum: float
    positions: tuple[int, ...]
    sentences: tuple[int, ...] | None = None
    prior: float = 0.0  # log prior mass of the sentences this prefix can still become (0 without a prior)

    @property
    def score(self) -> float:
        """Average log-probability per token (the CFIC ranking criterion)."""
        return self.logprob_sum / max(1, len(self.tokens))


@dataclass(frozen=True)
class SearchPrior:
    """A per-sentence log prior for one window's search: a prefix ranks by ``lm_weight * score + prior`` where
    ``prior`` is the log of the prior mass of the sentences below its trie node (it can only shrink as the prefix
    grows, so early steps keep the sentences the prior likes in the beam)."""

    log_prior: Tensor  # (document sentences,) float32, log-normalised over all documents of the question
    lm_weight: float = 1.0

    def mass(self, sentences: list[int]) -> float:
        """log of the prior mass of ``sentences`` (a trie node's sentences, or those ending at it)."""
        return float(torch.logsumexp(self.log_prior[sentences], dim=0))


def rank(prefix: Prefix, prior: SearchPrior | None) -> float:
    """What the search maximises: the average log-probability, plus the prior when there is one."""
    return prefix.score if prior is None else prior.lm_weight * prefix.score + prefix.prior


def _expand(trie: SentenceTrie, prefix: Prefix, logprobs: Tensor, top_k: int,
            prior: SearchPrior | None = None) -> list[Prefix]:
    """The best ``top_k`` one-token extensions of ``prefix`` inside the trie by :func:`rank` (never empty)."""
    out: list[Prefix] = []
    node = trie.nodes[prefix.node]
    if node.terminal and node.children:
        # A sentence ends here while longer ones continue: finishing is an option that costs no token.
        p_term = prior.mass(node.terminal) if prior is not None else 0.0
        out.append(Prefix(prefix.node, prefix.tokens, prefix.logprob_sum, prefix.positions, tuple(node.terminal),
                          p_term))
    allowed = trie.child_tokens(prefix.node)
    if allowed.numel() == 0:
        return out
    scores = logprobs.index_select(0, allowed.to(logprobs.device)).float().cpu()
    children = [trie.child(prefix.node, t) for t in allowed.tolist()]
    priors = torch.zeros(len(children))
    ranked = scores
    if prior is not None:
        priors = torch.tensor([prior.mass(trie.nodes[c].sentences) for c in children])
        n = len(prefix.tokens) + 1
        ranked = prior.lm_weight * (prefix.logprob_sum + scores) / n + priors
    best = torch.topk(ranked, k=min(top_k, allowed.numel()))
    for idx in best.indices.tolist():
        token, child = int(allowed[idx]), children[idx]
        out.append(Prefix(child, (*prefix.tokens, token), prefix.logprob_sum + float(scores[idx]), prefix.positions,
                          trie.identified(child), float(priors[idx])))
    return out


def constrained_prefix_search(
    runner: LayerRunner,
    cache: KVCache,
    first_logprobs: Tensor,
    trie: SentenceTrie,
    top_k: int,
    max_steps: int,
    layer_skip: LayerSkip | FFNSkip | None = None,
    prior: SearchPrior | None = None,
    lm_steps: bool | None = None,
) -> list[Prefix]:
    """Top-k constrained prefix search over ``trie`` after the question in ``cache``.

    ``first_logprobs``: log-probabilities of the first answer token. ``cache`` holds document + question and gets the
    decoded tokens appended (positions recorded per prefix). Returns up to ``top_k`` finished prefixes, best first.
    ``layer_skip``: SkipDecode schedule by answer offset (every live prefix has the same length, so one step's tokens
    share one offset). ``prior``: rank prefixes by the LM and a per-sentence prior together (:func:`rank`).
    ``lm_steps``: feed each step's tokens to the model (default: unless the prior's LM weight is 0 — then the LM's
    log-probabilities cannot change the ranking, the walk down the trie is the prior's alone and costs no forward
    pass; the prefixes come back unfed, and skip decoding teacher-forces them with the rest of the span).
    """
    if lm_steps is None:
        lm_steps = prior is None or prior.lm_weight != 0.0
    if not lm_steps and prior is None:
        raise ValueError("a search without LM steps needs a prior to rank by")
    shared = cache.length  # document + question: seen by every prefix
    live = [Prefix(SentenceTrie.ROOT, (), 0.0, ())]
    rows = first_logprobs.unsqueeze(0)
    # without LM steps every log-probability weighs 0 in the ranking
    unscored = None if lm_steps else torch.zeros_like(first_logprobs)
    finished: list[Prefix] = []
    for step in range(max_steps + 1):
        candidates = list(finished)
        for prefix, logprobs in zip(live, rows, strict=True):
            candidates.extend(_expand(trie, prefix, logprobs, top_k, prior))
        candidates.sort(key=lambda p: (-rank(p, prior), p.tokens))
        pool = candidates[:top_k]
        finished = [p for p in pool if p.sentences is not None]
        live = [p for p in pool if p.sentences is None]
        if not live:
            break
        if step == max_steps:  # safety bound: resolve to the first sentence each prefix still allows
            finished += [Prefix(p.node, p.tokens, p.logprob_sum, p.positions, (trie.nodes[p.node].sentences[0],),
                                p.prior) for p in live]
            break
        if unscored is not None:
            rows = unscored.expand(len(live), -1)
            continue
        # Feed each live prefix's newest token; all of them in one packed row.
        branches = [Branch(p.positions, p.tokens[-1:]) for p in live]
        hidden, fed = decode_step(runner, cache, branches, shared, layer_skip)
        rows = torch.log_softmax(runner.logits(hidden), dim=-1)
        live = [Prefix(p.node, p.tokens, p.logprob_sum, (*p.positions, *new), p.sentences, p.prior)
                for p, new in zip(live, fed, strict=True)]
    finished.sort(key=lambda p: (-rank(p, prior), p.tokens))
    return finished


def end_probability(logprobs: Tensor, eos_ids: tuple[int, ...]) -> float:
    """Probability mass on the end-of-evidence token(s)."""
    return float(logprobs[list(eos_ids)].exp().sum())
