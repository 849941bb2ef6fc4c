"""A linear answerability probe on the LM's own question pass: does anything in this document answer the question?

Why: the question-level features the toolkit had (end-of-evidence probability at the first answer position, the
best cosines, the best span score) separate SQuAD 2.0's unanswerable questions from answerable ones with AUC 0.54-0.66
within the training article, so the fitted ``no_evidence`` model never fired (no-evidence accuracy 0.455 = answering
everything). The LM has already read the whole document when it reads the question; its hidden state at the
question's last token, in the middle layers, carries whether the document holds the asked fact: a logistic probe on
it reached grouped cross-validated AUC 0.81-0.85 on the same training questions. A middle layer, below the SwiftKV
layer, so the state is the same with and without SwiftKV, and it costs one extra split of the question's forward
pass, nothing else (:func:`cfic.decoding.encode.question_pass`).

The probe is fitted on the training side only (``cfic fit-abstention``) and ships with the adapter whose weights
produced the states (``cfic/data/adapter/answerability.safetensors``), like the prior's weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cfic.errors import CficError, require_positive_int
from cfic.files import SameByDigest, array_digest, read_safetensors

PROBE_FILE = "answerability.safetensors"


@dataclass(frozen=True, eq=False)
class AnswerabilityProbe(SameByDigest):
    """``logit = coef . (h - mean) / scale + intercept``, positive = *no* evidence, where ``h`` is the last question
    token's hidden state leaving decoder layer ``layer`` (1-based count of layers run)."""

    layer: int
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float

    def __post_init__(self) -> None:
        require_positive_int("the answerability probe's layer", self.layer)
        shapes = {self.mean.shape, self.scale.shape, self.coef.shape}
        if len(shapes) != 1 or self.mean.ndim != 1:
            raise CficError(f"answerability probe vectors disagree in shape: {sorted(shapes)}")
        if not (np.isfinite(self.mean).all() and np.isfinite(self.coef).all() and (self.scale > 0).all()):
            raise CficError("answerability probe has non-finite weights or a non-positive scale")

    @property
    def hidden_size(self) -> int:
        return int(self.coef.shape[0])

    @property
    def digest(self) -> str:
        return array_digest(str(self.layer), (self.mean, self.scale, self.coef, np.array([self.intercept])))

    def logit(self, hidden: torch.Tensor | np.ndarray) -> float:
        h = hidden.detach().float().cpu().numpy() if isinstance(hidden, torch.Tensor) else np.asarray(hidden)
        if h.shape != (self.hidden_size,):
            raise CficError(f"the answerability probe expects a hidden state of size {self.hidden_size}, "
                            f"got shape {tuple(h.shape)} (was it fitted for another model?)")
        return float(((h - self.mean) / self.scale) @ self.coef + self.intercept)

    def save(self, path: str | os.PathLike) -> None:
        from safetensors.numpy import save

        from cfic.files import write_atomic

        tensors = {name: np.ascontiguousarray(getattr(self, name), dtype=np.float32)
                   for name in ("mean", "scale", "coef")}
        meta = {"layer": str(self.layer), "intercept": repr(float(self.intercept)), "format": "cfic-answerability-1"}
        write_atomic(path, save(tensors, metadata=meta))  # readers see the old probe or the new one

    @classmethod
    def load(cls, path: str | os.PathLike) -> AnswerabilityProbe:
        path = Path(path)
        if not path.is_file():
            raise CficError(f"answerability probe {path} not found")
        try:
            meta, arrays = read_safetensors(path, "numpy", "answerability probe")
            return cls(int(meta["layer"]), arrays["mean"], arrays["scale"], arrays["coef"], float(meta["intercept"]))
        except (KeyError, ValueError) as exc:
            raise CficError(f"unreadable answerability probe {path}: {exc}") from exc
