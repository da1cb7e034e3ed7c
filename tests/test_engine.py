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


def test_suffix_forward_equals_full_forward(setup):
    """Recomputing only the END token over the cached prefix gives the full run's END logits."""
    model, tok, _, end, _ = setup
    base = E.base_run(model, tok, end)
    rows = torch.arange(tok.shape[0])
    with torch.no_grad():
        logits = model(None, start_layer=0, start_resid=base.resid_pre[0][rows, end][:, None],
                       positions=end[:, None], past={l: (base.keys[l], base.values[l]) for l in range(model.spec.n_layers)},
                       past_len=end, logits_at=torch.zeros_like(end))
    torch.testing.assert_close(logits, base.end_logits, atol=1e-5, rtol=1e-5)


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
