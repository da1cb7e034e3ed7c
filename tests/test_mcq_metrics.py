"""Study C's result tables: the analyses over several batches, the tables, summaries and claims."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from test_mcq_analysis import fake_batch

from mechrepro.studies.mcq_circuits import analysis as ma
from mechrepro.studies.mcq_circuits import data as mcq
from mechrepro.studies.mcq_circuits import metrics as M


def _rows(batch: dict, rows: slice) -> dict:
    return {k: v[rows] for k, v in batch.items()}


@pytest.fixture(scope="module")
def batches():
    clean = fake_batch(0)
    corrupt = fake_batch(1)
    corrupt["answer_ids"], corrupt["correct"] = clean["answer_ids"], (clean["correct"] + 1) % 4
    return clean, corrupt


def _split(batch: dict) -> list[dict]:
    """The 6 rows as batches of 4 and 2 (unequal, so a plain mean of batch means would be wrong)."""
    return [_rows(batch, slice(0, 4)), _rows(batch, slice(4, 6))]


def test_names():
    assert M.option_letters(4) == ["A", "B", "C", "D"]
    assert (M.node_name(3, 1), M.node_name(2, None)) == ("L3H1", "MLP2")


@torch.no_grad()
def test_patching_means_weight_each_batch_by_its_size(models, batches, one_thread):
    model = models["llama"]
    clean, corrupt = batches
    done = []
    res, n = M.patching_means(model, zip(_split(clean), _split(corrupt)), max_rows=12, progress=done.append)
    whole = ma.patch_nodes(model, clean, corrupt, max_rows=12)
    assert n == 6 and done == [4, 6] and set(res) == set(whole)
    for k in whole:
        torch.testing.assert_close(res[k], whole[k], atol=1e-5, rtol=1e-4)
    frame = M.patching_table(res)
    L, H = model.spec.n_layers, model.spec.n_heads
    assert len(frame) == L * H + L and list(frame.node[:2]) == ["L0H0", "L0H1"]
    assert frame.indirect_flag.dtype == bool
    s = M.patching_summary(frame, res, n, "tiny")
    assert s["flagged"] == frame.node[frame.indirect_flag].tolist() and s["clean_ld"] == pytest.approx(
        float(whole["clean_ld"]), abs=1e-5)


def test_patching_flag_rule():
    L, H = 1, 3
    res = {"heads_total": torch.tensor([[1.0, 0.6, 0.1]]), "heads_direct": torch.tensor([[0.1, 0.5, 0.0]]),
           "mlps_total": torch.tensor([-0.9]), "mlps_direct": torch.tensor([-0.2]),
           "heads_direct_norm": torch.tensor([[0.2, 0.4, 0.0]]), "mlps_direct_norm": torch.tensor([-0.3])}
    frame = M.patching_table(res)
    assert frame.direct_effect_norm.tolist() == pytest.approx([0.2, 0.4, 0.0, -0.3])
    assert frame.shape[0] == L * H + L
    # |total| ≥ 0.5 of the largest and |direct| < 0.3 |total|: L0H0 and MLP0; L0H1 is mostly direct, L0H2 small
    assert frame.loc[frame.indirect_flag, "node"].tolist() == ["L0H0", "MLP0"]


@torch.no_grad()
def test_dla_and_head_statistics_over_batches_equal_the_whole_batch(models, batches, one_thread):
    model = models["gpt2"]
    clean, _ = batches
    dl, correct = M.dla_batches(model, _split(clean))
    whole = ma.dla(model, ma.end_components(model, clean), clean["answer_ids"], clean["correct"])
    for k in whole:
        torch.testing.assert_close(dl[k], whole[k], atol=1e-5, rtol=1e-4)
    assert torch.equal(correct, clean["correct"])
    frame = M.dla_table(dl, correct, M.option_letters(4))
    L, H = model.spec.n_layers, model.spec.n_heads
    assert len(frame) == L * H + L + 2 and list(frame.node[-2:]) == ["embed", "bias"]
    x = dl["heads"][:, 0, 1]
    row = frame.set_index("node").loc["L0H1"]
    assert row.dla == pytest.approx(x.mean().item()) and row.dla_sem == pytest.approx(x.std().item() / 6 ** 0.5)
    assert row.dla_B == pytest.approx(x[correct == 1].mean().item())
    summary = M.dla_summary(dl, frame, 3, "tiny", 6)
    nodes = frame[frame.kind.isin(["head", "mlp"])].dla.abs().sort_values(ascending=False)
    assert summary["top_k_share_abs"] == pytest.approx(nodes.iloc[:3].sum() / nodes.sum())
    assert summary["share_by_k"][len(nodes)] == pytest.approx(1.0) and summary["n"] == 6

    mean, n = M.head_means(model, _split(clean))
    st = ma.attention_stats(ma.end_components(model, clean)["pattern"], clean)
    assert n == 6
    torch.testing.assert_close(mean["label_att"], st["labels"].sum(-1).mean(0))
    torch.testing.assert_close(mean["answer"], st["answer"].mean(0))
    share = st["labels"] / st["labels"].sum(-1, keepdim=True)
    torch.testing.assert_close(mean["correct_share"], share[torch.arange(6), :, :, clean["correct"]].mean(0))
    heads = M.heads_table(mean, frame.set_index("node"), M.option_letters(4))
    assert len(heads) == L * H and set(heads.category) <= set(ma.CATEGORY_RULES)
    assert heads[[f"share_{x}" for x in "ABCD"]].sum(axis=1).to_numpy() == pytest.approx(1.0, abs=1e-5)
    assert sum(M.heads_summary(heads, n, "tiny")["counts"].values()) == L * H


@torch.no_grad()
def test_low_rank_at_full_rank_is_the_model_and_keys_are_projected(models, batches, one_thread):
    model = models["qwen2"]
    clean, _ = batches
    head = (1, 2)
    fits, mean_z = M.fit_head(model, _rows(clean, slice(0, 3)), head)
    e = model.spec.d_head
    assert mean_z.shape == (e,) and fits["k"]["basis"].shape == (e, e)
    losses = M.low_rank_losses(model, _rows(clean, slice(3, 6)), head, fits, mean_z, [1, 2, 10 * e], batch_size=2)
    assert losses["ranks"] == [1, 2, e]  # capped at d_head, d_head itself always in
    assert set(losses["by_kind"]) == {"q", "k", "v", "qkv"} and set(losses["by_kind"]["q"]) == {"1", "2", "full"}
    for kind in losses["by_kind"]:
        assert losses["by_kind"][kind]["full"]["loss"] == pytest.approx(losses["full"]["loss"], abs=1e-4), kind
    summary = M.low_rank_summary("tiny", head, "why", e, 3, 3, losses, fits, 100)
    assert summary["head"] == "L1H2" and summary["mutation_rank"] == e
    assert summary["loss_by_rank"] == {k: v["loss"] for k, v in losses["by_kind"]["qkv"].items()}
    prompts = [mcq.Prompt([], [], [], [], int(c), 0, labels=list("ABCD")) for c in clean["correct"]]
    rows = M.key_projections(model, clean, prompts, head, fits["k"], "abcd")
    assert len(rows) == 6 * 4 and {r["position"] for r in rows} == {1, 2, 3, 4}
    assert sum(r["is_correct"] for r in rows) == 6 and set(rows[0]) >= {"pc1", "pc2", "pc3"}


def test_fit_test_split_and_head_choice():
    assert M.fit_test_split([1, 2, 3, 4, 5]) == ([1, 2], [3, 4, 5])
    assert M.fit_test_split([1]) == ([1], [1])  # nothing left to test on: test on the fit prompt
    heads = pd.DataFrame({"node": ["L0H0", "L1H1", "L2H2"], "layer": [0, 1, 2], "head": [0, 1, 2],
                          "dla": [0.5, 0.2, 0.9], "category": ["correct-letter", "correct-letter", "other"]})
    # a verified head first (even one with a smaller DLA and another category) ...
    verify = pd.DataFrame({"node": heads.node, "passes": [False, True, False]})
    assert M.pick_head(heads, verify) == ((1, 1), "the verified correct-letter head with the largest DLA", True)
    # ... else the correct-letter category, recorded as not verified ...
    head, why, verified = M.pick_head(heads, verify.assign(passes=False))
    assert head == (0, 0) and why.startswith("no head passed") and verified is False
    # ... else the largest DLA
    head, why, verified = M.pick_head(heads.assign(category="other"))
    assert head == (2, 2) and why.startswith("no head met") and verified is False


def test_mutation_settings_and_their_evaluation(models, batches, one_thread):
    model = models["gpt2"]
    clean, _ = batches
    head = (0, 1)
    fits, mean_z = M.fit_head(model, clean, head)
    settings = M.mutation_settings(model, head, fits, mean_z, model.spec.d_head)
    assert settings["full"](clean) is None
    out = M.evaluate_settings(model, _split(clean), settings, batch_size=3)
    whole = ma.evaluate(model, clean, None, 6)
    assert out["full"]["accuracy"] == pytest.approx(whole["correct"].mean().item())
    assert out["low_rank"]["ld"] == pytest.approx(out["full"]["ld"], abs=1e-4)  # full rank: the head unchanged
    assert set(out["ablated"]) == {"accuracy", "loss", "ld"}


def _lr(full=1.0, r3=1.05, ablated=2.0, selection="correct-letter head with the largest DLA"):
    return {"head": "L0H1", "selection": selection, "d_head": 4, "ablated": {"loss": ablated},
            "loss_by_rank": {"1": 1.5, "3": r3, "full": full}}


def test_claim_summaries():
    def acc(full, low, abl):
        return {"full": {"accuracy": full}, "low_rank": {"accuracy": low}, "ablated": {"accuracy": abl}}

    muts = {"abcd": acc(1.0, 1.0, 0.5), "numbers": acc(0.8, 0.4, 0.2), "shuffled": acc(0.0, 0.0, 0.0),
            "separator": acc(0.9, 0.9, 0.88)}
    kept, recovered, excluded = M.low_rank_counted(muts)
    assert kept == {"numbers": 0.5, "separator": 1.0} and set(excluded) == {"shuffled"}
    assert recovered == pytest.approx({"numbers": 1 / 3, "separator": 1.0})  # (0.4 - 0.2) / (0.8 - 0.2)
    # only label sets on which the full head is competent ...
    kept, _, excluded = M.low_rank_counted(muts, min_competence=0.85)
    assert kept == {"separator": 1.0} and "below 0.85" in excluded["numbers"]
    # ... and on which the model uses the head (mean-ablating it costs at least min_head_effect)
    kept, _, excluded = M.low_rank_counted(muts, min_competence=0.8, min_head_effect=0.05)
    assert kept == {"numbers": 0.5} and "costs 0.020" in excluded["separator"] and set(excluded) == {"shuffled", "separator"}
    keys = pd.DataFrame({"label_set": ["abcd"] * 4 + ["numbers"] * 4, "position": [1, 2, 1, 2] * 2,
                         "pc1": [1.0, -1.0, 1.0, -1.0, 1.0, 1.0, -1.0, -1.0], "pc2": [0.0] * 8, "pc3": [0.0] * 8})
    assert M.key_position_r2(keys) == {"abcd": 1.0, "numbers": 0.0}  # keys by position / unrelated to it
    keys[["pc1"]] = 0.0
    assert M.key_position_r2(keys) == {"abcd": None, "numbers": None}
    heads = pd.DataFrame({"category": ["other", "correct-letter", "other"]})
    counts = M.category_counts(heads)
    assert counts["other"] == 2 and counts["correct-letter"] == 1 and counts["uniform"] == 0
    assert list(counts) == list(ma.CATEGORY_RULES)


def test_study_metrics_reads_the_tables():
    nodes = ["L0H0", "L0H1", "MLP0", "embed"]
    dla = pd.DataFrame({"node": nodes, "kind": ["head", "head", "mlp", "embed"], "dla": [0.1, -2.0, 1.0, 5.0]})
    dla = dla.set_index("node")
    patch = pd.DataFrame({"node": nodes[:3], "total_effect": [0.0, 1.0, 2.0], "direct_effect": [0.0, 0.5, 1.0],
                          "indirect_flag": [False, False, True]})
    heads = pd.DataFrame({"node": nodes[:2], "category": ["other", "correct-letter"], "label_att": [0.1, 0.7]})
    manifest = {"name": "tiny", "description": "d",
                "spec": {"n_layers": 1, "n_heads": 2, "n_kv_heads": 2, "d_model": 8, "d_head": 4, "extra": 0}}
    muts = {"abcd": {"rank": 3, **{s: {"accuracy": 1.0} for s in ("full", "low_rank", "ablated")}}}
    verify = pd.DataFrame({"node": nodes[:2], "passes": [False, True], "swap_head": [0.1, float("nan")]})
    vsum = {"n_heads_passing": 1, "heads_passing": ["L0H1"], "thresholds": {"min_swap": 0.8},
            "checks_passed": {"label_swap": ["L0H1"]}, "swap_model": 0.9}
    m = M.study_metrics(manifest, {"heldout": 0.9, "other": 1}, {"abcd": {"accuracy": 0.8, "loss": 0.3}}, muts, dla,
                        patch.set_index("node"), heads.set_index("node"), {**_lr(), "verified": True},
                        {"n": 5, "ld": 2.0, "top_k_share_abs": 0.7, "share_by_k": {"1": 0.6, "2": 0.9}}, 8, 2,
                        verify.set_index("node"), vsum, 0.8, 0.05)
    assert m["verification"]["heads_passing"] == ["L0H1"] and m["verification"]["checks_passed"] == {"label_swap": 1}
    assert m["verification"]["heads"]["L0H1"] == {"passes": True, "swap_head": None}  # NaN: null in JSON
    assert [t["node"] for t in m["top_nodes"]] == ["L0H1", "MLP0"]  # embed is not a node
    assert m["top_nodes"][1]["category"] == "mlp" and m["top_nodes"][0]["direct_effect"] == 0.5
    assert m["dla"]["n_nodes"] == 3 and m["dla"]["top_decile_k"] == 1 and m["dla"]["top_decile_share_abs"] == 0.6
    assert m["low_rank"]["head_label_attention"] == 0.7 and m["low_rank"]["head_category"] == "correct-letter"
    assert m["organism"] == {"heldout": 0.9, "label_control": False} and "extra" not in m["model_spec"] and m["mutation_rank"] == 3
    assert m["n_analysis"] == 5 and "claims" not in m  # the claims are data (reference/published.yaml)
    assert m["low_rank"]["correct_letter_head"] is True and m["patching"] == {"n_flagged": 1, "flagged": ["MLP0"]}
    assert m["head_categories"]["correct-letter"] == 1 and m["low_rank_kept"] == {}
    assert m["low_rank_excluded"] == {} and m["min_head_effect"] == 0.05
    # a head that only has the attention pattern is not a correct-letter head for the claims
    m = M.study_metrics(manifest, {"trained": False}, {"abcd": {"accuracy": 0.8, "loss": 0.3}}, muts, dla,
                        patch.set_index("node"), heads.set_index("node"), _lr(),
                        {"n": 5, "ld": 2.0, "top_k_share_abs": 0.7, "share_by_k": {"1": 0.6, "2": 0.9}}, 8, 2,
                        verify.set_index("node"), vsum, 0.8, 0.05)
    assert m["low_rank"]["correct_letter_head"] is False and m["organism"] == {}


def test_evaluation_items_and_their_corrupted_prompts(tokenizer):
    items, shots, source = mcq.evaluation_items(True, 6, 2, seed=4)
    assert shots == [] and source.endswith("seed 5)") and items == mcq.synthetic_items(6, 5, prefix="eval")
    corrupt = mcq.corrupted_prompts(items, tokenizer, tokenizer.bos_token_id)
    clean = mcq.make_prompts(items, "abcd", tokenizer, tokenizer.bos_token_id, 0)
    for i, (it, c, p) in enumerate(zip(items, corrupt, clean)):
        shift = 1 + i % 3
        assert c.correct == (it.correct + shift) % 4 and c.labels == p.labels == list("ABCD")
        assert c.text != p.text and len(c.label_pos) == 4
    assert {(c.correct - p.correct) % 4 for c, p in zip(corrupt, clean)} == {1, 2, 3}  # every shift occurs


def test_figure11_caption_says_which_sets_the_claims_count():
    from types import SimpleNamespace

    from mechrepro.studies.mcq_circuits import plotting
    art = SimpleNamespace(metrics={"low_rank_kept": {"shuffled": 0.99},
                                   "low_rank_excluded": {"numbers": "mean-ablating the head costs 0.000 of accuracy"}})
    note = plotting.mutations_note(art)
    assert note.startswith("The low-rank claims count shuffled ABCD; not numbers 1-4: mean-ablating")
    assert plotting.mutations_note(SimpleNamespace(metrics={})) == "The low-rank claims count no mutated set."
