"""Cross-check against TransformerLens 4.3's TransformerBridge on tiny models booted offline.

The bridge is booted from a local directory (tiny HF model + the GPT-2 tokenizer) in
compatibility mode with ``no_processing=True``: the bridge's default weight processing (folding
norms, centring) changes logits on Llama-type models, so raw weights are compared.
"""

from __future__ import annotations

import pytest
import torch

from mechrepro.core.model import Transformer

from conftest import FULL_VOCAB, make_hf

pytest.importorskip("transformer_lens")


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def pair(request, tmp_path_factory, tokenizer):
    from transformer_lens.model_bridge import TransformerBridge

    hf = make_hf(request.param, vocab=FULL_VOCAB, n_layers=2, seed=11)
    d = tmp_path_factory.mktemp(f"tl_{request.param}")
    hf.save_pretrained(d)
    tokenizer.save_pretrained(d)
    try:
        bridge = TransformerBridge.boot_transformers(str(d), device="cpu")
        bridge.enable_compatibility_mode(no_processing=True)
    except Exception as exc:  # pragma: no cover - depends on the installed TransformerLens
        pytest.skip(f"TransformerBridge cannot boot a tiny {request.param} model offline: {exc!r}")
    return request.param, Transformer.from_hf(hf), bridge


def _tokens():
    g = torch.Generator().manual_seed(4)
    return torch.randint(0, FULL_VOCAB, (2, 8), generator=g)


def test_bridge_logits_match(pair):
    _, ours, bridge = pair
    tokens = _tokens()
    with torch.no_grad():
        ref = bridge(tokens)
    torch.testing.assert_close(ours(tokens), ref, atol=1e-4, rtol=1e-4)


def test_hook_z_and_pattern_match_bridge(pair):
    name, ours, bridge = pair
    tokens = _tokens()
    with torch.no_grad():
        _, tl_cache = bridge.run_with_cache(tokens)
    cache = {}
    ours(tokens, cache=cache)
    for l in range(2):
        for hook in ("attn.hook_z", "attn.hook_pattern", "attn.hook_q", "attn.hook_k", "attn.hook_v",
                     "hook_resid_pre", "hook_attn_out", "hook_resid_post"):
            key = f"blocks.{l}.{hook}"
            assert cache[key].shape == tl_cache[key].shape, key
            torch.testing.assert_close(cache[key], tl_cache[key], atol=1e-4, rtol=1e-4, msg=key)
    # the compared patterns are not trivially uniform
    assert cache["blocks.1.attn.hook_pattern"][:, :, -1].max() > 0.3
    if name == "llama":
        assert cache["blocks.0.attn.hook_k"].shape[2] == 2  # grouped-query: 2 kv heads


@pytest.mark.parametrize("layer,head", [(0, 1), (1, 2)])
def test_zero_one_head_same_logits_as_bridge(pair, layer, head):
    _, ours, bridge = pair
    tokens = _tokens()

    def zero(z, hook=None):
        z = z.clone()
        z[:, :, head] = 0.0
        return z

    with torch.no_grad():
        ref = bridge.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", zero)])
        clean = bridge(tokens)
    out = ours(tokens, hooks={f"blocks.{layer}.attn.hook_z": zero})
    assert (ref - clean).abs().max() > 1e-2  # the ablation matters
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
