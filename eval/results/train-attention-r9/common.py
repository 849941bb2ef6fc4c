"""What the round-9 fusion studies share: out-of-fold attention log-probabilities with the shipped recipe (plain,
alone, l2 0.01, five folds by document) and the objective (top-3 hit, mean over sources)."""

from collections.abc import Sequence

import numpy as np

from cfic.training.attention_data import AttentionItem
from cfic.training.fit_attention import _by_source, _feature_mask, _log_softmax, document_folds, features, fit_weights


def out_of_fold_attention(items: Sequence[AttentionItem], swiftkv_layer: int = 15
                          ) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """(fold per item, target sentences per item, out-of-fold attention log-probabilities per item)."""
    mask = _feature_mask(items[0].attention.shape[:3], False, swiftkv_layer)
    folds = document_folds(items, 5, 0)
    x = [features(it, False) for it in items]
    target = [it.answer if it.answer.any() else it.evidence for it in items]
    att: list[np.ndarray] = [np.empty(0)] * len(items)
    for f in range(5):
        tr = [i for i in range(len(items)) if folds[i] != f]
        w = fit_weights([x[i] for i in tr], [items[i].evidence for i in tr], 0.01, mask)
        for i in np.flatnonzero(folds == f):
            att[i] = _log_softmax(x[i] @ w)
    return folds, target, att


def mean_by_source(items: Sequence[AttentionItem], idx: Sequence[int], hits: Sequence[bool]) -> float:
    return float(np.mean(list(_by_source([items[i] for i in idx], hits).values())))
