"""Subspace patching, row/null-space decomposition, Study B's toy model, DAS and the IOI metrics."""

from __future__ import annotations

import pytest
import torch

from mechrepro.core import subspace as S
from mechrepro.studies.subspace_illusion import toy as T


pytestmark = pytest.mark.usefixtures("one_thread")


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ the patch
def test_subspace_patch_matches_projection_and_is_scale_invariant():
    g = _g()
    a_src = torch.randn(2, 3, 7, generator=g, dtype=torch.float64)
    a_base = torch.randn(2, 3, 7, generator=g, dtype=torch.float64)
    v = torch.randn(7, generator=g, dtype=torch.float64)
    P = torch.outer(v, v) / (v @ v)  # naive reference: projector onto span(v)
    ref = a_base @ (torch.eye(7, dtype=torch.float64) - P) + a_src @ P
    out = S.subspace_patch(a_base, a_src, v)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(S.subspace_patch(a_base, a_src, 3.7 * v), out)
    torch.testing.assert_close(S.subspace_patch(a_base, a_src, -v), out)
    # the orthogonal complement keeps its base value; the v component is the source's
    u = S.unit(v)
    torch.testing.assert_close((out - a_base) - ((out - a_base) @ u)[..., None] * u, torch.zeros_like(out))
    torch.testing.assert_close(out @ u, a_src @ u)
    assert not torch.allclose(out, a_src)


def test_patching_a_full_basis_reproduces_the_source():
    g = _g(1)
    a_base, a_src = torch.randn(2, 5, 6, generator=g, dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    a = a_base
    for i in range(6):
        a = S.subspace_patch(a, a_src, Q[:, i])
        if i < 5:
            assert not torch.allclose(a, a_src)
    torch.testing.assert_close(a, a_src)


# ------------------------------------------------------------------ row space / null space
def test_decomposition_against_W_out(models, arch):
    W = models[arch].p("blocks.1.W_out").double()  # [f, d], out = h @ W
    Q = S.rowspace_basis(W)
    f, d = W.shape
    assert Q.shape == (f, d)
    torch.testing.assert_close(Q.T @ Q, torch.eye(d, dtype=Q.dtype))
    torch.testing.assert_close(Q @ (Q.T @ W), W)  # Q spans the columns of W (the map's input side)
    v = torch.randn(f, generator=_g(2), dtype=W.dtype)
    v_row, v_null = S.decompose(v, Q)
    torch.testing.assert_close(v_row + v_null, v)
    assert float(v_null @ W @ (v_null @ W)) ** 0.5 < 1e-5 * float(v.norm() * W.norm())
    assert abs(float(v_row @ v_null)) < 1e-8
    assert v_null.norm() > 0.5 and v_row.norm() > 0.2  # both parts are really there
    torch.testing.assert_close(v_row @ W, v @ W)  # the map only sees the row part


def test_mlp_rowspace_centres_for_layernorm(models):
    for arch, r in (("gpt2", 31), ("llama", 32)):
        m = models[arch]
        Q = S.mlp_rowspace(m, 1)
        assert Q.shape == (m.spec.d_mlp, r)
        v = torch.randn(m.spec.d_mlp, generator=_g(8))
        _, v_null = S.decompose(v, Q)
        out = v_null @ m.p("blocks.1.W_out")
        if arch == "gpt2":  # the null part writes only along the mean direction, which LayerNorm removes
            assert out.abs().max() > 1e-3
            torch.testing.assert_close(out - out.mean(), torch.zeros_like(out), atol=1e-5, rtol=0)
        else:
            torch.testing.assert_close(out, torch.zeros_like(out), atol=1e-5, rtol=0)
    assert S.mlp_rowspace(models["gpt2"], 1, center=False).shape[1] == 32


def test_rowspace_basis_rank_deficient_and_conventions():
    g = _g(3)
    a, b = torch.randn(2, 9, generator=g, dtype=torch.float64)
    W = torch.outer(a, torch.randn(4, generator=g, dtype=torch.float64)) + \
        torch.outer(b, torch.randn(4, generator=g, dtype=torch.float64))  # [9, 4], rank 2
    Q = S.rowspace_basis(W)
    assert Q.shape == (9, 2)
    for x in (a, b):  # the columns' span is span(a, b) ⊂ R^9
        torch.testing.assert_close(Q @ (Q.T @ x), x)
    assert S.rowspace_basis(W.T).shape == (4, 2)  # the other convention: a subspace of R^4


def test_query_rowspace(models):
    import copy

    heads = [(1, 0), (2, 3)]
    for arch in ("gpt2", "llama"):
        m = copy.deepcopy(models[arch])
        for l, _ in heads:  # HF initialises norm gains to 1; make the folding matter
            m.p(f"blocks.{l}.ln1.w").uniform_(0.2, 2.0, generator=_g(l))
        e = m.spec.d_head
        raw = S.query_rowspace(m, heads, fold_norm=False)
        ref = torch.cat([m.p(f"blocks.{l}.W_Q")[h] for l, h in heads], dim=1)
        assert raw.shape == (m.spec.d_model, 2 * e)
        torch.testing.assert_close(raw @ (raw.T @ ref), ref, atol=1e-5, rtol=1e-5)
        Q = S.query_rowspace(m, heads)
        n = torch.randn(m.spec.d_model, generator=_g(4))
        n = n - Q @ (Q.T @ n)  # in the folded map's kernel
        for l, h in heads:
            x = n - n.mean() if arch == "gpt2" else n  # what the norm passes on (up to its scale)
            q = (x * m.p(f"blocks.{l}.ln1.w")) @ m.p(f"blocks.{l}.W_Q")[h]
            assert q.abs().max() < 1e-4
        if arch == "gpt2":  # LayerNorm removes the mean direction: it is outside the folded row space
            ones = torch.ones(m.spec.d_model) / m.spec.d_model ** 0.5
            assert (Q.T @ ones).abs().max() < 1e-5


# ------------------------------------------------------------------ toy model
def test_toy_example_numbers_are_computed():
    r = T.toy_example()
    assert r["e3"] == pytest.approx(-2.0, abs=1e-12) and r["full"] == pytest.approx(-2.0, abs=1e-12)
    assert abs(r["v"] - r["e3"]) < 1e-6
    assert abs(r["v_null"]) < 1e-6 and abs(r["v_row"]) < 1e-6
    assert r["v_row_readout"] == pytest.approx(r["full"])  # the 1-D readout split cannot show it
    assert r["v_null_norm"] == pytest.approx(2 ** -0.5)
    # the numbers follow the weights: a dormant unit that writes half as much halves the effect
    m = T.ToyModel()
    m.W_out = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    r2 = T.toy_example(m)
    assert r2["v"] == pytest.approx(0.5 * r2["e3"]) and r2["v_null"] == pytest.approx(0.0)


def test_toy_record_draws_what_the_effects_say():
    rec = T.toy_record()
    assert set(T.toy_example()) <= set(rec) and rec["v"] == T.toy_example()["v"]
    assert rec["weights"]["readout_w"] == [0.0, 2.0, 1.0]
    assert rec["h_base"] == [1.0, 0.0, 1.0] and rec["h_src"] == [-1.0, -0.0, -1.0]
    # patching v moves the dormant unit h2 by as much as the disconnected unit h1 varies
    assert rec["h_patched"]["v"] == pytest.approx([0.0, -1.0, 1.0])
    assert rec["h_patched"]["e3"] == pytest.approx([1.0, 0.0, -1.0])
    assert rec["h_patched"]["v_null"] == pytest.approx([-1.0, 0.0, 1.0])  # h1 changes, but writes nothing
    for key, d in rec["directions"].items():
        assert sum(x * x for x in d) == pytest.approx(1.0), key


# ------------------------------------------------------------------ DAS
def test_learn_direction_recovers_a_linear_readout():
    g = _g(5)
    n, dim = 96, 16
    v_true = S.unit(torch.randn(dim, generator=g))
    a_base = torch.randn(n, dim, generator=g)
    a_src = torch.randn(n, dim, generator=g)
    sign = torch.randint(0, 2, (n,), generator=g) * 2 - 1
    a_base = a_base - (a_base @ v_true)[:, None] * v_true - 1.5 * sign[:, None] * v_true
    a_src = a_src - (a_src @ v_true)[:, None] * v_true + 1.5 * sign[:, None] * v_true
    readout = torch.stack([torch.zeros(dim), v_true], dim=1) * 4  # class 1 iff the v_true coordinate > 0

    def forward_fn(x, idx):
        return x @ readout

    target = (sign > 0).long()
    assert S.interchange_accuracy(a_base @ readout, target) == 0.0
    v = S.learn_direction(a_base, a_src, forward_fn, target, epochs=30, lr=0.05, batch=16, seed=0)
    assert v.norm() == pytest.approx(1.0)
    assert abs(float(v @ v_true)) > 0.9
    assert S.interchange_accuracy(S.patched_logits(a_base, a_src, forward_fn, v), target) == 1.0
    again = S.learn_direction(a_base, a_src, forward_fn, target, epochs=30, lr=0.05, batch=16, seed=0)
    torch.testing.assert_close(again, v)  # seeded


def test_learn_direction_logit_diff_loss():
    g = _g(6)
    dim = 8
    v_true = S.unit(torch.randn(dim, generator=g))
    a_base, a_src = -v_true[None].repeat(4, 1), v_true[None].repeat(4, 1)
    readout = torch.stack([-v_true, v_true], dim=1)  # token 0 = base object, token 1 = source object
    target = torch.tensor([[0, 1]] * 4)
    history: list[float] = []
    v = S.learn_direction(a_base, a_src, lambda x, idx: x @ readout, target, epochs=100, lr=0.05, batch=4,
                          history=history, loss="logit_diff")
    assert history[-1] < history[0] and history[-1] < 0  # the patch flipped the preference
    assert abs(float(v @ v_true)) > 0.99
    with pytest.raises(ValueError):
        S.learn_direction(a_base, a_src, lambda x, idx: x @ readout, target, epochs=1, loss="mse")


def _prompts(seed=3, n=160, p=6):
    g = _g(seed)
    tokens = torch.randint(1, 101, (n, p), generator=g)
    return tokens, torch.full((n,), p - 1), g


@pytest.mark.parametrize("site", ["mlp", "resid"])
def test_forward_fn_matches_a_full_hooked_run(models, arch, site):
    m = models[arch]
    tokens, end, g = _prompts(n=12, p=7)
    pos = torch.randint(2, 7, (12,), generator=g)
    layer = 1
    name = f"blocks.{layer}.mlp.hook_post" if site == "mlp" else f"blocks.{layer}.hook_resid_post"
    build = S.mlp_post_forward if site == "mlp" else S.resid_post_forward
    fwd = build(m, layer, tokens, pos, end)
    a = S.site_activations(m, name, tokens, pos)
    src = S.site_activations(m, name, tokens.flip(0), pos.flip(0))
    v = S.unit(torch.randn(a.shape[1], generator=g))
    idx = torch.tensor([0, 3, 4, 9])
    patched = S.subspace_patch(a[idx], src[idx], v)
    rows = torch.arange(len(idx))

    def hook(x):
        x = x.clone()
        x[rows, pos[idx]] = patched
        return x

    with torch.no_grad():
        ref = m(tokens[idx], hooks={name: hook}, logits_at=end[idx])
        clean = m(tokens[idx], logits_at=end[idx])
        torch.testing.assert_close(fwd(patched, idx), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fwd(a[idx], idx), clean, atol=1e-5, rtol=1e-5)
    assert (ref - clean).abs().max() > 1e-3  # the patch matters


@pytest.mark.parametrize("site", ["mlp", "resid"])
def test_das_finds_the_direction_that_controls_the_output(models, site):
    """Sources differ from the bases along a known direction (by ±c) and by irrelevant noise
    orthogonal to it; the expected token is what patching the known direction alone gives. The full
    patch and a random direction fail; DAS reaches high interchange accuracy. The unembedding is
    sharpened ×10 so that the cross-entropy optimum is a confident prediction."""
    import copy

    m = copy.deepcopy(models["llama"])
    m.w__W_U *= 10
    tokens, end, g = _prompts()
    layer = 1
    if site == "mlp":
        fwd, name = S.mlp_post_forward(m, layer, tokens, end, end), f"blocks.{layer}.mlp.hook_post"
    else:
        fwd, name = S.resid_post_forward(m, layer, tokens, end, end), f"blocks.{layer}.hook_resid_post"
    a = S.site_activations(m, name, tokens, end)
    n, dim = a.shape
    v_true = S.unit(torch.randn(dim, generator=g))
    c = 2 * a.norm(dim=1).mean()
    sign = torch.randint(0, 2, (n,), generator=g) * 2 - 1
    noise = torch.randn(n, dim, generator=g) * c / dim ** 0.5
    src = a + c * sign[:, None] * v_true + noise - (noise @ v_true)[:, None] * v_true
    target = S.patched_logits(a, src, fwd, v_true).argmax(-1)
    assert S.interchange_accuracy(S.patched_logits(a, a, fwd, None), target) < 0.35
    assert S.interchange_accuracy(S.patched_logits(a, src, fwd, None), target) < 0.5
    v = S.learn_direction(a, src, fwd, target, epochs=30, lr=0.05, batch=20, seed=0)
    assert S.interchange_accuracy(S.patched_logits(a, src, fwd, v), target) > 0.9
    if site == "resid":
        assert abs(float(v @ v_true)) > 0.85
    else:  # the MLP hidden space has a null space (f > d): directions are identified less sharply
        assert abs(float(v @ v_true)) > 0.5


# ------------------------------------------------------------------ metrics and baselines
def test_metrics_hand_made():
    clean = torch.tensor([2.0, 4.0])
    assert S.fldd(torch.tensor([0.0, 0.0]), clean) == pytest.approx(100.0)
    assert S.fldd(torch.tensor([-3.0, -3.0]), clean) == pytest.approx(200.0)
    assert S.fldd(torch.tensor([3.0, 3.0]), clean) == pytest.approx(0.0)
    assert S.fldd(torch.tensor([4.5, 4.5]), clean) == pytest.approx(-50.0)
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 2.0], [0.0, 1.0, 9.0], [1.0, 2.0, 0.0]])
    assert S.interchange_accuracy(logits, torch.tensor([1, 2, 2, 1])) == pytest.approx(0.75)


def test_baselines():
    a = torch.tensor([[1.0, 2.0], [3.0, 2.0]])
    b = torch.tensor([[0.0, 2.0], [0.0, 2.0]])
    torch.testing.assert_close(S.v_mean(a, b), torch.tensor([1.0, 0.0]))
    w = torch.tensor([3.0, -4.0])
    torch.testing.assert_close(S.v_grad(lambda x: x @ w, a), torch.tensor([0.6, -0.8]))
    torch.testing.assert_close(S.v_grad(lambda x: (x ** 2).sum(1), a), S.unit(2 * a.mean(0)))
    assert S.random_null_norm(3072, 768) == pytest.approx(0.866, abs=1e-3)


def test_v_grad_of_attention_score_difference_matches_a_full_run(models, arch):
    m = models[arch]
    tokens, end, _ = _prompts(n=6, p=7)
    layer, heads = 0, [(1, 0), (2, 2)]
    pos_a, pos_b = torch.full((6,), 2), torch.full((6,), 4)
    fn = S.attn_score_diff_fn(m, layer, tokens, end, heads, pos_a, pos_b)
    resid = S.site_activations(m, f"blocks.{layer}.hook_resid_post", tokens, end)
    rows = torch.arange(6)

    def naive(x):
        cache = {}

        def hook(r):
            r = r.clone()
            r[rows, end] = x
            return r

        m(tokens, hooks={f"blocks.{layer}.hook_resid_post": hook}, cache=cache,
          cache_names=[f"blocks.{l}.attn.hook_attn_scores" for l in (1, 2)])
        return torch.stack([cache[f"blocks.{l}.attn.hook_attn_scores"][rows, h, end, pos_a]
                            - cache[f"blocks.{l}.attn.hook_attn_scores"][rows, h, end, pos_b]
                            for l, h in heads]).mean(0)

    torch.testing.assert_close(fn(resid), naive(resid), atol=1e-5, rtol=1e-5)
    g = S.v_grad(fn, resid)
    torch.testing.assert_close(g, S.v_grad(naive, resid), atol=1e-5, rtol=1e-4)
    eps = 1e-2  # the gradient direction increases the score difference
    assert float(fn(resid + eps * g).mean()) > float(fn(resid).mean())
