"""SwiftKV (SingleInputKV, AcrossKV, distilled parameters) against plain-HF and hand-written references."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_tiny_loaded
from numerics import assert_close_fp
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from cfic import CficError, GroundingConfig
from cfic.decoding.encode import encode_question
from cfic.decoding.prefix import constrained_prefix_search
from cfic.decoding.runner import forward
from cfic.decoding.skip import SpanSearch, candidates, skip_decode_span_end
from cfic.decoding.swiftkv import SwiftKV
from cfic.grounder import Grounder

pytestmark = pytest.mark.numerics  # also run under other CPU kernel sets (make test)

DOC = (
    "The river rises in the mountains. The river flows north to the sea. Salmon swim up the river in autumn.\n"
    "Bridges cross it at three towns. A ferry still runs at night. Fishing is allowed in summer only."
)
QUERY = "Where does the river flow?"
LAYERS = 4


@pytest.fixture(scope="module")
def loaded(tokenizer):
    return make_tiny_loaded(tokenizer, layers=LAYERS, seed=1)


def prompt_ids(g: Grounder, enc, query: str = QUERY) -> list[int]:
    ids = list(g.template.head_ids)
    for s in range(enc.windows[0].first, enc.windows[0].last):
        ids.extend(enc.segment_ids[s])
    return ids + g.template.query_ids(g.tokenizer, query, g.config.max_query_tokens)


def hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)


def reference_logprobs(model, sw: SwiftKV, ids: list[int]) -> torch.Tensor:
    """The SwiftKV model written out by hand, one plain pass without cache: layers < l are the HF layers; from l on,
    queries come from each layer's own input and K/V from ``sw``'s projections of the layer-l input."""
    core = model.model
    layers = list(core.layers)
    with torch.inference_mode():
        x = core.embed_tokens(torch.tensor([ids]))
        n = x.shape[1]
        cos, sin = core.rotary_emb(x, torch.arange(n).unsqueeze(0))
        blocked = ~torch.tril(torch.ones(n, n, dtype=torch.bool))
        kv = None
        for j, layer in enumerate(layers):
            if j < sw.layer:
                x = layer(x, attention_mask=None, position_embeddings=(cos, sin))
                x = x[0] if isinstance(x, tuple) else x
                continue
            if kv is None:
                kv = sw.kv(x, (cos, sin))
            attn = layer.self_attn
            q_proj = sw.q_proj[j - sw.layer] if sw.q_rank else attn.q_proj
            q = q_proj(layer.input_layernorm(x)).view(1, n, -1, attn.head_dim).transpose(1, 2)
            q, _ = apply_rotary_pos_emb(q, q, cos, sin)
            k, v = kv[(j - sw.layer) // sw.group]
            k = k.repeat_interleave(attn.num_key_value_groups, dim=1)
            v = v.repeat_interleave(attn.num_key_value_groups, dim=1)
            scores = (q @ k.transpose(2, 3)) * attn.scaling
            probs = torch.softmax(scores.masked_fill(blocked, float("-inf")), dim=-1)
            out = attn.o_proj((probs @ v).transpose(1, 2).reshape(1, n, -1))
            x = x + out
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return torch.log_softmax(model.lm_head(core.norm(x))[0].float(), dim=-1)


def first_logprobs(g: Grounder, enc) -> torch.Tensor:
    q_ids = g.template.query_ids(g.tokenizer, QUERY, g.config.max_query_tokens)
    with torch.inference_mode():
        _, first = encode_question(g.runner, enc.windows[0], q_ids, room=8)
    return first


@pytest.mark.parametrize("layer", [LAYERS, LAYERS - 1])
def test_zero_training_at_the_top_reproduces_the_full_model(loaded, layer):
    """l = L changes nothing; l = L-1 is exact too (layer l's own K/V, only the outputs nobody reads are skipped)."""
    plain = Grounder(loaded)
    fast = Grounder(loaded, GroundingConfig(swiftkv_layer=layer))
    enc = fast.encode([DOC])[0]
    ids = prompt_ids(fast, enc)
    ref = hf_logprobs(loaded.model, ids)[-1]
    torch.testing.assert_close(first_logprobs(fast, enc), ref, atol=2e-4, rtol=0)
    a = plain.ground(QUERY, [DOC])
    b = fast.ground(QUERY, [DOC])
    assert [(e.sentence_start, e.sentence_end) for e in a.evidence] == \
           [(e.sentence_start, e.sentence_end) for e in b.evidence]
    assert [e.score for e in a.evidence] == pytest.approx([e.score for e in b.evidence], rel=1e-3)


def test_own_norm_projections_equal_each_layers_own_kv_of_the_layer_l_input(loaded):
    model = loaded.model
    layers = list(model.model.layers)
    sw = SwiftKV(model, 1, 1)
    x = torch.randn(1, 7, model.config.hidden_size)
    cos, sin = model.model.rotary_emb(x, torch.arange(7).unsqueeze(0))
    with torch.inference_mode():
        got = sw.kv(x, (cos, sin))
        for j in range(1, LAYERS):
            attn = layers[j].self_attn
            h = layers[j].input_layernorm(x)
            k = attn.k_proj(h).view(1, 7, -1, attn.head_dim).transpose(1, 2)
            _, k = apply_rotary_pos_emb(k, k, cos, sin)
            v = attn.v_proj(h).view(1, 7, -1, attn.head_dim).transpose(1, 2)
            torch.testing.assert_close(got[j - 1][0], k, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(got[j - 1][1], v, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("layer", "group", "q_rank"), [(1, 1, 0), (2, 2, 0), (1, 2, 4)])
def test_cached_packed_decoding_matches_the_reference_swiftkv_model(loaded, layer, group, q_rank):
    """Document prefill (no upper layers), question pass (last token only), prefix search and the packed skip pass
    (sentence ends only) give the log-probabilities of one plain pass of the SwiftKV model."""
    sw = SwiftKV(loaded.model, layer, group, q_rank=q_rank)
    torch.manual_seed(3)
    with torch.no_grad():  # move away from the initialisation so every parameter matters
        for p in sw.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    g = Grounder(loaded, None, sw)
    assert g.config.swiftkv_layer == layer and g.config.swiftkv_group == group
    enc = g.encode([DOC])[0]
    window = enc.windows[0]
    prompt = prompt_ids(g, enc)
    torch.testing.assert_close(first_logprobs(g, enc), reference_logprobs(loaded.model, sw, prompt)[-1],
                               atol=2e-4, rtol=0)
    q_ids = g.template.query_ids(g.tokenizer, QUERY, g.config.max_query_tokens)
    with torch.inference_mode():
        cache, first = encode_question(g.runner, window, q_ids, room=4096)
        shared = cache.length
        prefixes = constrained_prefix_search(g.runner, cache, first, window.trie, top_k=64, max_steps=64)
        starts = candidates(prefixes)
        search = SpanSearch(enc.answer_ids, enc.segment_ids, window.last, 256, g.template.eos_ids, shared)
        ends = skip_decode_span_end(g.runner, cache, starts, search)
    for prefix in prefixes[:2]:
        ids = list(enc.answer_ids[prefix.sentences[0]])[: len(prefix.tokens)]
        lp = reference_logprobs(loaded.model, sw, prompt + ids)
        ref = sum(float(lp[len(prompt) - 1 + i, t]) for i, t in enumerate(ids)) / len(ids)
        assert prefix.score == pytest.approx(ref, abs=2e-4)
    for (_, s), end in list(zip(starts, ends, strict=True))[:2]:
        answer = list(enc.answer_ids[s])
        for j, p_end in enumerate(end.end_probabilities[:3]):
            if j:
                answer += list(enc.segment_ids[s + j])
            lp = reference_logprobs(loaded.model, sw, prompt + answer)
            ref = sum(math.exp(float(lp[-1, e])) for e in g.template.eos_ids)
            assert p_end == pytest.approx(ref, rel=2e-3, abs=1e-12)


def test_swiftkv_changes_the_result_below_the_top(loaded):
    """The reference comparison above would pass trivially if SwiftKV did nothing: it must change the logits."""
    plain = Grounder(loaded)
    fast = Grounder(loaded, GroundingConfig(swiftkv_layer=1))
    enc_p, enc_f = plain.encode([DOC])[0], fast.encode([DOC])[0]
    assert not torch.allclose(first_logprobs(plain, enc_p), first_logprobs(fast, enc_f), atol=1e-3)


@pytest.mark.parametrize("group", [1, 2, 4])
def test_acrosskv_shrinks_the_cache_per_token(loaded, group):
    layer = 1
    plain = Grounder(loaded).encode([DOC])[0].windows[0].kv
    kv = Grounder(loaded, GroundingConfig(swiftkv_layer=layer, swiftkv_group=group)).encode([DOC])[0].windows[0].kv
    per_layer = plain.bytes_per_token() // LAYERS
    buffers = layer + math.ceil((LAYERS - layer) / group)
    assert len(kv.keys) == buffers
    assert kv.bytes_per_token() == per_layer * buffers
    assert kv.length == plain.length
    assert all(k.shape == plain.keys[0].shape for k in kv.keys)  # same positions, same shapes per buffer


def test_a_pass_with_outputs_fills_the_same_kv_as_a_full_pass(loaded):
    """Narrowing the upper layers to a few output columns must not change what the cache holds."""
    sw = SwiftKV(loaded.model, 2, 1)
    g = Grounder(loaded, None, sw)
    enc = g.encode([DOC])[0]
    q_ids = g.template.query_ids(g.tokenizer, QUERY, g.config.max_query_tokens)
    ids = torch.tensor([q_ids])
    start = enc.windows[0].kv.length
    pos = torch.arange(start, start + len(q_ids)).unsqueeze(0)
    caches, outs = [], []
    for outputs in (None, torch.tensor([0, len(q_ids) - 1])):
        cache = enc.windows[0].kv.fork(len(q_ids))
        with torch.inference_mode():
            outs.append(forward(g.runner, ids, pos, cache, _mask(start, len(q_ids)),
                                outputs=outputs))
        caches.append(cache)
    for a, b in zip(caches[0].keys + caches[0].values, caches[1].keys + caches[1].values, strict=True):
        assert_close_fp(a, b)
    assert_close_fp(outs[0][:, [0, len(q_ids) - 1]], outs[1])


def _mask(past: int, n: int) -> torch.Tensor:
    from cfic.decoding.runner import causal_extension_mask

    return causal_extension_mask(past, n, torch.device("cpu"))


def test_distilled_parameters_save_and_load(loaded, tmp_path, tokenizer):
    sw = SwiftKV(loaded.model, 2, 2, q_rank=4)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in sw.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = sw.save(tmp_path / "sw.safetensors", model_name="tiny", info={"steps": 3}, dtype=torch.float32)
    back = SwiftKV.load(path, loaded.model)
    assert (back.layer, back.group, back.q_rank) == (2, 2, 4)
    assert back.info == {"steps": 3}
    for (name, a), (name_b, b) in zip(sw.state_dict().items(), back.state_dict().items(), strict=True):
        assert name == name_b
        assert torch.equal(a, b)
    assert back.digest() == sw.digest()
    g1, g2 = Grounder(loaded, None, sw), Grounder(loaded, None, back)
    assert g1.model_key == g2.model_key
    torch.testing.assert_close(first_logprobs(g1, g1.encode([DOC])[0]), first_logprobs(g2, g2.encode([DOC])[0]))
    # bfloat16 files (the default) load too, within bfloat16 rounding
    small = SwiftKV.load(sw.save(tmp_path / "bf16.safetensors"), loaded.model)
    for a, b in zip(sw.state_dict().values(), small.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=0.02, rtol=0.01)
    # tied to the weights: another model of the same shape refuses them
    other = make_tiny_loaded(tokenizer, layers=LAYERS, seed=2)
    with pytest.raises(ValueError, match="other weights"):
        SwiftKV.load(path, other.model)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError):
        SwiftKV.load(tmp_path / "junk.safetensors", loaded.model)


def test_encodings_of_different_settings_never_mix(loaded):
    configs = [GroundingConfig(), GroundingConfig(swiftkv_layer=2), GroundingConfig(swiftkv_layer=2, swiftkv_group=2),
               GroundingConfig(swiftkv_layer=3)]
    grounders = [Grounder(loaded, c) for c in configs]
    assert len({g.model_key for g in grounders}) == len(grounders)
    enc = grounders[1].encode([DOC])
    with pytest.raises(CficError, match="another model or configuration"):
        grounders[0].ground(QUERY, enc)
    assert grounders[1].ground(QUERY, enc).evidence


def test_bad_swiftkv_options_raise(loaded):
    with pytest.raises(CficError):
        GroundingConfig(swiftkv_layer=0)
    with pytest.raises(CficError):
        GroundingConfig(swiftkv_group=0)
    with pytest.raises(CficError):
        Grounder(loaded, GroundingConfig(swiftkv_layer=LAYERS + 1))
    with pytest.raises(CficError):
        Grounder(loaded, GroundingConfig(swiftkv_group=2))
    with pytest.raises(CficError):
        Grounder(loaded, GroundingConfig(swiftkv_layer=3), SwiftKV(loaded.model, 2, 1))


def test_batched_swiftkv_encoding_equals_one_by_one(loaded):
    docs = [DOC, "Short one. Two sentences.", DOC[:120] + " And a different ending here."]
    options = {"swiftkv_layer": 2, "swiftkv_group": 2}
    batched = Grounder(loaded, GroundingConfig(encode_batch_tokens=100_000, **options)).encode(docs)
    single = Grounder(loaded, GroundingConfig(encode_batch_tokens=1, **options)).encode(docs)
    for a, b in zip(batched, single, strict=True):
        assert a.windows[0].kv.length == b.windows[0].kv.length
        for ka, kb in zip(a.windows[0].kv.keys + a.windows[0].kv.values, b.windows[0].kv.keys + b.windows[0].kv.values,
                          strict=True):
            torch.testing.assert_close(ka, kb, atol=1e-4, rtol=1e-4)
