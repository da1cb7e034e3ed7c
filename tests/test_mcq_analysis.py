"""Study C analyses on tiny random models (GPT-2, grouped-query Llama, Qwen2 with q/k/v biases)."""

from __future__ import annotations

import pytest
import torch
from conftest import SMALL_VOCAB

from mechrepro.studies.mcq_circuits import analysis as ma


def fake_batch(seed: int, b: int = 6, p: int = 14, n: int = 4) -> dict:
    """MCQ-shaped random prompts: labels at 3, 5, 7, 9 (content right after), END varies, right padding."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, SMALL_VOCAB, (b, p), generator=g)
    end = torch.tensor([13, 12, 13, 12, 12, 13])[:b]
    for i in range(b):
        tokens[i, end[i] + 1:] = 0
    label_pos = torch.tensor([3, 5, 7, 9]).repeat(b, 1)
    content = torch.zeros(b, n, p, dtype=torch.long)
    for j in range(n):
        content[:, j, label_pos[0, j] + 1] = 1
    answer = torch.zeros(b, p, dtype=torch.long)
    answer[torch.arange(b), end] = 1
    answer[torch.arange(b), end - 1] = 1
    answer_ids = torch.stack([torch.randperm(SMALL_VOCAB - 1, generator=g)[:n] + 1 for _ in range(b)])
    return {"tokens": tokens, "mask": (tokens > 0).long(), "end": end, "answer_ids": answer_ids,
            "correct": torch.arange(b) % n, "label_pos": label_pos, "content_mask": content, "answer_mask": answer}


@pytest.fixture(scope="module")
def batches():
    clean = fake_batch(0)
    corrupt = fake_batch(1)
    corrupt["answer_ids"], corrupt["correct"] = clean["answer_ids"], (clean["correct"] + 1) % 4
    return clean, corrupt


def test_dla_sums_to_the_logit_difference(models, arch, batches, one_thread):
    model = models[arch]
    clean, _ = batches
    comps = ma.end_components(model, clean)
    d = ma.dla(model, comps, clean["answer_ids"], clean["correct"])
    assert d["heads"].shape == (6, model.spec.n_layers, model.spec.n_heads)
    assert torch.allclose(d["total"], d["ld"], atol=1e-4), (d["total"] - d["ld"]).abs().max()
    assert d["ld"].abs().max() > 1e-2  # a real test: LD is not trivially zero
    # heads' DLA is not a constant share: changing one head's output changes only its own DLA
    z = comps["z"].clone()
    z[:, 0, 1] *= 2
    d2 = ma.dla(model, dict(comps, z=z), clean["answer_ids"], clean["correct"])
    assert torch.allclose(d2["heads"][:, 0, 1], 2 * d["heads"][:, 0, 1], atol=1e-5)
    assert torch.allclose(d2["heads"][:, 1:], d["heads"][:, 1:])


def _naive_ld(model, batch, hooks) -> torch.Tensor:
    logits = model(batch["tokens"], hooks=hooks, logits_at=batch["end"])
    return ma.ld_from_options(ma.option_logits(logits, batch["answer_ids"]), batch["correct"])


@torch.no_grad()
def test_patching_matches_a_naive_reference(models, arch, batches, one_thread):
    model = models[arch]
    clean, corrupt = batches
    res = ma.patch_nodes(model, clean, corrupt, max_rows=12)
    co = ma.end_components(model, corrupt)
    rows = torch.arange(6)
    base = _naive_ld(model, clean, None).mean()
    L, H = model.spec.n_layers, model.spec.n_heads
    for l in range(L):
        for h in range(H):
            def hz(z, l=l, h=h):
                z = z.clone()
                z[rows, clean["end"], h] = co["z"][:, l, h]
                return z
            naive = _naive_ld(model, clean, {f"blocks.{l}.attn.hook_z": hz}).mean() - base
            assert abs(naive - res["heads_total"][l, h]) < 1e-4, (l, h)

        def hm(x, l=l):
            x = x.clone()
            x[rows, clean["end"]] = co["mlp"][:, l]
            return x
        naive = _naive_ld(model, clean, {f"blocks.{l}.hook_mlp_out": hm}).mean() - base
        assert abs(naive - res["mlps_total"][l]) < 1e-4, l
    assert res["heads_total"].abs().max() > 1e-3
    # direct effect: the LD of the clean final residual plus the node's output change, final-norm scale frozen
    cl = ma.end_components(model, clean)
    scale = ma.norm_scale(model, cl["final"])

    def frozen_ld(resid):
        x = resid - resid.mean(-1, keepdim=True) if model.spec.arch == "gpt2" else resid
        normed = x * scale[:, None] * model.p("ln_final.w")
        if model.has("ln_final.b"):
            normed = normed + model.p("ln_final.b")
        return ma.ld_from_options(torch.einsum("bd,dbn->bn", normed, model.W_U[:, clean["answer_ids"]]),
                                  clean["correct"])

    ref = frozen_ld(cl["final"])
    out_cl, out_co = ma.head_outputs(model, cl["z"]), ma.head_outputs(model, co["z"])
    for l, h in [(0, 0), (L - 1, H - 1)]:
        naive = (frozen_ld(cl["final"] + out_co[:, l, h] - out_cl[:, l, h]) - ref).mean()
        assert abs(naive - res["heads_direct"][l, h]) < 1e-4
    naive = (frozen_ld(cl["final"] + co["mlp"][:, 0] - cl["mlp"][:, 0]) - ref).mean()
    assert abs(naive - res["mlps_direct"][0]) < 1e-4
    # the direct path with the final norm recomputed: only the final residual at END changed (a hook on
    # the norm's input), every other node at its clean value
    base_ld = _naive_ld(model, clean, None)
    for l, h in [(0, 0), (L - 1, H - 1)]:
        def hf(x, l=l, h=h):
            x = x.clone()
            x[rows, clean["end"]] = cl["final"] + out_co[:, l, h] - out_cl[:, l, h]
            return x
        naive = (_naive_ld(model, clean, {"ln_final.hook_in": hf}) - base_ld).mean()
        assert abs(naive - res["heads_direct_norm"][l, h]) < 1e-4, (l, h)
    assert (res["heads_direct_norm"] - res["heads_direct"]).abs().max() > 1e-6  # the norm's scale does move


@torch.no_grad()
def test_low_rank_at_full_rank_reproduces_the_head(models, arch, batches, one_thread):
    model = models[arch]
    clean, _ = batches
    head = (1, 1)
    col = ma.collect_qkv(model, clean, head)
    fits = {k: ma.fit_low_rank(col[k]) for k in ma.KINDS}
    e = model.spec.d_head
    ref = model(clean["tokens"], logits_at=clean["end"])
    full = model(clean["tokens"], hooks=ma.low_rank_hooks(model, head, fits, {k: e for k in ma.KINDS}, clean),
                 logits_at=clean["end"])
    assert torch.allclose(full, ref, atol=1e-5), (full - ref).abs().max()
    low = model(clean["tokens"], hooks=ma.low_rank_hooks(model, head, fits, {k: 1 for k in ma.KINDS}, clean),
                logits_at=clean["end"])
    assert (low - ref).abs().max() > 1e-4  # rank 1 does change the output


@torch.no_grad()
def test_low_rank_edits_only_its_query_head_on_grouped_query_models(models, batches, one_thread):
    model = models["llama"]  # 4 query heads, 2 key/value heads: heads 0 and 1 share keys and values
    assert model.kv_group(0) == model.kv_group(1)
    clean, _ = batches
    head = (1, 0)
    col = ma.collect_qkv(model, clean, head)
    fits = {k: ma.fit_low_rank(col[k]) for k in ma.KINDS}
    names = ["blocks.1.attn.hook_z"]
    c_ref, c_low = {}, {}
    model(clean["tokens"], cache=c_ref, cache_names=names, logits_at=clean["end"])
    model(clean["tokens"], hooks=ma.low_rank_hooks(model, head, fits, {"k": 1, "v": 1}, clean), cache=c_low,
          cache_names=names, logits_at=clean["end"])
    z_ref, z_low = c_ref[names[0]], c_low[names[0]]
    assert torch.allclose(z_low[:, :, 1:], z_ref[:, :, 1:], atol=1e-6)  # its group partner (head 1) untouched
    rows = torch.arange(6)
    assert (z_low[rows, clean["end"], 0] - z_ref[rows, clean["end"], 0]).abs().max() > 1e-4


def test_projection_keeps_the_mean_of_dropped_directions():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=g) @ torch.randn(6, 6, generator=g) + 3.0
    fit = ma.fit_low_rank(x)
    p = ma.project(x.double(), fit, 2)
    assert torch.allclose(p.mean(0), x.double().mean(0), atol=1e-9)
    assert torch.linalg.matrix_rank(p - p.mean(0)).item() == 2
    assert torch.allclose(ma.project(x.double(), fit, 6), x.double(), atol=1e-9)


@torch.no_grad()
def test_mean_ablation_and_attention_stats(models, batches, one_thread):
    model = models["qwen2"]
    clean, _ = batches
    mean_z = torch.full((model.spec.d_head,), 0.5)
    cache = {}
    model(clean["tokens"], hooks=ma.mean_ablation_hooks((0, 2), mean_z, clean), cache=cache,
          cache_names=["blocks.0.attn.hook_z"], logits_at=clean["end"])
    assert torch.allclose(cache["blocks.0.attn.hook_z"][torch.arange(6), clean["end"], 2], mean_z.expand(6, -1))
    st = ma.attention_stats(ma.end_components(model, clean)["pattern"], clean)
    total = st["labels"].sum(-1) + st["content_correct"] + 3 * st["content_other"] + st["answer"]
    assert (total <= 1 + 1e-5).all() and (st["labels"] >= 0).all()


def test_category_rules():
    base = dict(label_att=0.5, correct_share=0.8, position_share=[0.25] * 4, content_correct=0.0, content_other=0.0,
                answer=0.0, dla=1.0)
    flat = [1.0, 1.0, 1.0, 1.0]
    assert ma.categorize(base, flat) == "correct-letter"
    assert ma.categorize(dict(base, correct_share=0.25), flat) == "uniform"
    assert ma.categorize(dict(base, correct_share=0.25, position_share=[0.7, 0.1, 0.1, 0.1]), flat) == "single-letter"
    assert ma.categorize(dict(base, correct_share=0.25), [3.0, 0.1, 0.1, 0.1]) == "single-letter"
    assert ma.categorize(dict(base, label_att=0.05, content_correct=0.4, content_other=0.05), flat) == "content-gatherer"
    assert ma.categorize(dict(base, label_att=0.05, answer=0.6), flat) == "amplification"
    assert ma.categorize(dict(base, label_att=0.05, answer=0.6, dla=-1.0), flat) == "other"
