"""mechrepro.core.model.Transformer against Hugging Face, and its hook / partial-run API."""

from __future__ import annotations

import pytest
import torch

from mechrepro.core.model import Transformer

from conftest import SMALL_VOCAB, make_hf


def _tokens(b=3, p=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, SMALL_VOCAB, (b, p), generator=g)


def test_logits_match_hf(arch, hf_models, models):
    tokens = _tokens()
    with torch.no_grad():
        ref = hf_models[arch](tokens).logits
    ours = models[arch](tokens)
    assert ours.shape == ref.shape == (3, 9, SMALL_VOCAB)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    # the models are not degenerate: logits vary across positions
    assert ours.std(dim=1).mean() > 0.1


def test_spec_reflects_architecture(models):
    g, l, q = models["gpt2"].spec, models["llama"].spec, models["qwen2"].spec
    assert (g.arch, g.n_heads, g.n_kv_heads, g.d_head, g.n_positions) == ("gpt2", 4, 4, 8, 64)
    assert (l.arch, l.n_heads, l.n_kv_heads, l.qkv_bias) == ("llama", 4, 2, False)
    assert (q.arch, q.n_kv_heads, q.qkv_bias) == ("llama", 2, True)
    assert [models["llama"].kv_group(h) for h in range(4)] == [0, 0, 1, 1]
    assert models["llama"].p("blocks.0.W_K").shape == (2, 32, 8)
    assert models["llama"].p("blocks.0.W_Q").shape == (4, 32, 8)


def test_unsupported_model_type_raises():
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    hf = GPTNeoForCausalLM(GPTNeoConfig(num_layers=1, hidden_size=16, num_heads=2, vocab_size=11,
                                        attention_types=[[["global"], 1]], max_position_embeddings=8))
    with pytest.raises(NotImplementedError, match="gpt_neo"):
        Transformer.from_hf(hf)


def test_llama_with_output_and_mlp_bias_matches_hf_or_is_rejected():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, vocab_size=SMALL_VOCAB,
                                      initializer_range=0.2, attention_bias=True, mlp_bias=True)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.5)
    tokens = _tokens()
    try:
        ours = Transformer.from_hf(hf)
    except NotImplementedError:
        return  # rejecting the configuration is acceptable
    torch.testing.assert_close(ours(tokens), hf(tokens).logits.detach(), atol=1e-4, rtol=1e-4)


def test_logits_at_equals_gathered_full_logits(arch, models):
    model = models[arch]
    tokens = _tokens()
    at = torch.tensor([8, 0, 5])
    full = model(tokens)
    picked = model(tokens, logits_at=at)
    assert picked.shape == (3, SMALL_VOCAB)
    torch.testing.assert_close(picked, full[torch.arange(3), at], atol=1e-5, rtol=1e-5)


def test_logit_tokens_subset(arch, models):
    model = models[arch]
    tokens = _tokens()
    ids = torch.tensor([7, 3, 99, 3])
    full = model(tokens)
    sub = model(tokens, logit_tokens=ids)
    assert sub.shape == (3, 9, 4)
    torch.testing.assert_close(sub, full[..., ids], atol=1e-5, rtol=1e-5)
    at = torch.tensor([1, 2, 3])
    both = model(tokens, logits_at=at, logit_tokens=ids)
    torch.testing.assert_close(both, full[torch.arange(3), at][:, ids], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("start", [1, 2])
def test_start_layer_reproduces_full_run(arch, models, start):
    model = models[arch]
    tokens = _tokens()
    cache = {}
    full = model(tokens, cache=cache, cache_names=[f"blocks.{start}.hook_resid_pre"])
    assert set(cache) == {f"blocks.{start}.hook_resid_pre"}
    partial = model(tokens, start_layer=start, start_resid=cache[f"blocks.{start}.hook_resid_pre"])
    torch.testing.assert_close(partial, full, atol=1e-5, rtol=1e-5)
    # starting from a different residual gives different logits (start_resid is really used)
    other = model(tokens, start_layer=start, start_resid=cache[f"blocks.{start}.hook_resid_pre"] * 2)
    assert (other - full).abs().max() > 1e-2


def test_start_layer_without_resid_fails(models):
    with pytest.raises(AssertionError):
        models["gpt2"](_tokens(), start_layer=1)


def test_stop_layer_returns_none_and_caches_only_earlier_layers(models):
    cache = {}
    out = models["llama"](_tokens(), cache=cache, stop_layer=1)
    assert out is None
    assert "blocks.0.hook_resid_post" in cache
    assert not any(k.startswith("blocks.1.") for k in cache)


@pytest.mark.parametrize("kind", ["q", "k", "v"])
@pytest.mark.parametrize("arch_name", ["gpt2", "llama", "qwen2"])
def test_identity_per_head_input_hook_leaves_logits_unchanged(models, kind, arch_name):
    model = models[arch_name]
    tokens = _tokens()
    seen = []

    def identity(x):
        seen.append(x.shape)
        return x

    ref = model(tokens)
    out = model(tokens, hooks={f"blocks.1.attn.hook_{kind}_input": identity})
    assert seen == [(3, 9, model.spec.n_heads, model.spec.d_model)]  # one copy per *query* head
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["q", "k", "v"])
def test_per_head_input_change_affects_only_that_head(models, kind):
    """On the GQA model, changing head 1's input leaves head 0 (same kv group) untouched."""
    model = models["llama"]
    tokens = _tokens()

    def bump(x):
        x = x.clone()
        x[:, 4, 1] += 3.0
        return x

    clean, patched = {}, {}
    model(tokens, cache=clean, cache_names=["blocks.1.attn.hook_z"])
    model(tokens, hooks={f"blocks.1.attn.hook_{kind}_input": bump}, cache=patched,
          cache_names=["blocks.1.attn.hook_z"])
    dz = (patched["blocks.1.attn.hook_z"] - clean["blocks.1.attn.hook_z"]).abs()
    assert dz[:, :, 1].max() > 1e-3
    assert dz[:, :, [0, 2, 3]].max() < 1e-6


def test_hook_z_replacement_changes_output_and_none_return_keeps(arch, models):
    model = models[arch]
    tokens = _tokens()
    ref = model(tokens)

    def zero_head(z):
        z = z.clone()
        z[:, :, 2] = 0
        return z

    out = model(tokens, hooks={"blocks.1.attn.hook_z": zero_head})
    assert (out - ref).abs().max() > 1e-2
    # positions are causal: a change at position 5 leaves earlier logits unchanged
    def zero_pos5(z):
        z = z.clone()
        z[:, 5] = 0
        return z

    out5 = model(tokens, hooks={"blocks.0.attn.hook_z": zero_pos5})
    torch.testing.assert_close(out5[:, :5], ref[:, :5], atol=1e-5, rtol=1e-5)
    assert (out5[:, 5:] - ref[:, 5:]).abs().max() > 1e-2
    # a hook returning None only observes
    observed = []
    out_none = model(tokens, hooks={"blocks.1.attn.hook_z": lambda z: observed.append(z.shape)})
    assert observed == [(3, 9, 4, 8)]
    torch.testing.assert_close(out_none, ref, atol=0, rtol=0)


def test_cache_collects_names(models):
    model = models["llama"]
    tokens = _tokens()
    cache = {}
    model(tokens, cache=cache)
    for l in range(3):
        for name in ("hook_resid_pre", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_rot_q",
                     "attn.hook_rot_k", "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z",
                     "hook_attn_out", "hook_resid_mid", "mlp.hook_post", "hook_mlp_out", "hook_resid_post"):
            assert f"blocks.{l}.{name}" in cache, name
    assert "ln_final.hook_in" in cache
    assert cache["blocks.0.attn.hook_k"].shape == (3, 9, 2, 8)
    assert cache["blocks.0.attn.hook_z"].shape == (3, 9, 4, 8)
    pat = cache["blocks.1.attn.hook_pattern"]
    assert pat.shape == (3, 4, 9, 9)
    torch.testing.assert_close(pat.sum(-1), torch.ones(3, 4, 9))
    assert pat.triu(1).abs().max() == 0  # causal
    torch.testing.assert_close(cache["blocks.1.hook_resid_pre"], cache["blocks.0.hook_resid_post"])
    # restricted cache
    small = {}
    model(tokens, cache=small, cache_names=["blocks.2.attn.hook_z", "ln_final.hook_in"])
    assert set(small) == {"blocks.2.attn.hook_z", "ln_final.hook_in"}
    torch.testing.assert_close(small["blocks.2.attn.hook_z"], cache["blocks.2.attn.hook_z"])


def test_head_outputs_sum_to_attn_out(arch, models):
    """z @ W_O per head, summed (+ b_O), is the attention output: W_O is in head layout."""
    model = models[arch]
    cache = {}
    model(_tokens(), cache=cache)
    z = cache["blocks.1.attn.hook_z"]
    total = sum(z[:, :, h] @ model.W_O(1)[h] for h in range(model.spec.n_heads))
    if model.has("blocks.1.b_O"):
        total = total + model.p("blocks.1.b_O")
    torch.testing.assert_close(total, cache["blocks.1.hook_attn_out"], atol=1e-5, rtol=1e-5)


def test_final_resid_unembed_matches_logits(arch, models):
    model = models[arch]
    tokens = _tokens()
    cache = {}
    logits = model(tokens, cache=cache)
    torch.testing.assert_close(model.unembed(cache["ln_final.hook_in"]), logits, atol=1e-5, rtol=1e-5)


def test_right_padding_does_not_change_earlier_logits(arch, models):
    model = models[arch]
    tokens = _tokens(b=2, p=6)
    padded = torch.cat([tokens, torch.zeros(2, 3, dtype=torch.long)], dim=1)
    torch.testing.assert_close(model(padded)[:, :6], model(tokens), atol=1e-5, rtol=1e-5)


def test_float64_conversion_still_matches(hf_models):
    """``model.double()`` converts every weight buffer (used for precise numerical tests)."""
    model = Transformer.from_hf(hf_models["llama"]).double()
    tokens = _tokens()
    with torch.no_grad():
        ref = hf_models["llama"](tokens).logits.double()
    out = model(tokens)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_two_layer_gpt2_from_fresh_config():
    """The conversion does not depend on the number of layers (fresh 2-layer model, n_inner set)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(3)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, n_inner=48, vocab_size=SMALL_VOCAB,
                                    n_positions=64, initializer_range=0.2)).eval()
    model = Transformer.from_hf(hf)
    assert model.spec.d_mlp == 48
    tokens = _tokens()
    torch.testing.assert_close(model(tokens), hf(tokens).logits.detach(), atol=1e-4, rtol=1e-4)


def test_untied_llama_head(hf_models):
    hf = make_hf("llama", n_layers=1, seed=5)
    assert not hf.config.tie_word_embeddings
    model = Transformer.from_hf(hf)
    torch.testing.assert_close(model.W_U, hf.lm_head.weight.detach().T)


def _same_transformer(a, b) -> None:
    assert a.spec == b.spec
    pa, pb = dict(a.named_buffers()) | dict(a.named_parameters()), dict(b.named_buffers()) | dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name


@pytest.mark.parametrize("tied", [True, False])
def test_checkpoint_dir_loads_what_from_hf_reads(arch, tied, tmp_path):
    """The loader that skips the transformers modelling code builds the same model, bit for bit."""
    hf = make_hf(arch)
    hf.config.tie_word_embeddings = tied
    if not tied:
        hf.lm_head.weight = torch.nn.Parameter(hf.lm_head.weight.detach().clone() + 0.01)
    hf.save_pretrained(tmp_path)
    direct = Transformer.from_checkpoint_dir(tmp_path)
    assert direct is not None
    _same_transformer(direct, Transformer.from_hf(hf))


def test_checkpoint_dir_declines_what_it_cannot_read(tmp_path):
    """Rotary scaling and unknown architectures are left to transformers (None), never guessed."""
    hf = make_hf("llama")
    hf.config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    hf.save_pretrained(tmp_path)
    assert Transformer.from_checkpoint_dir(tmp_path) is None
    (tmp_path / "config.json").write_text('{"model_type": "t5"}')
    assert Transformer.from_checkpoint_dir(tmp_path) is None
    assert Transformer.from_checkpoint_dir(tmp_path / "missing") is None
