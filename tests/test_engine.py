"""The patching engine against naive one-patch-per-forward references (tiny GPT-2 and GQA Llama)."""

from __future__ import annotations

import pytest
import torch

from mechrepro.core import engine as E


@pytest.fixture(params=["gpt2", "llama"])
def setup(request, models):
    model = models[request.param]
    torch.manual_seed(3)
    b, p, V = 5, 9, model.spec.vocab_size
    tok, src = torch.randint(0, V, (b, p)), torch.randint(0, V, (b, p))
    end = torch.tensor([8, 6, 8, 5, 7])  # right-padded prompts of different lengths
    io, s = torch.randint(0, V, (b,)), torch.randint(0, V, (b,))

    def metric(logits, r):
        return logits[torch.arange(len(r)), io[r]] - logits[torch.arange(len(r)), s[r]]

    return model, tok, src, end, metric


def _naive(model, tok, end, metric, src_z, where: str) -> torch.Tensor:
    L, H = model.spec.n_layers, model.spec.n_heads
    rows = torch.arange(tok.shape[0])
    out = torch.zeros(L, H)
    with torch.no_grad():
        base = metric(model(tok, logits_at=end), rows).mean()
        for l in range(L):
            for h in range(H):
                def fn(z, l=l, h=h):
                    z = z.clone()
                    if where == "end":
                        z[rows, end, h] = src_z[l][rows, end, h]
                    else:
                        z[:, :, h] = src_z[l][:, :, h]
                    return z
                out[l, h] = metric(model(tok, hooks={f"blocks.{l}.attn.hook_z": fn}, logits_at=end), rows).mean() - base
    return out


@pytest.mark.parametrize("max_rows", [5, 64])
def test_patch_heads_end_matches_naive(setup, max_rows):
    model, tok, src, end, metric = setup
    base, source = E.base_run(model, tok, end), E.base_run(model, src, end)
    rows = torch.arange(tok.shape[0])
    z_end = torch.stack([z[rows, end] for z in source.z], 1)
    fast = E.patch_heads_end(model, base, z_end, metric, max_rows=max_rows)
    torch.testing.assert_close(fast, _naive(model, tok, end, metric, source.z, "end"), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("max_rows", [5, 64])
def test_patch_heads_all_positions_matches_naive(setup, max_rows):
    model, tok, src, end, metric = setup
    base, source = E.base_run(model, tok, end), E.base_run(model, src, end)
    fast = E.patch_heads_all_positions(model, base, source.z, metric, max_rows=max_rows)
    torch.testing.assert_close(fast, _naive(model, tok, end, metric, source.z, "all"), atol=1e-5, rtol=1e-4)


def test_subset_of_heads_leaves_others_nan(setup):
    model, tok, src, end, metric = setup
    base, source = E.base_run(model, tok, end), E.base_run(model, src, end)
    rows = torch.arange(tok.shape[0])
    z_end = torch.stack([z[rows, end] for z in source.z], 1)
    eff = E.patch_heads_end(model, base, z_end, metric, heads=[(1, 2), (0, 0)])
    assert eff.isnan().sum() == eff.numel() - 2 and not eff[1, 2].isnan() and not eff[0, 0].isnan()


# ------------------------------------------------------------------ cached prefix and resumed runs
@pytest.fixture
def prompts(models, arch):
    """A tiny model of each architecture and right-padded prompts with different END positions."""
    model = models[arch]
    g = torch.Generator().manual_seed(5)
    tok = torch.randint(0, model.spec.vocab_size, (5, 9), generator=g)
    end = torch.tensor([8, 6, 8, 5, 7])
    return model, tok, end


def test_resume_end_equals_full_forward(prompts):
    """Recomputing only the END token over the cached prefix gives the full run's END logits."""
    model, tok, end = prompts
    base = E.base_run(model, tok, end)
    for layer in (0, model.spec.n_layers - 1):
        with torch.no_grad():
            logits = E.resume(model, base, layer, end[:, None])
        torch.testing.assert_close(logits, base.end_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("trim", [False, True])
def test_resume_suffix_with_hook_matches_full_hooked_run(prompts, trim):
    """A suffix resumed at layer l with a patch at its first position, rows repeated, logits for a few
    token ids: the full forward pass with the same patch gives the same logits."""
    model, tok, end = prompts
    layer, s = 1, 3
    start = end - (s - 1)  # the suffix start .. END of every prompt
    prefix, logits = E.cache_prefix(model, tok, range(layer, model.spec.n_layers), [layer])
    assert logits is None and set(prefix.keys) == set(range(layer, model.spec.n_layers))
    rows = torch.tensor([0, 2, 2, 4, 1])
    delta = torch.randn(len(rows), model.spec.d_mlp, generator=torch.Generator().manual_seed(0))
    vocab = torch.tensor([3, 7, 50])
    name = f"blocks.{layer}.mlp.hook_post"

    def at_first(x):
        return x.index_put((torch.arange(len(x)), torch.zeros(len(x), dtype=torch.long)), x[:, 0] + delta)

    positions = start[rows, None] + torch.arange(s)
    with torch.no_grad():
        fast = E.resume(model, prefix, layer, positions, rows=rows, hooks={name: at_first}, vocab=vocab, trim=trim)

        def at_start(x):
            return x.index_put((torch.arange(len(x)), start[rows]), x[torch.arange(len(x)), start[rows]] + delta)

        full = model(tok[rows], hooks={name: at_start}, logits_at=end[rows])[:, vocab]
        clean = model(tok[rows], logits_at=end[rows])[:, vocab]
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)
    assert (full - clean).abs().max() > 1e-3  # the patch matters


def test_resume_from_a_given_residual_and_stop_layer(prompts):
    """Resuming END from a patched residual (the site's resid_post), chunked prefix caches, and a run
    stopped early with its activations cached: all as in the full hooked run."""
    model, tok, end = prompts
    L, site = model.spec.n_layers, 0
    rows = torch.arange(len(tok))
    chunks = [E.cache_prefix(model, tok[i:i + 2], range(site + 1, L), logits_at=end[i:i + 2])
              for i in range(0, len(tok), 2)]
    prefix = E.PrefixCache.cat([c[0] for c in chunks])
    one, logits = E.cache_prefix(model, tok, range(site + 1, L), logits_at=end)
    torch.testing.assert_close(torch.cat([c[1] for c in chunks]), logits)
    for l in one.keys:
        torch.testing.assert_close(prefix.keys[l], one.keys[l])
    cache: dict = {}
    with torch.no_grad():
        model(tok, cache=cache, cache_names=[f"blocks.{site}.hook_resid_post"])
    patched = cache[f"blocks.{site}.hook_resid_post"][rows, end] * 1.5
    name = f"blocks.{site}.hook_resid_post"

    def hook(x):
        return x.index_put((rows, end), patched)

    scores = f"blocks.{L - 1}.attn.hook_attn_scores"
    with torch.no_grad():
        fast = E.resume(model, prefix, site + 1, end[:, None], resid=patched[:, None])
        full_cache: dict = {}
        full = model(tok, hooks={name: hook}, logits_at=end, cache=full_cache, cache_names=[scores])
        store: dict = {}
        assert E.resume(model, prefix, site + 1, end[:, None], resid=patched[:, None], stop_layer=L,
                        cache=store, cache_names=[scores]) is None
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)
    for i in range(len(tok)):  # END's scores: the cached positions before it, then its own key (last)
        got = torch.cat([store[scores][i, :, 0, :end[i]], store[scores][i, :, 0, -1:]], -1)
        torch.testing.assert_close(got, full_cache[scores][i, :, end[i], :end[i] + 1], atol=1e-5, rtol=1e-5)


def test_patch_mlps_end_matches_naive(setup):
    model, tok, src, end, metric = setup
    base = E.base_run(model, tok, end)
    rows = torch.arange(tok.shape[0])
    cache: dict = {}
    names = [f"blocks.{l}.hook_mlp_out" for l in range(model.spec.n_layers)]
    with torch.no_grad():
        model(src, cache=cache, cache_names=names)
        mlp_end = torch.stack([cache[n][rows, end] for n in names], 1)
        ref = torch.zeros(model.spec.n_layers)
        clean = metric(model(tok, logits_at=end), rows).mean()
        for l, n in enumerate(names):
            def fn(x, l=l):
                return x.index_put((rows, end), mlp_end[:, l])
            ref[l] = metric(model(tok, hooks={n: fn}, logits_at=end), rows).mean() - clean
    torch.testing.assert_close(E.patch_mlps_end(model, base, mlp_end, metric), ref, atol=1e-5, rtol=1e-4)
    part = E.patch_mlps_end(model, base, mlp_end, metric, layers=[1])
    assert part.isnan().sum() == model.spec.n_layers - 1 and not part[1].isnan()


def test_attribution_is_first_order_and_agreement_metrics(setup):
    model, tok, src, end, metric = setup
    base = E.base_run(model, tok, end)
    # a tiny source perturbation: attribution must match exact patching to first order
    eps_z = [z + 1e-3 * torch.randn_like(z) for z in base.z]
    exact = E.patch_heads_all_positions(model, base, eps_z, metric)
    attr, attr_end = E.attribution_heads(model, tok, end, eps_z, metric)
    torch.testing.assert_close(attr, exact, atol=2e-5, rtol=5e-2)
    # the END-only sum is the END patch to first order; chunks of prompts give the same sums
    eps_end = torch.stack([z[torch.arange(len(end)), end] for z in eps_z], 1)
    torch.testing.assert_close(attr_end, E.patch_heads_end(model, base, eps_end, metric), atol=2e-5, rtol=5e-2)
    chunked = E.attribution_heads(model, tok, end, eps_z, metric, batch_size=1)
    torch.testing.assert_close(chunked[0], attr, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(chunked[1], attr_end, atol=1e-6, rtol=1e-5)
    agree = E.rank_agreement(attr, exact, k=3)
    assert agree["spearman"] > 0.9 and agree["top3_overlap"] >= 2 / 3
    assert E.rank_agreement(exact, -exact, k=3)["spearman"] == pytest.approx(-1.0)
