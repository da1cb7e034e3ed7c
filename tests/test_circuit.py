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
    classes = ("name_mover", "backup_name_mover", "negative_name_mover", "s_inhibition", "induction",
               "duplicate_token", "previous_token")
    cfg = {"batch_size": 8, "method": "exact", "path_patching": "wang", "compare_path_patching": True,
           "confirm_top_k": 1000, "max_rows": 64, "min_attention": 0.0,
           "thresholds": {c: 0.0 for c in classes},
           "max_heads": {"name_mover": 2, "backup_name_mover": 1, "negative_name_mover": 1, "s_inhibition": 2,
                         "induction": 2, "duplicate_token": 2, "previous_token": 1}}
    return model, batch, cfg


def test_discover_runs_and_is_consistent(discovery_setup):
    from mechrepro.core.patching import logit_diff

    model, batch, cfg = discovery_setup
    res = C.discover(model, batch, cfg, progress=lambda s: None)
    assert set(res["candidates"]) == set(C.CLASSES) and res["n_prompts"] == 8
    clean = logit_diff(model(batch.tokens, logits_at=batch.pos["END"]), batch.io, batch.s).mean().item()
    assert res["clean_ld"] == pytest.approx(clean, abs=1e-5)
    for cls, heads in res["candidates"].items():
        assert len(heads) <= cfg["max_heads"][cls]
        for l, h in heads:
            assert 0 <= l < 4 and 0 <= h < 4
    # name movers: the most negative path effects on the logits, strongest first
    eff = {(r["layer"], r["head"]): r["effect"] for r in res["scores"]["logits"]}
    nm = [tuple(hd) for hd in res["candidates"]["name_mover"]]
    assert nm == sorted(eff, key=eff.get)[: len(nm)]
    assert len(res["scores"]["logits"]) == 16
    # backup name movers are not name movers; their score is the growth of the logit effect
    assert not set(map(tuple, res["candidates"]["backup_name_mover"])) & set(nm)
    # S-inhibition senders are earlier than the latest (backup) name mover
    movers = nm + [tuple(x) for x in res["candidates"]["backup_name_mover"]]
    if movers:
        assert all(l < max(l2 for l2, _ in movers) for l, _ in res["candidates"]["s_inhibition"])
    # the induction / duplicate split follows the attention statistics at S2
    for key, st in res["attention_at_s2"].items():
        l, h = map(int, key.split("."))
        if [l, h] in res["candidates"]["duplicate_token"]:
            assert st["S2->S1"] >= st["S2->S1+1"]
        elif [l, h] in res["candidates"]["induction"]:
            assert st["S2->S1"] < st["S2->S1+1"]
    # position-resolved: every early candidate has measured positions from the tested roles
    for cls in ("induction", "duplicate_token", "previous_token"):
        for l, h in res["candidates"][cls]:
            roles = res["positions"][f"{l}.{h}"]
            assert roles and set(roles) <= set(C.EARLY_ROLES)
    # both path-patching variants were compared on every exactly patched node
    assert set(res["path_patching_agreement"]) >= {"logits", "name_mover_queries"}


def test_discover_attribution_confirming_everything_equals_exact(discovery_setup):
    model, batch, cfg = discovery_setup
    exact = C.discover(model, batch, cfg, progress=lambda s: None)
    attr = C.discover(model, batch, dict(cfg, method="attribution"), progress=lambda s: None)
    assert attr["candidates"] == exact["candidates"] and attr["positions"] == exact["positions"]
    for step in ("name_mover_queries", "s_inhibition_values", "induction_keys"):
        e = {(r["layer"], r["head"], r["role"]): r["effect"] for r in exact["scores"][step]}
        a = {(r["layer"], r["head"], r["role"]): r["effect"] for r in attr["scores"][step]}
        assert e.keys() == a.keys()
        for k in e:
            assert a[k] == pytest.approx(e[k], abs=1e-5)


def test_discover_direct_path_is_the_other_variant(discovery_setup):
    """The effects recorded as 'other' under wang are the direct variant's own effects."""
    model, batch, cfg = discovery_setup
    wang = C.discover(model, batch, cfg, progress=lambda s: None)
    direct = C.discover(model, batch, dict(cfg, path_patching="direct"), progress=lambda s: None)
    w = {(r["layer"], r["head"]): r["effect_other"] for r in wang["scores"]["logits"]}
    d = {(r["layer"], r["head"]): r["effect"] for r in direct["scores"]["logits"]}
    for k in w:
        assert w[k] == pytest.approx(d[k], abs=1e-5)
    assert max(abs(r["effect"] - r["effect_other"]) for r in wang["scores"]["logits"]) > 1e-3


def test_discover_respects_duplicate_token_threshold(discovery_setup):
    model, batch, cfg = discovery_setup
    cfg = dict(cfg, path_patching="direct")  # on this random model only the direct path finds early heads
    base = C.discover(model, batch, cfg, progress=lambda s: None)
    assert base["candidates"]["duplicate_token"]  # the setting below must matter
    strict = dict(cfg, thresholds=dict(cfg["thresholds"], duplicate_token=1e9))
    res = C.discover(model, batch, strict, progress=lambda s: None)
    assert res["candidates"]["duplicate_token"] == []
    unsure = C.discover(model, batch, dict(cfg, min_attention=1.01), progress=lambda s: None)
    assert unsure["candidates"]["duplicate_token"] == [] and unsure["candidates"]["induction"] == []
    assert all(st["class"] == "unclassified" for st in unsure["attention_at_s2"].values())


# ------------------------------------------------------------------ faithfulness-driven admission
def _node(cls, l, h, effect, roles=None):
    return {"class": cls, "head": [l, h], "roles": roles or C.KEPT_POSITIONS[cls], "effect": effect}


def test_admission_stops_at_the_target():
    """Constructed faithfulness: each node adds a known amount; admission stops once 0.85 is reached."""
    nodes = [_node("name_mover", 9, 0, -0.5), _node("name_mover", 9, 1, -0.3), _node("name_mover", 9, 2, -0.2),
             _node("s_inhibition", 7, 0, -0.4), _node("s_inhibition", 7, 1, -0.25), _node("s_inhibition", 7, 2, -0.01)]
    value = {(9, 0): 0.4, (9, 1): 0.2, (9, 2): 0.15, (7, 0): 0.2, (7, 1): 0.001, (7, 2): 0.3}
    calls = []

    def faithfulness(circuit):
        heads = [tuple(h) for hs in circuit["classes"].values() for h in hs]
        calls.append(heads)
        return sum(value[h] for h in heads)

    res = C.admit(nodes, faithfulness, target=0.85, min_gain=0.005, progress=lambda s: None)
    admitted = [tuple(n["head"]) for n in res["nodes"]]
    # skeleton (strongest per class): 9.0 and 7.0 -> 0.6; then by |effect|: 9.1 -> 0.8, 7.1 rejected
    # (gain 0.001), 9.2 -> 0.95 >= 0.85: stop; 7.2 is never tried
    assert admitted == [(9, 0), (7, 0), (9, 1), (9, 2)]
    assert res["reached"] and res["faithfulness"] == pytest.approx(0.95) and res["reason"] == ""
    tried = [r["node"] for r in res["curve"]]
    assert tried == ["", "9.0@END", "7.0@END", "9.1@END", "7.1@END", "9.2@END"]
    assert [r["admitted"] for r in res["curve"]] == [True, True, True, True, False, True]
    assert not any((7, 2) in c for c in calls)


def test_admission_records_why_the_target_is_missed():
    nodes = [_node("name_mover", 9, 0, -0.5), _node("name_mover", 9, 1, -0.3)]
    res = C.admit(nodes, lambda c: 0.3 * sum(len(v) for v in c["classes"].values()), target=0.85, min_gain=0.01,
                  progress=lambda s: None)
    assert not res["reached"] and res["faithfulness"] == pytest.approx(0.6) and res["target"] == 0.85
    assert "0.600 < target 0.85" in res["reason"]



def test_a_head_in_several_classes_is_a_node_of_its_strongest():
    """20.0 moves the LD by 4% directly and by 52% through the name movers' queries: an S-inhibition
    head, not a weak name mover (the default run's case); ties go to the earlier class."""
    found = {"candidates": {"name_mover": [[23, 3], [20, 0]], "s_inhibition": [[20, 0], [19, 2]],
                            "backup_name_mover": [[24, 4]], "negative_name_mover": [[24, 4]]},
             "candidate_effects": {"name_mover": {"23.3": -0.675, "20.0": -0.044},
                                   "s_inhibition": {"20.0": -0.521, "19.2": -0.118},
                                   "backup_name_mover": {"24.4": -0.25}, "negative_name_mover": {"24.4": 0.25}},
             "positions": {}}
    nodes = C.candidate_nodes(found)
    assert [(n["class"], tuple(n["head"])) for n in nodes] == [
        ("name_mover", (23, 3)), ("backup_name_mover", (24, 4)), ("s_inhibition", (20, 0)), ("s_inhibition", (19, 2))]
    assert nodes[2]["effect"] == -0.521

def test_nodes_to_circuit_positions_drive_the_mask():
    circ = C.nodes_to_circuit([_node("induction", 1, 0, -0.2, ["S2", "IO1+1"]), _node("name_mover", 3, 0, -0.5)])
    assert circ["positions"] == {"1.0": ["S2", "IO1+1"]}
    keep = C.keep_mask(circ, _batch(), 4, 3)
    assert _kept(keep, 1, 0) == [[4, 9], [2, 8]]
    assert _kept(keep, 3, 0) == [[11], [10]]
    edges = C.count_edges({**circ, "classes": {**circ["classes"], "s_inhibition": [[2, 0]]}})
    assert ((1, 0), "IO1+1", (2, 0), "v") in edges and ((1, 0), "S2", (2, 0), "v") in edges


# ------------------------------------------------------------------ backup name movers
class _Compensating:
    """Mixin for a :class:`Transformer` whose head ``B`` compensates for head ``A`` of the same layer by
    construction: B's ``z`` gets ``-z_A`` added (every position, after any hook of the caller) and
    ``W_O[B] = W_O[A]``, so whatever A stops writing, B writes instead. Knocking A out then makes B's
    path to the logits as strong as A's was."""

    a: tuple[int, int]
    b: tuple[int, int]

    def forward(self, tokens, *, hooks=None, **kw):
        hooks = dict(hooks or {})
        (la, ha), (_, hb) = self.a, self.b
        name = f"blocks.{la}.attn.hook_z"
        user = hooks.get(name)

        def fn(z):
            out = user(z) if user else None
            z = (z if out is None else out).clone()
            z[:, :, hb] = z[:, :, hb] - z[:, :, ha]
            return z

        hooks[name] = fn
        return super().forward(tokens, hooks=hooks, **kw)


def test_backup_name_mover_found_by_knocking_out_name_movers(discovery_setup):
    import copy

    from mechrepro.core.model import Transformer

    model, batch, cfg = discovery_setup
    cfg = dict(cfg, max_heads=dict(cfg["max_heads"], name_mover=1, backup_name_mover=3))
    plain = C.discover(model, batch, cfg, progress=lambda s: None)
    a = tuple(plain["candidates"]["name_mover"][0])
    eff_a = {(r["layer"], r["head"]): r["effect"] for r in plain["scores"]["logits"]}[a]
    assert eff_a < -0.05
    b = (a[0], 0 if a[1] else 1)
    comp = copy.deepcopy(model)
    comp.__class__ = type("CompensatingTransformer", (_Compensating, Transformer), {})
    comp.a, comp.b = a, b
    comp.p(f"blocks.{b[0]}.W_O")[b[1]] = model.p(f"blocks.{a[0]}.W_O")[a[1]]

    threshold = 0.5 * abs(eff_a)
    cfg_t = dict(cfg, thresholds=dict(cfg["thresholds"], backup_name_mover=threshold))
    res = C.discover(comp, batch, cfg_t, progress=lambda s: None)
    assert [tuple(h) for h in res["candidates"]["name_mover"]] == [a]
    assert [tuple(h) for h in res["candidates"]["backup_name_mover"]] == [b]  # the only head that compensates
    growth = {(r["layer"], r["head"]): r["effect"] for r in res["scores"]["backup"]}
    assert growth[a] is None  # a name mover is not its own backup
    # without the constructed compensation the same head does not qualify
    res_plain = C.discover(model, batch, cfg_t, progress=lambda s: None)
    assert b not in [tuple(h) for h in res_plain["candidates"]["backup_name_mover"]]
