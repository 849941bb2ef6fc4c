"""Distilled SwiftKV parameters next to a merged LoRA adapter: they belong to the weights they were distilled
against, so a model with an adapter merged must refuse them with a message that says why — never run on stale
parameters. Also: the acceleration options are server-wide (a REST request cannot set them)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from conftest import make_tiny_loaded
from safetensors import safe_open
from safetensors.torch import save_file

from cfic import CficError
from cfic.decoding.swiftkv import SwiftKV, model_fingerprint
from cfic.grounder import Grounder

LAYERS = 2
DOC = "The castle was built in 1066. It stands on a hill. The river runs below it."
ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def loaded(tokenizer):
    return make_tiny_loaded(tokenizer, layers=LAYERS, seed=11)


def merged_lora(model, targets: list[str], delta_scale: float = 1.0):
    """``model`` (copied) with a LoRA on the top half of its layers merged, as the bundled CFIC adapter is; the
    update is random, scaled by ``delta_scale`` relative to PEFT's non-default random initialisation."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, layers_to_transform=list(range(LAYERS // 2, LAYERS)),
                        init_lora_weights=False)
    peft = get_peft_model(copy.deepcopy(model), config)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.mul_(delta_scale)
    return peft.merge_and_unload().eval().requires_grad_(False)


def distilled(loaded, path):
    sw = SwiftKV(loaded.model, 1, 1, q_rank=2)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in sw.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return sw.save(path, model_name="tiny-base")


@pytest.mark.parametrize("targets", [ALL_TARGETS, ["q_proj", "v_proj"], ["o_proj"], ["up_proj"]])
def test_a_merged_adapter_fails_the_fingerprint_check_with_a_clear_message(loaded, tmp_path, targets):
    path = distilled(loaded, tmp_path / "sw.safetensors")
    assert SwiftKV.load(path, loaded.model).layer == 1  # the weights it was distilled for accept it
    merged = merged_lora(loaded.model, targets, delta_scale=0.05)
    changed = [n for n, p in merged.named_parameters()
               if not torch.equal(p, dict(loaded.model.named_parameters())[n])]
    assert changed and all(".layers.1." in n for n in changed)  # only the adapted (top) layer differs
    with pytest.raises(ValueError, match="other weights") as err:
        SwiftKV.load(path, merged)
    assert "adapter" in str(err.value) and "tiny-base" in str(err.value)


def test_the_first_fingerprint_missed_query_value_adapters(loaded):
    """Why the fingerprint has a version 2: PEFT's default Llama targets (q_proj, v_proj) left version 1 unchanged."""
    merged = merged_lora(loaded.model, ["q_proj", "v_proj"])
    assert model_fingerprint(merged, 1) == model_fingerprint(loaded.model, 1)
    assert model_fingerprint(merged) != model_fingerprint(loaded.model)
    fresh = make_tiny_loaded(loaded.tokenizer, layers=LAYERS, seed=11)  # same seed, same weights: same print
    assert model_fingerprint(fresh.model) == model_fingerprint(loaded.model)
    assert model_fingerprint(fresh.model.to(torch.bfloat16)) == model_fingerprint(loaded.model)  # dtype-independent


def test_files_with_a_version_1_fingerprint_still_load(loaded, tmp_path):
    path = distilled(loaded, tmp_path / "sw.safetensors")
    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata())
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    del meta["fingerprint_version"]
    meta["fingerprint"] = model_fingerprint(loaded.model, 1)
    old = tmp_path / "v1.safetensors"
    save_file(tensors, str(old), metadata=meta)
    assert SwiftKV.load(old, loaded.model).digest() == SwiftKV.load(path, loaded.model).digest()
    with pytest.raises(ValueError, match="other weights"):
        SwiftKV.load(old, merged_lora(loaded.model, ALL_TARGETS))


@pytest.fixture(scope="module")
def on_disk(loaded, tmp_path_factory):
    """The tiny model, a LoRA adapter folder for it and SwiftKV parameters distilled for the base weights."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("tiny")
    model_dir, adapter_dir = root / "tiny-base", root / "adapter"
    loaded.model.save_pretrained(model_dir)
    loaded.tokenizer.save_pretrained(model_dir)
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=ALL_TARGETS, layers_to_transform=[1],
                        init_lora_weights=False)
    get_peft_model(copy.deepcopy(loaded.model), config).save_pretrained(adapter_dir)
    params = distilled(loaded, root / "swiftkv.safetensors")
    return model_dir, adapter_dir, params


def test_from_pretrained_refuses_stale_parameters_next_to_an_adapter(on_disk):
    model_dir, adapter_dir, params = on_disk
    with pytest.raises(CficError, match="adapter"):
        Grounder.from_pretrained(str(model_dir), device="cpu", dtype="float32", adapter=str(adapter_dir),
                                 swiftkv=str(params))
    g = Grounder.from_pretrained(str(model_dir), device="cpu", dtype="float32", adapter=None, swiftkv=str(params))
    assert (g.config.swiftkv_layer, g.swiftkv.q_rank) == (1, 2)
    assert g.ground("Where is the castle?", [DOC]).evidence


def test_parameters_distilled_with_an_adapter_load_in_either_dtype(on_disk, tmp_path):
    """A float32 and a bfloat16 merge of the same adapter differ in the last bit of some weights; the fingerprint
    (version 3) names what the weights were built from, so a file distilled in one dtype serves the other."""
    from cfic.models import load_model

    model_dir, adapter_dir, _ = on_disk
    f32 = load_model(str(model_dir), device="cpu", dtype="float32", adapter=str(adapter_dir))
    bf16 = load_model(str(model_dir), device="cpu", dtype="bfloat16", adapter=str(adapter_dir))
    base = load_model(str(model_dir), device="cpu", dtype="float32", adapter=None)
    assert model_fingerprint(f32.model) == model_fingerprint(bf16.model) != model_fingerprint(base.model)
    path = distilled(f32, tmp_path / "lora-sw.safetensors")
    assert SwiftKV.load(path, bf16.model).layer == 1
    with pytest.raises(ValueError, match="other weights"):
        SwiftKV.load(path, base.model)
    with torch.no_grad():  # weights changed after the load: the recorded id no longer vouches for them
        f32.model.model.layers[0].mlp.up_proj.weight[0, :4] += 1.0
    with pytest.raises(ValueError, match="other weights"):
        SwiftKV.load(path, f32.model)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cfic.cli", *args], capture_output=True, text=True, timeout=300)


def test_cli_ground_with_swiftkv_and_adapter(on_disk, tmp_path):
    model_dir, adapter_dir, params = on_disk
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC, encoding="utf-8")
    common = ["ground", "--model", str(model_dir), "--device", "cpu", "--dtype", "float32", "-q", "Where?",
              str(doc), "--swiftkv", str(params)]
    bad = run_cli(*common, "--adapter", str(adapter_dir))
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr.startswith("error:") and "other weights" in bad.stderr and "adapter" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
    ok = run_cli(*common, "--no-adapter", "--layer-skip", "0", "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["evidence"]
    # an explicit layer that disagrees with the file is a user error too (after loading: the file says its layer)
    clash = run_cli(*common, "--no-adapter", "--swiftkv-layer", "2")
    assert clash.returncode == 2 and "layer 1" in clash.stderr and len(clash.stderr.strip().splitlines()) == 1


def test_rest_requests_cannot_set_acceleration_options(tiny_grounder):
    from fastapi.testclient import TestClient

    from cfic.api.app import create_app

    body = {"query": "Where is the castle?", "documents": [{"id": "d", "text": DOC}]}
    with TestClient(create_app(tiny_grounder)) as client:
        assert client.post("/ground", json=body).status_code == 200
        for option in ({"swiftkv_layer": 1}, {"swiftkv_group": 2}, {"swiftkv": "bundled"}, {"layer_skip": 1}):
            res = client.post("/ground", json=body | option)
            assert res.status_code == 422, (option, res.text)
