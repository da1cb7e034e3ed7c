"""ROME (key statistic, value optimisation, closed form) and the patch <-> rank-1 edit equivalences."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from mechrepro.studies.subspace_illusion import rome as R
from mechrepro.core import subspace as S

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _spd(f, g):
    A = torch.randn(f, f + 5, generator=g, dtype=F64)
    return A @ A.T / (f + 5)


def _corpus(seed=5, n=4):
    g = _g(seed)
    return [torch.randint(1, 101, (8, 16), generator=g) for _ in range(n)]


# ------------------------------------------------------------------ key statistics
def test_key_second_moment_hand_made():
    keys = torch.tensor([[1.0, 0.0], [1.0, 2.0]])
    torch.testing.assert_close(R.key_second_moment(keys), torch.tensor([[1.0, 1.0], [1.0, 2.0]]))


def test_collect_keys_and_streaming_moments(models, arch):
    m = models[arch]
    corpus = _corpus()
    mask = torch.ones(8, 16, dtype=torch.bool)
    mask[:, 12:] = False  # "padding" excluded
    keys = R.collect_keys(m, [0, 2], [corpus[0], (corpus[1], mask)])
    assert keys[0].shape == (8 * 16 + 8 * 12, m.spec.d_mlp)
    cache = {}
    m(corpus[1], cache=cache, cache_names=["blocks.2.mlp.hook_post"])
    torch.testing.assert_close(keys[2][128:], cache["blocks.2.mlp.hook_post"][:, :12].flatten(0, 1))
    moments, n = R.key_moments(m, [0, 2], [corpus[0], (corpus[1], mask)])
    assert n == 224
    for l in (0, 2):
        torch.testing.assert_close(moments[l], R.key_second_moment(keys[l]), atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------ the closed form
def test_rome_update_stores_the_value_and_spares_C_orthogonal_keys():
    g = _g(1)
    f, d = 20, 6
    W = torch.randn(f, d, generator=g, dtype=F64)
    C = _spd(f, g)
    k = torch.randn(f, generator=g, dtype=F64)
    v_star = torch.randn(d, generator=g, dtype=F64)
    W2 = R.rome_update(W, k, v_star, C)
    torch.testing.assert_close(k @ W2, v_star, atol=1e-10, rtol=1e-10)
    assert torch.linalg.matrix_rank(W2 - W) == 1
    Cik = torch.linalg.solve(C, k)
    for _ in range(3):  # keys orthogonal to k in the C⁻¹ metric keep their value
        r = torch.randn(f, generator=g, dtype=F64)
        r = r - (r @ Cik) / (k @ Cik) * k
        torch.testing.assert_close(r @ W2, r @ W, atol=1e-10, rtol=1e-10)
    r = torch.randn(f, generator=g, dtype=F64)  # ... a generic key does not
    assert (r @ W2 - r @ W).abs().max() > 1e-3
    torch.testing.assert_close(k @ R.rome_update(W, k, v_star, None), v_star)  # identity metric


def test_edited_swaps_and_restores(models):
    m = models["gpt2"]
    W = m.p("blocks.1.W_out")
    tokens = _corpus()[0][:2]
    with torch.no_grad():
        before = m(tokens)
        with R.edited(m, 1, torch.zeros_like(W)):
            assert m.p("blocks.1.W_out").abs().max() == 0
            during = m(tokens)
        assert m.p("blocks.1.W_out") is W
        torch.testing.assert_close(m(tokens), before)
    assert (during - before).abs().max() > 1e-3
    with pytest.raises(RuntimeError):
        with R.edited(m, 1, torch.zeros_like(W)):
            raise RuntimeError("boom")
    assert m.p("blocks.1.W_out") is W


# ------------------------------------------------------------------ ROME on a tiny model
def test_rome_edit_changes_the_fact(models, arch):
    """Tiny random models barely route earlier positions to END, so the "subject" is the last
    token (where the value optimisation can reach the output); the edit is at layer 1 of 3."""
    m = models[arch]
    layer = 1
    C = R.key_moments(m, [layer], _corpus())[0][layer]
    g = _g(7)
    prompt, other = torch.randint(1, 101, (2, 1, 8), generator=g)
    end = torch.tensor([7])
    with torch.no_grad():
        before, before_other = m(prompt, logits_at=end)[0], m(other, logits_at=end)[0]
    target = int(before.argsort()[50])  # a mid-ranked token
    W_old = m.p(f"blocks.{layer}.W_out").clone()
    W = R.rome_edit(m, layer, prompt, end, end, target, C, steps=50)
    torch.testing.assert_close(m.p(f"blocks.{layer}.W_out"), W_old)  # the model is not modified
    assert torch.linalg.matrix_rank(W - W_old) == 1
    with R.edited(m, layer, W), torch.no_grad():
        after, after_other = m(prompt, logits_at=end)[0], m(other, logits_at=end)[0]
    assert int(before.argmax()) != target and int(after.argmax()) == target
    p_before, p_after = before.softmax(-1)[target], after.softmax(-1)[target]
    assert R.rewrite_score(p_before, p_after) > 0.3
    assert (after_other - before_other).abs().max() < 0.2 * (after - before).abs().max()


def test_rome_value_is_stored_at_the_key(models):
    """The edited layer's MLP output at the subject equals the optimised value ``k*W + b + δ``."""
    m = models["llama"]
    layer = 0
    prompt = torch.randint(1, 101, (1, 8), generator=_g(8))
    subj, end = torch.tensor([5]), torch.tensor([7])
    delta = R.optimize_value(m, layer, prompt, subj, end, 3, steps=10)
    cache = {}
    m(prompt, cache=cache, cache_names=[f"blocks.{layer}.hook_mlp_out"])
    clean = cache[f"blocks.{layer}.hook_mlp_out"][0, 5]
    W = R.rome_edit(m, layer, prompt, subj, end, 3, C=None, steps=10)
    with R.edited(m, layer, W):
        m(prompt, cache=cache, cache_names=[f"blocks.{layer}.hook_mlp_out"])
    torch.testing.assert_close(cache[f"blocks.{layer}.hook_mlp_out"][0, 5], clean + delta, atol=1e-5, rtol=1e-5)
    assert delta.norm() > 1e-2


# ------------------------------------------------------------------ ROME's value step (compute_v)
def _value_rows(seed=11, n_ctx=2):
    """Rewriting rows (bare prompt, then longer "contexts" ending in the same fact) and one essence
    row read at its subject; the subject is near the end (tiny random models barely route earlier
    positions to the last one)."""
    g = _g(seed)
    fact = torch.randint(1, 101, (5,), generator=g).tolist()
    rows = [[0, *fact]] + [[0, *torch.randint(1, 101, (2 + i,), generator=g).tolist(), *fact] for i in range(n_ctx)]
    subj = [len(r) - 2 for r in rows]  # the fact's 4th token; read at the end (5th)
    essence = [0, *fact[:4], 7, 8]
    rows.append(essence)
    subj.append(4)
    read = [len(r) - 1 for r in rows[:-1]] + [4]
    width = max(map(len, rows))
    tokens = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    return tokens, torch.tensor(subj), torch.tensor(read), n_ctx + 1


def _hooked_logits(m, layer, tokens, subj, read, delta):
    rows = torch.arange(len(tokens))

    def hook(x):
        return x.index_put((rows, subj), x[rows, subj] + delta)

    return m(tokens, hooks={f"blocks.{layer}.hook_mlp_out": hook}, logits_at=read)


def test_subject_run_matches_the_hooked_full_forward(models, arch):
    m = models[arch]
    tokens, subj, read, _ = _value_rows()
    run = R.SubjectRun(m, 1, tokens, subj, read)
    delta = torch.randn(m.spec.d_model, generator=_g(1))
    with torch.no_grad():
        torch.testing.assert_close(run(delta), _hooked_logits(m, 1, tokens, subj, read, delta), atol=1e-5, rtol=1e-5)
        # one delta per row, rows repeating a cached prompt (the alpha scan)
        many = torch.randn(3, m.spec.d_model, generator=_g(2))
        got = run(many, torch.tensor([0, 0, 3]))
        for i, r in enumerate((0, 0, 3)):
            ref = _hooked_logits(m, 1, tokens[r:r + 1], subj[r:r + 1], read[r:r + 1], many[i])
            torch.testing.assert_close(got[i:i + 1], ref, atol=1e-5, rtol=1e-5)
    assert (run(delta)[0] - run(0 * delta)[0]).abs().max() > 1e-3


def _naive_rome_v(m, layer, tokens, subj, read, n, target, hp):
    """ROME's compute_v written out plainly: full hooked forward passes, torch's kl_div as ROME calls it."""
    import torch.nn.functional as Fn

    cache = {}
    m(tokens[:1], cache=cache, cache_names=[f"blocks.{layer}.hook_mlp_out"])
    v0 = cache[f"blocks.{layer}.hook_mlp_out"][0, subj[0]]
    delta = torch.zeros_like(v0, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.lr)
    init, losses = None, []
    for it in range(hp.steps):
        logp = _hooked_logits(m, layer, tokens, subj, read, delta).log_softmax(-1)
        if init is None:
            init = logp[n:].detach()
        nll = -logp[:n, target].mean()
        kl = hp.kl_factor * Fn.kl_div(init, logp[n:], log_target=True, reduction="batchmean")
        loss = nll + kl + hp.weight_decay * torch.norm(delta) / torch.norm(v0) ** 2
        losses.append(float(loss.detach()))
        if loss < hp.early_stop or it == hp.steps - 1:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            if delta.norm() > hp.clamp * v0.norm():
                delta[...] = delta * hp.clamp * v0.norm() / delta.norm()
    return delta.detach(), losses


def test_rome_value_equals_a_naive_reference_of_romes_loss(models, arch):
    m = copy.deepcopy(models[arch]).double()
    tokens, subj, read, n = _value_rows()
    hp = R.ValueParams(steps=8, lr=0.1, weight_decay=0.5, clamp=4.0, kl_factor=2.0, early_stop=0.0)
    res = R.rome_value(R.SubjectRun(m, 1, tokens, subj, read), n, 42, hp)
    ref, losses = _naive_rome_v(m, 1, tokens, subj, read, n, 42, hp)
    torch.testing.assert_close(res.delta, ref, atol=1e-8, rtol=1e-6)
    assert res.losses == pytest.approx(losses, rel=1e-8)
    assert res.steps == 7 and not res.stopped_early and len(res.losses) == 8  # the last pass only measures
    assert res.kl > 0 and res.wd == pytest.approx(0.5 * float(res.delta.norm()) / res.v0_norm ** 2)
    assert res.losses[-1] < res.losses[0]
    # the squared-norm penalty of the simplified step is a different loss: a different delta
    other = R.simplified_value(R.SubjectRun(m, 1, tokens, subj, read), n, 42, hp)
    assert (other.delta - res.delta).abs().max() > 1e-4


def test_rome_value_early_stop_and_clamp(models):
    m = models["gpt2"]
    tokens, subj, read, n = _value_rows()
    run = R.SubjectRun(m, 1, tokens, subj, read)
    free = R.rome_value(run, n, 42, R.ValueParams(steps=10, early_stop=0.0))
    losses = free.losses
    assert losses[3] < min(losses[:3])
    thr = (losses[3] + min(losses[:3])) / 2
    early = R.rome_value(run, n, 42, R.ValueParams(steps=10, early_stop=thr))
    assert early.stopped_early and early.steps == 3 and early.losses == pytest.approx(losses[:4])
    none = R.rome_value(run, n, 42, R.ValueParams(steps=10, early_stop=1e6))  # stops before any update
    assert none.stopped_early and none.steps == 0 and float(none.delta.norm()) == 0.0
    tight = R.rome_value(run, n, 42, R.ValueParams(steps=6, clamp=0.01, early_stop=0.0))
    assert tight.clamped and tight.clamp_steps == tight.steps == 5
    assert float(tight.delta.norm()) == pytest.approx(0.01 * tight.v0_norm, rel=1e-5)
    assert not free.clamped or free.clamp_steps > 0


def test_rome_value_kl_term_keeps_the_essence_prompt(models):
    """The KL term holds the essence row's distribution near its clean one."""
    m = models["llama"]
    tokens, subj, read, n = _value_rows()
    run = R.SubjectRun(m, 1, tokens, subj, read)
    with torch.no_grad():
        clean = run(torch.zeros(m.spec.d_model))[n].log_softmax(-1)

    def drift(kl_factor):
        res = R.rome_value(run, n, 42, R.ValueParams(steps=15, lr=0.2, kl_factor=kl_factor, early_stop=0.0))
        with torch.no_grad():
            new = run(res.delta)[n].log_softmax(-1)
        return float((new.exp() * (new - clean)).sum()), res

    free, res_free = drift(0.0)
    held, res_held = drift(50.0)
    assert res_free.kl == 0.0 and res_held.kl > 0
    assert held < 0.5 * free


def test_generate_contexts_top_k_and_seeded(models):
    m = models["gpt2"]

    def decode(ids):
        return " ".join(map(str, ids))

    texts = R.generate_contexts(m, 0, decode, [[3, 2], [5, 3]], seed=4)
    assert [len(t.split()) for t in texts] == [2, 2, 4, 4, 4]
    assert texts == R.generate_contexts(m, 0, decode, [[3, 2], [5, 3]], seed=4)
    assert texts != R.generate_contexts(m, 0, decode, [[3, 2], [5, 3]], seed=5)
    with torch.no_grad():  # every token is one of the model's top 5 after its prefix
        for t in texts:
            ids = [0, *map(int, t.split())]
            logits = m(torch.tensor([ids]))[0]
            for j in range(1, len(ids)):
                assert ids[j] in logits[j - 1].topk(5).indices.tolist()


def test_rome_left_stores_delta_at_the_bare_key():
    g = _g(12)
    f, d = 16, 6
    W = torch.randn(f, d, generator=g, dtype=F64)
    C = _spd(f, g)
    k_bare, k2 = torch.randn(2, f, generator=g, dtype=F64)
    delta = torch.randn(d, generator=g, dtype=F64)
    k_star = (k_bare + k2) / 2
    u = R.rome_left(C, k_star, k_bare, 0.0)
    torch.testing.assert_close(k_bare @ (W + torch.outer(u, delta)) - k_bare @ W, delta)
    torch.testing.assert_close(u / u.norm(), S.unit(torch.linalg.solve(C, k_star)))  # ROME's direction C⁻¹k*


# ------------------------------------------------------------------ diagnostics
def test_smallest_scale_constructed():
    calls = []

    def above(threshold):
        def fn(alphas):
            calls.append(len(alphas))
            return alphas > threshold
        return fn

    assert R.smallest_scale(above(0.37), 2.0) == pytest.approx(0.37, abs=2.0 / 16 / 2 ** 12)
    assert calls[0] == 16 and all(c == 1 for c in calls[1:])
    assert math.isnan(R.smallest_scale(above(5.0), 2.0))
    assert R.smallest_scale(above(0.0), 2.0) < 1e-3  # rewrites at any scale
    # not monotone: the first crossing on the grid is found
    assert R.smallest_scale(lambda a: (a > 0.3) & (a < 0.6), 2.0) == pytest.approx(0.3, abs=1e-3)


def test_edit_geometry_constructed():
    """W with singular values 4, 2, 1: the gain of δ is the singular value of its direction; z is δ's
    preimage; the row fraction is ρ/‖z‖ of the source's difference."""
    f, d = 5, 3
    U = torch.linalg.qr(torch.randn(f, f, generator=_g(13), dtype=F64))[0][:, :d]
    V = torch.linalg.qr(torch.randn(d, d, generator=_g(14), dtype=F64))[0]
    W = U @ torch.diag(torch.tensor([4.0, 2.0, 1.0], dtype=F64)) @ V.T
    k = torch.randn(f, generator=_g(15), dtype=F64)
    for j, sv in enumerate((4.0, 2.0, 1.0)):
        w = 3.0 * V[:, j]  # δ along one output direction
        u = k / (k @ k)  # so that (kᵀu) w = w
        k_src = k + 0.5 * U[:, j]
        conv = R.rank1_edit_to_subspace(W, u, w, k, k_src)
        geo = R.edit_geometry(W, conv, torch.eye(f, dtype=F64))
        assert geo["gain_rel"] == pytest.approx(sv / 4.0)
        assert geo["z_norm"] == pytest.approx(3.0 / sv)
        assert geo["z_over_rms"] == pytest.approx(3.0 / sv)  # C = I: RMS 1 along every direction
        assert abs(geo["row_frac"]) == pytest.approx(0.5 / (3.0 / sv))
    assert math.isnan(R.edit_geometry(W, conv, None)["z_over_rms"])


# ------------------------------------------------------------------ patch -> rank-1 edit
def test_patch_to_rank1_edit_algebra():
    g = _g(2)
    f, d = 24, 8
    W = torch.randn(f, d, generator=g, dtype=F64)
    C = _spd(f, g)
    k_base, k_src, other = torch.randn(3, f, generator=g, dtype=F64)
    v = S.unit(torch.randn(f, generator=g, dtype=F64))
    W2 = R.patch_to_rank1_edit(W, v, k_base, k_src, C)
    patched = S.subspace_patch(k_base, k_src, v)
    torch.testing.assert_close(k_base @ W2, patched @ W, atol=1e-10, rtol=1e-10)
    a = v @ (k_src - k_base)
    b = torch.linalg.solve(C, k_base) / (k_base @ torch.linalg.solve(C, k_base))
    torch.testing.assert_close(other @ W2 - other @ W, (other @ b) * a * (v @ W), atol=1e-10, rtol=1e-10)
    assert (other @ W2 - other @ W).abs().max() > 1e-3


def _mlp_out(m, layer, tokens, hooks=None):
    cache = {}
    logits = m(tokens, hooks=hooks, cache=cache, cache_names=[f"blocks.{layer}.hook_mlp_out"])
    return cache[f"blocks.{layer}.hook_mlp_out"][0], logits[0, -1]


def test_patch_equals_rank1_edit_in_the_model(models, arch):
    """The MLP output at the patched key is identical; other positions move by (kᵀb)·a·vᵀW; with
    C = the prompt's own key moment (other keys C⁺-orthogonal to k_base) the END logits agree."""
    m = copy.deepcopy(models[arch]).double()
    layer, i = 1, 3
    g = _g(9)
    base, src = torch.randint(1, 101, (2, 1, 8), generator=g)
    name = f"blocks.{layer}.mlp.hook_post"
    keys = R.collect_keys(m, [layer], [base])[layer]  # [8, f]
    k_base, k_src = keys[i], R.collect_keys(m, [layer], [src])[layer][5]
    v = S.unit(torch.randn(m.spec.d_mlp, generator=g, dtype=F64))

    def patch(x):
        x = x.clone()
        x[0, i] = S.subspace_patch(x[0, i], k_src, v)
        return x

    out_patch, logits_patch = _mlp_out(m, layer, base, {name: patch})
    out_clean, logits_clean = _mlp_out(m, layer, base)
    W = m.p(f"blocks.{layer}.W_out")
    C = R.key_moments(m, [layer], _corpus())[0][layer]
    with R.edited(m, layer, R.patch_to_rank1_edit(W, v, k_base, k_src, C)):
        out_edit, logits_edit = _mlp_out(m, layer, base)
    torch.testing.assert_close(out_edit[i], out_patch[i], atol=1e-5, rtol=1e-5)
    b = torch.linalg.pinv(C, hermitian=True) @ k_base
    b = b / (k_base @ b)
    a = v @ (k_src - k_base)
    for j in range(i):  # earlier positions: the patch changes nothing, the edit (kᵀb)·a·vᵀW
        torch.testing.assert_close(out_edit[j] - out_clean[j], (keys[j] @ b) * a * (v @ W), atol=1e-5, rtol=1e-5)
    assert (out_edit[:i] - out_clean[:i]).abs().max() > 1e-4
    assert (logits_edit - logits_patch).abs().max() > 1e-4  # so END differs with a corpus C

    C_own = R.key_second_moment(keys)
    with R.edited(m, layer, R.patch_to_rank1_edit(W, v, k_base, k_src, C_own)):
        out_own, logits_own = _mlp_out(m, layer, base)
    torch.testing.assert_close(out_own, out_patch, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits_own, logits_patch, atol=1e-5, rtol=1e-5)
    assert (logits_patch - logits_clean).abs().max() > 1e-2


# ------------------------------------------------------------------ rank-1 edit -> patch
def _rome_setting(seed=3, f=24, d=8, null_scale=3.0):
    g = _g(seed)
    W = torch.randn(f, d, generator=g, dtype=F64)
    C = _spd(f, g)
    k = torch.randn(f, generator=g, dtype=F64)
    v_star = k @ W + torch.randn(d, generator=g, dtype=F64)
    W2 = R.rome_update(W, k, v_star, C)
    Q = S.rowspace_basis(W)
    diff = torch.randn(f, generator=g, dtype=F64)
    row, null = S.decompose(diff, Q)
    k_src = k + 0.05 * row + null_scale * null  # the source differs mostly in the null space
    Cik = torch.linalg.solve(C, k)
    u = Cik / (k @ Cik)
    return W, C, k, k_src, u, v_star - k @ W, W2, Q


def test_rank1_edit_to_subspace_reproduces_the_edit():
    W, C, k, k_src, u, w, W2, Q = _rome_setting()
    torch.testing.assert_close(W + torch.outer(u, w), W2)
    r = R.rank1_edit_to_subspace(W, u, w, k, k_src)
    assert r.exact and r.achieved == pytest.approx(1.0)
    assert r.v.norm() == pytest.approx(1.0)
    edit_change = (k @ u) * w
    torch.testing.assert_close(S.subspace_patch(k, k_src, r.v) @ W - k @ W, edit_change)
    # round trip: the patch's rank-1 edit (same C) is the ROME edit itself
    torch.testing.assert_close(R.patch_to_rank1_edit(W, r.v, k, k_src, C), W2)
    # the illusion: the null part alone does nothing, the row part alone a small fraction
    v_row, v_null = S.decompose(r.v, Q)
    assert 0.01 < v_null.norm() < 0.5  # the row-heavy solution: a small tilt into the null space
    torch.testing.assert_close(S.subspace_patch(k, k_src, S.unit(v_null)) @ W, k @ W)
    row_only = S.subspace_patch(k, k_src, R.rowspace_component(r.v, Q)) @ W - k @ W
    frac = float(row_only @ edit_change / (edit_change @ edit_change))
    torch.testing.assert_close(row_only, frac * edit_change)
    assert abs(frac) < 0.5


def test_rank1_edit_to_subspace_infeasible_source():
    W, C, k, _, u, w, _, Q = _rome_setting()
    k_src = k + 1e-3 * torch.randn(len(k), generator=_g(4), dtype=F64)  # almost no variation
    r = R.rank1_edit_to_subspace(W, u, w, k, k_src)
    assert not r.exact and 0 < r.achieved < 1
    change = S.subspace_patch(k, k_src, r.v) @ W - k @ W
    edit_change = (k @ u) * w
    torch.testing.assert_close(change, r.achieved * edit_change)


# ------------------------------------------------------------------ scores
def test_rewrite_score_and_efficacy():
    assert float(R.rewrite_score(0.2, 0.6)) == pytest.approx(0.5)
    assert float(R.rewrite_score(0.2, 1.0)) == pytest.approx(1.0)
    assert float(R.rewrite_score(0.2, 0.2)) == pytest.approx(0.0)
    assert float(R.rewrite_score(0.5, 0.25)) == pytest.approx(-0.5)
    torch.testing.assert_close(R.rewrite_score(torch.tensor([0.0, 0.5]), torch.tensor([0.5, 0.75])),
                               torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(R.efficacy(torch.tensor([0.3, 0.1]), torch.tensor([0.2, 0.2])),
                               torch.tensor([1.0, 0.0]))
