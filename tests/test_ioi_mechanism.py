"""The mechanism test, the ablation means from a separate ABC sample, the disjoint discovery split and
the ratios of Study A."""

from __future__ import annotations

import pytest
import torch

from mechrepro.core import patching as P
from mechrepro.studies.ioi_generalization import analysis as A
from mechrepro.studies.ioi_generalization.data import abc_sample, discovery_split, make_dataset, to_batch

BOS = 50256


@pytest.fixture(scope="module")
def setup(ioi_data, tokenizer):
    from conftest import FULL_VOCAB, make_hf
    from mechrepro.core.model import Transformer

    model = Transformer.from_hf(make_hf("gpt2", vocab=FULL_VOCAB, n_layers=3, seed=4))
    data = dict(ioi_data, templates=ioi_data["templates"][:3])
    return model, data


def test_template_means_batched_equal_one_pass(setup, tokenizer):
    model, data = setup
    tokens, templates = abc_sample(data, "double_io", 13, tokenizer, BOS, seed=0)
    from mechrepro.core.tokens import pad

    tok, tmpl = pad(tokens, BOS), torch.tensor(templates)
    _, cache = P.run_end_logits(model, tok, torch.zeros(len(tok), dtype=torch.long), cache_names=P.z_names(model))
    ref = P.template_means(P.stack_z(model, cache), tmpl)
    got = P.template_means_batched(model, tok, tmpl, batch_size=4)
    assert ref.keys() == got.keys() == {0, 1, 2}
    for t in ref:
        torch.testing.assert_close(got[t], ref[t], atol=1e-5, rtol=1e-5)


def test_abc_sample_is_its_own_draw(setup, tokenizer):
    model, data = setup
    evald = make_dataset(data, "base", 12, tokenizer, BOS, seed=0)
    tokens, _ = abc_sample(data, "base", 12, tokenizer, BOS, seed=0)
    assert tokens != [p["abc_tokens"] for p in evald["prompts"]]
    assert abc_sample(data, "base", 12, tokenizer, BOS, seed=0)[0] == tokens  # seeded


def test_discovery_split_is_disjoint_from_evaluation(setup, tokenizer):
    _, data = setup
    evald = make_dataset(data, "base", 40, tokenizer, BOS, seed=0)
    split = discovery_split(data, 30, tokenizer, BOS, 0, evald)
    assert split["n"] == len(split["prompts"]) == 30 and split["split"] == "discovery"
    texts = {p["text"] for p in evald["prompts"]}
    assert not texts & {p["text"] for p in split["prompts"]}
    assert [p["id"] for p in split["prompts"]] == list(range(30))
    # a split built from the evaluation prompts' own seed would collide with all of them: they are dropped
    forced = discovery_split(data, 5, tokenizer, BOS, 0 - 1_000_003, evald)
    assert not texts & {p["text"] for p in forced["prompts"]} and forced["n_dropped"] >= 5


def test_mechanism_test_equals_naive_ablation(setup, tokenizer):
    model, data = setup
    ds = make_dataset(data, "triple_io", 12, tokenizer, BOS, seed=1)
    batch = to_batch(ds, BOS)
    tokens, templates = abc_sample(data, "triple_io", 24, tokenizer, BOS, seed=1)
    from mechrepro.core.tokens import pad

    means = P.template_means_batched(model, pad(tokens, BOS), torch.tensor(templates))
    circuit = {"classes": {"duplicate_token": [[0, 1]], "induction": [[1, 2]], "previous_token": [[0, 3]]}}
    summary, runs = A.mechanism_test(model, batch, circuit, means, "triple_io", base_ld=3.0, n_controls=3, seed=0,
                                     batch_size=5, progress=lambda s: None)

    def naive(ablate):  # ablate: [(layer, head, role)]
        def make(layer):
            def fn(z):
                z = z.clone()
                for l, h, role in ablate:
                    if l == layer:
                        pos = batch.pos[role]
                        for i in range(len(batch)):
                            z[i, pos[i], h] = means[int(batch.template[i])][pos[i], l, h]
                return z
            return fn
        hooks = {f"blocks.{l}.attn.hook_z": make(l) for l in range(3)}
        logits = model(batch.tokens, hooks=hooks, logits_at=batch.pos["END"])
        return P.logit_diff(logits, batch.io, batch.s).mean().item()

    clean = P.logit_diff(model(batch.tokens, logits_at=batch.pos["END"]), batch.io, batch.s).mean().item()
    assert summary["model_ld"] == pytest.approx(clean, abs=1e-4)
    ref = naive([(0, 1, "IO2"), (0, 1, "IO3"), (1, 2, "IO2"), (1, 2, "IO3"), (0, 3, "IO1+1")])
    assert summary["ablated_ld"] == pytest.approx(ref, abs=1e-4)
    assert summary["change"] == pytest.approx(ref - clean, abs=1e-4)
    assert summary["gap_closed"] == pytest.approx((ref - clean) / (3.0 - clean), rel=1e-4)
    assert len(summary["control_changes"]) == 3 and list(runs.run) == ["model", "mechanism"] + ["control"] * 3
    # controls ablate as many other heads (never a tested one), seeded
    for text in runs[runs.run == "control"].heads:
        heads = [h.split("@")[0] for h in text.split()]
        assert len(heads) == 3 and not {"0.1", "1.2", "0.3"} & set(heads)
    again, _ = A.mechanism_test(model, batch, circuit, means, "triple_io", 3.0, 3, 0, 5, progress=lambda s: None)
    assert again["control_changes"] == summary["control_changes"]
    assert abs(summary["change"]) > 1e-4  # the ablation does something


def test_mechanism_test_without_early_heads_is_untestable(setup, tokenizer):
    model, data = setup
    batch = to_batch(make_dataset(data, "double_io", 4, tokenizer, BOS, seed=1), BOS)
    summary, _ = A.mechanism_test(model, batch, {"classes": {"name_mover": [[2, 0]]}}, {}, "double_io", 3.0, 2, 0, 4,
                                  progress=lambda s: None)
    assert summary["testable"] is False and "no duplicate-token" in summary["reason"]


def test_ratios():
    evals = {"base": {"model_ld": 4.0, "faithfulness": 0.5}, "double_io": {"model_ld": 2.0, "faithfulness": 0.75}}
    r = A.ratios(evals)
    assert r["double_io"] == {"model_ld_ratio": 0.5, "faithfulness_ratio": 1.5}
    assert r["base"] == {"model_ld_ratio": 1.0, "faithfulness_ratio": 1.0}


def test_too_few_ablation_prompts_are_refused():
    from conftest import ROOT
    from mechrepro.workflow import config as Cfg

    with pytest.raises(Cfg.ConfigError, match=r"ablation.n_prompts is 10: .* at least 30"):
        Cfg.load(ROOT / "config" / "smoke.yaml", {"ablation.n_prompts": 10})


def test_value_paths_follow_the_path_patching_mode(setup, tokenizer):
    """Figure 6 path-patches as circuit.path_patching says: each exactly patched sender's effect on
    the S-inhibition values equals the three-pass reference of Wang et al. (every other head frozen,
    the MLPs recomputed, the receivers' value inputs replaced) under ``wang``, the MLPs frozen too
    under ``direct``; the two differ."""
    from test_path_patching import _naive_path_patch

    model, data = setup
    batch = to_batch(make_dataset(data, "base", 8, tokenizer, BOS, seed=2), BOS)
    receivers = [(2, 1, "v")]
    circuit = {"classes": {"s_inhibition": [[2, 1]], "induction": [[0, 2]]}}
    cfg = {"confirm_top_k": 3, "batch_size": 4, "max_rows": 64}
    as_dict = {"tokens": batch.tokens, "abc": batch.abc, "end": batch.pos["END"], "io": batch.io, "s": batch.s}
    clean = P.logit_diff(model(batch.tokens, logits_at=batch.pos["END"]), batch.io, batch.s).mean().item()
    frames = {}
    for mode in ("wang", "direct"):
        frames[mode] = df = A.value_paths(model, batch, circuit, "S2", dict(cfg, path_patching=mode),
                                          progress=lambda s: None)
        exact = df.dropna(subset=["effect_pct"])
        assert len(exact) >= 3 and (0, 2) in set(zip(exact["layer"], exact["head"]))
        for _, row in exact.iterrows():
            ref = _naive_path_patch(model, as_dict, (int(row["layer"]), int(row["head"])), receivers, batch.pos["S2"],
                                    freeze_mlps=mode == "direct").mean().item()
            assert row.effect_pct == pytest.approx(100 * (ref - clean) / clean, abs=1e-3)
    exact_w = frames["wang"].dropna(subset=["effect_pct"]).set_index(["layer", "head"]).effect_pct
    exact_d = frames["direct"].dropna(subset=["effect_pct"]).set_index(["layer", "head"]).effect_pct
    both = exact_w.index.intersection(exact_d.index)
    assert (exact_w[both] - exact_d[both]).abs().max() > 1e-3
