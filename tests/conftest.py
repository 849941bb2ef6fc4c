"""Shared fixtures: a tiny random Llama (fast, for decoding logic) and the real default model (integration)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def default_model_folder():
    """The packaged SmolLM2 converted once into the cfic cache (its tokenizer is shared with the tiny model)."""
    from cfic.models import resolve_model_path

    folder, _, _ = resolve_model_path(None)
    return folder


@pytest.fixture(scope="session")
def tokenizer(default_model_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_folder, local_files_only=True)


def make_tiny_loaded(tokenizer, *, layers: int = 2, max_positions: int = 4096, seed: int = 0):
    """A randomly initialised Llama with the real tokenizer: real code paths, milliseconds per forward."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from cfic.models import LoadedModel

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
        tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
        # Large random weights make attention peaked, so positions, masks and caches visibly matter.
        initializer_range=0.25,
    )
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config)
    model.eval().requires_grad_(False)
    return LoadedModel(model, tokenizer, "tiny-llama", torch.device("cpu"), torch.float32, 0.0, True)


@pytest.fixture(scope="session")
def tiny_loaded(tokenizer):
    return make_tiny_loaded(tokenizer)


@pytest.fixture(scope="session")
def tiny_model_folder(tmp_path_factory, tiny_loaded):
    """The tiny model saved as a local HF folder, for code that loads models by path (CLI, training, batch)."""
    folder = tmp_path_factory.mktemp("tiny-model")
    tiny_loaded.model.save_pretrained(folder)
    tiny_loaded.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_grounder(tiny_loaded):
    from cfic.grounder import Grounder

    return Grounder(tiny_loaded)


@pytest.fixture(scope="session")
def default_grounder():
    from cfic.grounder import Grounder

    return Grounder.from_pretrained()
