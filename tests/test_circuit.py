"""Circuit masks and edge counting."""

from __future__ import annotations

import pytest
import torch
import yaml

from mechrepro.studies.ioi_generalization import circuit as C
from mechrepro.studies.ioi_generalization.data import Batch

from conftest import ROOT


def _batch():
    """Two prompts of width 12 with hand-placed roles (the second has no IO3)."""
    pos = {"S1": [1, 3], "S1+1": [2, 4], "IO1": [3, 1], "IO1+1": [4, 2], "IO2": [6, 6], "IO3": [8, -1],
           "S2": [9, 8], "END": [11, 10]}
    return Batch(tokens=torch.zeros(2, 12, dtype=torch.long), abc=torch.zeros(2, 12, dtype=torch.long),
                 pos={k: torch.tensor(v) for k, v in pos.items()}, io=torch.tensor([1, 1]),
                 s=torch.tensor([2, 2]), template=torch.tensor([0, 0]), order=["ABBA", "BABA"])


TOY = {"classes": {"name_mover": [[3, 0]], "negative_name_mover": [[3, 1]], "s_inhibition": [[2, 0]],
                   "induction": [[1, 0]], "duplicate_token": [[1, 1]], "previous_token": [[0, 0]]}}


@pytest.fixture(scope="module")
def wang():
    ref = yaml.safe_load((ROOT / "reference" / "published.yaml").read_text())
    return {"classes": ref["study_a"]["wang_circuit"]}


def _kept(keep, layer, head):
    """Per prompt, the sorted kept positions of one head."""
    return [sorted(torch.nonzero(keep[i, :, layer, head]).flatten().tolist()) for i in range(keep.shape[0])]


def test_keep_mask_class_positions():
    b = _batch()
    keep = C.keep_mask(TOY, b, n_layers=4, n_heads=3)
    assert keep.shape == (2, 12, 4, 3) and keep.dtype == torch.bool
    assert _kept(keep, 3, 0) == [[11], [10]]  # name mover at END
    assert _kept(keep, 3, 1) == [[11], [10]]
    assert _kept(keep, 2, 0) == [[11], [10]]  # S-inhibition at END
    assert _kept(keep, 1, 0) == [[9], [8]]  # induction at S2
    assert _kept(keep, 1, 1) == [[9], [8]]  # duplicate token at S2
    assert _kept(keep, 0, 0) == [[2], [4]]  # previous token at S1+1
    assert keep.sum() == 2 * 6  # nothing else is kept
    assert not keep[:, :, :, 2].any()


def test_keep_mask_restore_io2_and_io3():
    b = _batch()
    keep = C.keep_mask(TOY, b, 4, 3, restore=["IO2"])
    assert _kept(keep, 1, 0) == [[6], [6]]  # induction moved to IO2
    assert _kept(keep, 1, 1) == [[6], [6]]
    assert _kept(keep, 0, 0) == [[4], [2]]  # previous token moved to IO1+1
    assert _kept(keep, 3, 0) == [[11], [10]]  # late classes unchanged
    keep = C.keep_mask(TOY, b, 4, 3, restore=["S2", "IO2", "IO3"])
    assert _kept(keep, 1, 0) == [[6, 8, 9], [6, 8]]  # prompt 2 has no IO3 (-1 is skipped)
    assert _kept(keep, 0, 0) == [[2, 4], [2, 4]]
    keep = C.keep_mask(TOY, b, 4, 3, restore="all")
    assert keep[:, :, 1, 0].all() and keep[:, :, 1, 1].all() and keep[:, :, 0, 0].all()
    assert _kept(keep, 2, 0) == [[11], [10]]


def test_head_in_two_classes_keeps_first():
    circ = {"classes": {"name_mover": [[3, 0]], "induction": [[3, 0]]}}
    assert C.circuit_heads(circ) == {(3, 0): "name_mover"}
    keep = C.keep_mask(circ, _batch(), 4, 3)
    assert _kept(keep, 3, 0) == [[11], [10]]


def test_count_edges_toy():
    edges = C.count_edges(TOY)
    assert ((0, 0), "S1+1", (1, 0), "k") in edges
    assert ((1, 1), "S2", (2, 0), "v") in edges
    assert ((2, 0), "END", (3, 1), "q") in edges
    assert ((3, 0), "END", "logits", "") in edges
    # prev->ind 1, ind->sinh 1, dup->sinh 1, sinh->nm 1, sinh->neg 1, nm->logits 1, neg->logits 1
    assert len(edges) == 7


def _hand_count(classes, n_pos_early=1, n_pos_prev=1):
    n = {c: len(classes.get(c, [])) for c in C.CLASSES}
    return (n["previous_token"] * n_pos_prev * n["induction"]
            + (n["induction"] + n["duplicate_token"]) * n_pos_early * n["s_inhibition"]
            + n["s_inhibition"] * (n["name_mover"] + n["backup_name_mover"] + n["negative_name_mover"])
            + n["name_mover"] + n["backup_name_mover"] + n["negative_name_mover"])


def test_count_edges_wang_circuit(wang):
    classes = wang["classes"]
    assert sum(len(v) for v in classes.values()) == 26
    base = C.count_edges(wang)
    # 2*4 + (4+3)*4 + 4*(3+8+2) + (3+8+2) = 8 + 28 + 52 + 13
    assert len(base) == _hand_count(classes) == 101
    s2_io2 = C.count_edges(wang, ["S2", "IO2"])
    assert len(s2_io2) == _hand_count(classes, 2, 2) == 137
    assert base < s2_io2  # restoring IO2 only adds edges
    overlap = len(s2_io2 & base) / len(s2_io2)
    assert overlap == pytest.approx(101 / 137)
    s2_io2_io3 = C.count_edges(wang, ["S2", "IO2", "IO3"])
    # previous-token heads restore IO1+1 for both IO2 and IO3: still two positions
    assert len(s2_io2_io3) == _hand_count(classes, 3, 2) == 165
    assert len(s2_io2_io3 & base) / len(s2_io2_io3) < overlap
    io2_only = C.count_edges(wang, ["IO2"])
    assert len(io2_only) == len(base) and len(io2_only & base) == len(base) - (8 + 28)


def test_count_edges_accepts_all_like_keep_mask(wang):
    assert len(C.count_edges(wang, "all")) >= len(C.count_edges(wang, ["S2", "IO2", "IO3"]))


def test_select_helper():
    eff = {(0, 0): -0.5, (0, 1): -0.1, (1, 0): 0.4, (1, 1): -0.3, (2, 0): -0.02}
    assert C._select(eff, 0.05, 5, -1) == [(0, 0), (1, 1), (0, 1)]
    assert C._select(eff, 0.05, 2, -1) == [(0, 0), (1, 1)]
    assert C._select(eff, 0.05, 5, +1) == [(1, 0)]


@pytest.fixture(scope="module")
def discovery_setup(ioi_data, tokenizer):
    from conftest import FULL_VOCAB, make_hf
    from mechrepro.studies.ioi_generalization.data import make_dataset, to_batch
    from mechrepro.core.model import Transformer

    model = Transformer.from_hf(make_hf("gpt2", vocab=FULL_VOCAB, n_layers=4, seed=2))
    data = dict(ioi_data, templates=ioi_data["templates"][:2])
    batch = to_batch(make_dataset(data, "base", 8, tokenizer, 50256, seed=0), pad_id=50256)
    cfg = {"batch_size": 8, "method": "exact", "confirm_top_k": 100, "max_rows": 64,
           "thresholds": {c: 0.0 for c in ("name_mover", "negative_name_mover", "s_inhibition", "induction",
                                            "duplicate_token", "previous_token")},
           "max_heads": {"name_mover": 2, "negative_name_mover": 1, "s_inhibition": 2, "induction": 2,
                         "duplicate_token": 2, "previous_token": 1}}
    return model, batch, cfg


def test_discover_runs_and_is_consistent(discovery_setup):
    from mechrepro.core.patching import logit_diff

    model, batch, cfg = discovery_setup
    res = C.discover(model, batch, cfg, progress=lambda s: None)
    assert set(res["classes"]) == set(C.CLASSES) and res["n_prompts"] == 8
    clean = logit_diff(model(batch.tokens, logits_at=batch.pos["END"]), batch.io, batch.s).mean().item()
    assert res["clean_ld"] == pytest.approx(clean, abs=1e-5)
    for cls, heads in res["classes"].items():
        assert len(heads) <= cfg["max_heads"].get(cls, 0) + (cfg["max_heads"]["duplicate_token"]
                                                           if cls == "induction" else 0)
        for l, h in heads:
            assert 0 <= l < 4 and 0 <= h < 4
    # name movers: the most negative direct effects on the logits, strongest first
    eff = {(r["layer"], r["head"]): r["effect"] for r in res["scores"]["logits"]}
    nm = [tuple(hd) for hd in res["classes"]["name_mover"]]
    assert nm == sorted(eff, key=eff.get)[: len(nm)]
    assert len(res["scores"]["logits"]) == 16
    # S-inhibition senders are earlier than the latest name mover
    if nm:
        assert all(l < max(l2 for l2, _ in nm) for l, _ in res["classes"]["s_inhibition"])
    # the induction / duplicate split follows the attention statistics at S2
    for key, st in res["attention_at_s2"].items():
        l, h = map(int, key.split("."))
        if [l, h] in res["classes"]["duplicate_token"]:
            assert st["S2->S1"] >= st["S2->S1+1"]
        elif [l, h] in res["classes"]["induction"]:
            assert st["S2->S1"] < st["S2->S1+1"]


def test_discover_attribution_confirming_everything_equals_exact(discovery_setup):
    model, batch, cfg = discovery_setup
    exact = C.discover(model, batch, cfg, progress=lambda s: None)
    attr = C.discover(model, batch, dict(cfg, method="attribution"), progress=lambda s: None)
    assert attr["classes"] == exact["classes"]
    for step in ("name_mover_queries", "s_inhibition_values", "induction_keys"):
        e = {(r["layer"], r["head"]): r["effect"] for r in exact["scores"][step]}
        a = {(r["layer"], r["head"]): r["effect"] for r in attr["scores"][step]}
        assert e.keys() == a.keys()
        for k in e:
            assert a[k] == pytest.approx(e[k], abs=1e-5)


def test_discover_respects_duplicate_token_threshold(discovery_setup):
    model, batch, cfg = discovery_setup
    base = C.discover(model, batch, cfg, progress=lambda s: None)
    assert base["classes"]["duplicate_token"]  # the setting below must matter
    strict = dict(cfg, thresholds=dict(cfg["thresholds"], duplicate_token=1e9))
    res = C.discover(model, batch, strict, progress=lambda s: None)
    assert res["classes"]["duplicate_token"] == []
