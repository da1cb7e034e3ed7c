"""Study B, IOI part: the pair dataset, the site-layer rule, END-only runs and Table 1's invariants."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml

from mechrepro.core import subspace as S
from mechrepro.studies.subspace_illusion import ioi as B
from mechrepro.studies.ioi_generalization.data import DatasetError

from conftest import ROOT, SMALL_VOCAB

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ data
@pytest.fixture(scope="module")
def templates():
    return B.load_data(ROOT / "config" / "subspace_ioi_data.yaml")


@pytest.fixture(scope="module")
def pairs(templates, ioi_data, tokenizer):
    return B.make_pairs(templates, ioi_data, 40, 30, tokenizer, tokenizer.bos_token_id, seed=0)


def test_templates_are_the_papers(templates):
    assert set(templates["templates"]) == {"T0", "T1", "T2"}
    assert all(t.startswith("Then, {N1} and {N2} ") for t in templates["templates"].values())
    assert templates["train_templates"] == ["T0", "T1"] and templates["test_templates"] == ["T2"]


def test_splits_are_disjoint_and_use_their_own_words(pairs):
    train, test = pairs["train"], pairs["test"]
    for key in ("names", "places", "objects"):
        assert train[key] and test[key]
        assert not set(train[key]) & set(test[key]), key
    assert len(train["pairs"]) == 40 and len(test["pairs"]) == 30
    for split in (train, test):
        for p in split["pairs"]:
            assert p["template"] in split["templates"]
            assert {p["io"], p["s"]} <= set(split["names"]) and p["io"] != p["s"]
            assert p["place"] in split["places"] and p["object"] in split["objects"]
    assert {p["template"] for p in train["pairs"]} == {"T0", "T1"}
    assert {p["template"] for p in test["pairs"]} == {"T2"}
    for split in (train, test):  # balanced orders (and templates) in every split
        orders = [p["order"] for p in split["pairs"]]
        assert orders.count("ABB") == orders.count("BAB")


def test_pairs_swap_the_two_first_names(pairs, tokenizer):
    for p in pairs["train"]["pairs"] + pairs["test"]["pairs"]:
        pos = p["positions"]
        tok, src = p["tokens"], p["src_tokens"]
        io, s = p["io_token"], p["s_token"]
        assert len(tok) == len(src) == 19  # GPT-2: every template is 19 tokens with BOS, as in the paper
        assert (pos["N1"], pos["N2"]) == (3, 5) and pos["END"] == 18
        assert tok[0] == tokenizer.bos_token_id and tokenizer.decode(tok[1:3]) == "Then,"
        first = (io, s) if p["order"] == "ABB" else (s, io)
        assert (tok[pos["N1"]], tok[pos["N2"]]) == first
        assert (src[pos["N1"]], src[pos["N2"]]) == first[::-1]  # the source has the positions swapped
        assert tok[pos["S2"]] == src[pos["S2"]] == s
        assert [i for i in range(len(tok)) if tok[i] != src[i]] == [pos["N1"], pos["N2"]]
        assert p["expected_token"] == s  # after the patch: the base prompt's S name
        assert p["text"].endswith(" to") and tokenizer.decode(tok[1:]) == p["text"]
        assert tokenizer.decode([io]) == " " + p["io"]


def test_pairs_are_seeded_and_train_does_not_depend_on_n_test(templates, ioi_data, tokenizer, pairs):
    again = B.make_pairs(templates, ioi_data, 40, 30, tokenizer, tokenizer.bos_token_id, seed=0)
    assert again == pairs
    more = B.make_pairs(templates, ioi_data, 40, 50, tokenizer, tokenizer.bos_token_id, seed=0)
    assert more["train"] == pairs["train"] and more["test"]["pairs"][:30] == pairs["test"]["pairs"]
    other = B.make_pairs(templates, ioi_data, 40, 30, tokenizer, tokenizer.bos_token_id, seed=1)
    assert other["train"]["pairs"] != pairs["train"]["pairs"]


def test_too_few_words_and_bad_template_files(templates, ioi_data, tokenizer, tmp_path):
    few = dict(ioi_data, places=["store"])
    with pytest.raises(DatasetError, match="places"):
        B.make_pairs(templates, few, 4, 4, tokenizer, tokenizer.bos_token_id, seed=0)
    bad = copy.deepcopy(templates)
    bad["templates"]["T2"] = "Then, {N1} and {N2} went home. {N1} said to"
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(DatasetError, match="T2"):
        B.load_data(path)
    bad = dict(copy.deepcopy(templates), test_templates=["T1"])
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(DatasetError, match="both"):
        B.load_data(path)
    with pytest.raises(DatasetError, match="does not exist"):
        B.load_data(tmp_path / "missing.yaml")


# ------------------------------------------------------------------ site layer
WANG = yaml.safe_load((ROOT / "reference" / "published.yaml").read_text())["study_a"]["wang_circuit"]
SMOL = {"name_mover": [[23, 3], [29, 1], [23, 0]], "s_inhibition": [[20, 0], [19, 2], [22, 4]]}


def test_site_layer_rule():
    r = B.resolve_layer("auto", {"classes": WANG}, 12)
    assert r["layer"] == 8 and r["name_movers"] == [[9, 6], [9, 9], [10, 0]]
    assert B.resolve_layer("auto", {"classes": SMOL}, 30)["layer"] == 22
    r = B.resolve_layer(9, {"classes": WANG}, 12)  # an explicit layer keeps the name movers above it
    assert r["layer"] == 9 and r["name_movers"] == [[10, 0]] and r["rule"].startswith("config")


@pytest.mark.parametrize("setting, classes, needle", [
    ("auto", {"name_mover": [[9, 9]], "s_inhibition": []}, "no S-inhibition heads"),
    ("auto", {"name_mover": [[9, 9]], "s_inhibition": [[7, 3], [9, 1]]}, "inconsistent"),
    ("auto", {"name_mover": [], "s_inhibition": [[7, 3]]}, "no name-mover heads"),
    (10, {"name_mover": [[9, 9], [10, 0]], "s_inhibition": [[7, 3]]}, "no name mover lies above layer 10"),
    (12, {"name_mover": [[9, 9]], "s_inhibition": [[7, 3]]}, "layers 0-11"),
])
def test_site_layer_errors_say_what_to_set(setting, classes, needle):
    with pytest.raises(B.SiteError) as exc:
        B.resolve_layer(setting, {"classes": classes}, 12)
    assert needle in str(exc.value)
    if setting == "auto" and classes["name_mover"]:
        assert "subspace.layer" in str(exc.value)


# ------------------------------------------------------------------ END-only runs on tiny models
def _batch(n=12, seed=0) -> B.PairBatch:
    """Random pairs of two 'templates' (10 and 8 tokens, padded), sources differing at N1/N2."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, SMALL_VOCAB, (n, 10), generator=g)
    template = ["T0" if i % 4 < 2 else "T1" for i in range(n)]
    end = torch.tensor([9 if t == "T0" else 7 for t in template])
    for i, t in enumerate(template):
        if t == "T1":
            tokens[i, 8:] = 0
    src = tokens.clone()
    src[:, 2], src[:, 4] = tokens[:, 4], tokens[:, 2]
    io, s = tokens[:, 2].clone(), tokens[:, 4].clone()
    order = ["ABB" if i % 2 == 0 else "BAB" for i in range(n)]
    return B.PairBatch(tokens, src, end, torch.full((n,), 2), torch.full((n,), 4), io, s, s.clone(), order, template)


def _full_run(m, tokens, end, name, rows_value):
    rows = torch.arange(len(tokens))

    def hook(x):
        x = x.clone()
        x[rows, end] = rows_value
        return x

    return m(tokens, hooks={name: hook}, logits_at=end)


@pytest.mark.parametrize("site", ["mlp", "resid"])
def test_end_only_forward_matches_a_full_hooked_run(models, arch, site):
    m, batch, layer = models[arch], _batch(), 1
    cache = B.cache_site(m, batch, layer, batch_size=5)
    name = f"blocks.{layer}.mlp.hook_post" if site == "mlp" else f"blocks.{layer}.hook_resid_post"
    base, src = B.site_pair(cache, site)
    assert torch.equal(base, S.site_activations(m, name, batch.tokens, batch.end))
    assert torch.equal(src, S.site_activations(m, name, batch.src, batch.end))
    v = S.unit(torch.randn(base.shape[1], generator=torch.Generator().manual_seed(3)))
    idx = torch.tensor([0, 2, 3, 7, 10])
    fwd = B.forward_for(m, cache, site)
    with torch.no_grad():
        a = S.subspace_patch(base[idx], src[idx], v)
        ref = _full_run(m, batch.tokens[idx], batch.end[idx], name, a)
        torch.testing.assert_close(fwd(a, idx), ref, atol=1e-5, rtol=1e-5)
        clean = m(batch.tokens[idx], logits_at=batch.end[idx])
        torch.testing.assert_close(fwd(base[idx], idx), clean, atol=1e-5, rtol=1e-5)
        rows = torch.arange(len(idx))
        torch.testing.assert_close(cache.clean_ld[idx], clean[rows, batch.io[idx]] - clean[rows, batch.s[idx]])
    assert (ref - clean).abs().max() > 1e-3  # the patch matters


def test_score_difference_and_v_grad_match_full_runs(models, arch):
    m, batch, layer = models[arch], _batch(), 0
    heads = [(1, 0), (2, 3)]
    cache = B.cache_site(m, batch, layer)
    fn = B.score_diff_fn(m, cache, heads, batch.n1, batch.n2)
    full = S.attn_score_diff_fn(m, layer, batch.tokens, batch.end, heads, batch.n1, batch.n2)
    idx = torch.arange(len(batch))
    torch.testing.assert_close(fn(cache.resid, idx), full(cache.resid), atol=1e-5, rtol=1e-5)
    g = B.grad_direction(m, cache, batch, heads, batch_size=5)
    torch.testing.assert_close(g, S.v_grad(full, cache.resid), atol=1e-5, rtol=1e-4)


def test_v_mean_is_abb_minus_bab(models):
    m, batch = models["gpt2"], _batch()
    cache = B.cache_site(m, batch, 1)
    abb = torch.tensor([o == "ABB" for o in batch.order])
    torch.testing.assert_close(B.mean_direction(cache, batch),
                               S.unit(cache.resid[abb].mean(0) - cache.resid[~abb].mean(0)))


# ------------------------------------------------------------------ Table 1 end to end on a tiny model
@pytest.mark.parametrize("arch_name", ["gpt2", "llama"])
def test_table1_invariants(models, arch_name):
    m, batch, layer = models[arch_name], _batch(n=16), 1
    name_movers = [(2, 1), (2, 3)]
    cache = B.cache_site(m, batch, layer)
    v_mlp = B.learn(m, cache, batch, "mlp", epochs=2, lr=0.05, batch_size=8, seed=0)
    v_resid = B.learn(m, cache, batch, "resid", epochs=2, lr=0.05, batch_size=8, seed=0)
    assert v_mlp.norm() == pytest.approx(1.0) and v_resid.norm() == pytest.approx(1.0)
    parts = B.decompose_all(m, layer, v_mlp, v_resid, name_movers)
    dirs = {"v_mlp": v_mlp, "v_resid": v_resid, **parts["dirs"],
            "v_grad": B.grad_direction(m, cache, batch, name_movers), "v_mean": B.mean_direction(cache, batch)}
    rows, frame = B.table1(m, cache, batch, dirs, batch_size=6)
    assert set(rows) == set(B.TABLE1_ROWS)
    for r in rows.values():
        assert 0.0 <= r["interchange_acc"] <= 1.0 and isinstance(r["fldd"], float)
    # the MLP null part is causally disconnected: its patch changes nothing beyond float error
    assert (frame.ld_v_mlp_null - frame.clean_ld).abs().max() < 1e-4
    assert abs(rows["v_mlp_null"]["fldd"]) < 1e-2
    # the full patches really change the output, and FLDD follows its definition
    assert (frame.ld_full_resid - frame.clean_ld).abs().max() > 1e-3
    assert rows["full_resid"]["fldd"] == pytest.approx(100 * (1 - frame.ld_full_resid.mean() / frame.clean_ld.mean()),
                                                        rel=1e-5)
    assert rows["v_resid"]["interchange_acc"] == pytest.approx(frame.hit_v_resid.mean())
    # the row part lies in the row space, the null part in its complement
    assert parts["null_norm"]["v_mlp"] > 0.1 and 0 < parts["null_norm"]["v_resid"] < 1
    torch.testing.assert_close(parts["Q"]["mlp"].T @ dirs["v_mlp_null"], torch.zeros(parts["rowspace_dim"]["mlp"]),
                               atol=1e-5, rtol=0)


def test_identical_source_changes_nothing(models):
    m, batch = models["qwen2"], _batch(n=8)
    same = B.PairBatch(batch.tokens, batch.tokens.clone(), batch.end, batch.n1, batch.n2, batch.io, batch.s,
                       batch.expected, batch.order, batch.template)
    cache = B.cache_site(m, same, 1)
    g = torch.Generator().manual_seed(0)
    dirs = {k: S.unit(torch.randn(m.spec.d_mlp if k.startswith("v_mlp") else m.spec.d_model, generator=g))
            for site, k in B.TABLE1_ROWS.values() if k}
    rows, frame = B.table1(m, cache, same, dirs)
    for row in B.TABLE1_ROWS:
        assert (frame[f"ld_{row}"] - frame.clean_ld).abs().max() < 1e-4, row
        assert abs(rows[row]["fldd"]) < 1e-2


def test_projection_and_dormant_tables(models):
    m, batch = models["llama"], _batch(n=8)
    cache = B.cache_site(m, batch, 1)
    g = torch.Generator().manual_seed(1)
    v_mlp = S.unit(torch.randn(m.spec.d_mlp, generator=g))
    v_grad = S.unit(torch.randn(m.spec.d_model, generator=g))
    parts = B.decompose_all(m, 1, v_mlp, v_grad, [(2, 0)])
    dirs = {"v_mlp": v_mlp, **{k: v for k, v in parts["dirs"].items() if k.startswith("v_mlp")}}
    proj = B.projections(cache, batch, {**dirs, "v_grad": v_grad})
    assert len(proj) == 8 * 4 and set(proj.site) == {"mlp", "resid"}
    torch.testing.assert_close(torch.tensor(proj[proj.direction == "v_grad"].value.to_numpy(), dtype=torch.float32),
                               cache.resid @ v_grad)
    dorm = B.dormant_pathway(m, cache, batch, dirs, v_grad)
    assert set(dorm.condition) == {"clean", "full_mlp", "v_mlp", "v_mlp_row", "v_mlp_null"}
    clean = dorm[dorm.condition == "clean"].value.to_numpy()
    null = dorm[dorm.condition == "v_mlp_null"].value.to_numpy()
    assert abs(clean - null).max() < 1e-4  # the null part writes nothing (RMSNorm: an exact kernel)


# ------------------------------------------------------------------ config: subspace.layer
@pytest.mark.parametrize("value, ok", [("auto", True), (8, True), (0, True), ("autox", False), (-1, False),
                                       (2.5, False)])
def test_subspace_layer_config(value, ok):
    from mechrepro.workflow import config as C

    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg["subspace"]["layer"] = value
    if ok:
        assert C.validate(cfg, root=ROOT)["subspace"]["layer"] == value
    else:
        with pytest.raises(C.ConfigError) as exc:
            C.validate(cfg, root=ROOT)
        msg = str(exc.value)
        assert "'subspace.layer'" in msg and "auto or an integer layer >= 0" in msg, msg


def test_subspace_layer_from_the_command_line_is_an_integer():
    from mechrepro.workflow import config as C

    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    out = C.validate(cfg, root=ROOT, cli_overrides={"subspace": {"layer": "8"}})
    assert out["subspace"]["layer"] == 8
    assert C.validate(cfg, root=ROOT, cli_overrides={"subspace": {"layer": "auto"}})["subspace"]["layer"] == "auto"


# ------------------------------------------------------------------ metrics: merged from part files
class _Files(list):
    """A Snakemake-like list of paths with named entries."""

    def __init__(self, items=(), **named):
        super().__init__(items)
        for k, v in named.items():
            setattr(self, k, v)


def _snk(tmp_path, parts, out):
    from types import SimpleNamespace

    manifest = tmp_path / "manifest.json"
    manifest.write_text('{"name": "tiny-gpt2", "description": "a test model"}')
    return SimpleNamespace(rule="subspace_metrics", config={"seed": 0, "model": {"name": "tiny-gpt2", "device": "cpu",
                                                                                   "dtype": "float32"}},
                           input=_Files([str(manifest), *map(str, parts)], manifest=str(manifest),
                                        parts=[str(p) for p in parts]),
                           output=_Files([str(out)]), log=[str(tmp_path / "log.txt")], threads=1)


def test_metrics_merge_copies_every_part(tmp_path):
    import json

    from mechrepro.studies.subspace_illusion.stages import subspace_metrics

    parts = []
    for name, content in (("toy", {"toy": {"v": -2.0}}), ("ioi", {"ioi_table1": {"v_mlp": {"fldd": 1.0}},
                                                                 "ioi": {"model": "tiny-gpt2"}}),
                          ("facts", {"facts": {"0": {"n_pairs": 3}}})):
        parts.append(tmp_path / f"{name}.json")
        parts[-1].write_text(json.dumps(content))
    out = tmp_path / "metrics.json"
    subspace_metrics(_snk(tmp_path, parts, out))
    m = json.loads(out.read_text())
    assert list(m) == ["model", "model_description", "toy", "ioi_table1", "ioi", "facts"]
    assert m["model"] == "tiny-gpt2" and m["facts"]["0"]["n_pairs"] == 3
    assert json.loads((tmp_path / "metrics.json.prov.json").read_text())["rule"] == "subspace_metrics"
    clash = tmp_path / "clash.json"
    clash.write_text(json.dumps({"toy": {}}))
    with pytest.raises(ValueError, match="'toy'"):
        subspace_metrics(_snk(tmp_path, [*parts, clash], tmp_path / "m2.json"))
    stale = tmp_path / "stale.json"
    stale.write_text(json.dumps({"ioi": {"model": "gpt2"}}))
    with pytest.raises(Exception, match="gpt2"):
        subspace_metrics(_snk(tmp_path, [parts[0], stale], tmp_path / "m3.json"))


def test_merge_parts_keeps_the_order_and_refuses_clashes():
    from mechrepro.studies.subspace_illusion.metrics import merge_parts
    from mechrepro.workflow.artifacts import ArtifactError

    manifest = {"name": "tiny-gpt2", "description": "a test model"}
    m = merge_parts(manifest, [("toy.json", {"toy": 1}), ("ioi.json", {"ioi": {"model": "tiny-gpt2"}, "b": 2})])
    assert list(m) == ["model", "model_description", "toy", "ioi", "b"]
    with pytest.raises(ValueError, match="toy.json already gives"):
        merge_parts(manifest, [("toy.json", {"toy": 1}), ("x.json", {"toy": 2})])
    with pytest.raises(ValueError, match="the model description already gives"):
        merge_parts(manifest, [("x.json", {"model": "other"})])
    with pytest.raises(ArtifactError, match="x.json: a metrics part must be a JSON object"):
        merge_parts(manifest, [("x.json", [1, 2])])
    with pytest.raises(ArtifactError, match="'gpt2', not 'tiny-gpt2'"):
        merge_parts(manifest, [("x.json", {"ioi": {"model": "gpt2"}})])


def test_per_layer_sorts_layers_numerically_and_names_a_bad_file():
    from mechrepro.studies.subspace_illusion.metrics import per_layer

    out = per_layer([("l10.json", {"layer": 10, "a": 1, "b": 2}), ("l2.json", {"layer": 2, "a": 3, "b": 4})], ("a",))
    assert list(out) == ["2", "10"] and out["10"] == {"a": 1}
    with pytest.raises(ValueError, match=r"l2.json: missing \['b'\]"):
        per_layer([("l2.json", {"layer": 2, "a": 3})], ("a", "b"))


def test_run_summaries_follow_their_definitions(models):
    import math

    m, batch, layer = models["gpt2"], _batch(n=8), 1
    cache = B.cache_site(m, batch, layer)
    g = torch.Generator().manual_seed(2)
    v_mlp, v_resid = S.unit(torch.randn(m.spec.d_mlp, generator=g)), S.unit(torch.randn(m.spec.d_model, generator=g))
    parts = B.decompose_all(m, layer, v_mlp, v_resid, [(2, 1)])
    dirs = {"v_mlp": v_mlp, "v_resid": v_resid, **parts["dirs"], "v_grad": -v_resid,
            "v_mean": S.unit(torch.randn(m.spec.d_model, generator=g))}
    site = {"layer": layer, "rule": "config: subspace.layer", "s_inhibition": [], "name_movers": [[2, 1]]}
    d = B.eval_summary("tiny-gpt2", "a test model", site, 16, cache, batch, dirs, parts, {"x_s": 1.0})
    assert d["n_train"] == 16 and d["n_test"] == 8 and d["sites"]["mlp"] == "blocks.1.mlp.hook_post"
    assert d["clean_ld"] == pytest.approx(float(cache.clean_ld.mean()))
    abb = cache.clean_ld[batch.is_abb].mean()
    assert d["clean_ld_by_order"]["ABB"] == pytest.approx(float(abb))
    assert d["cos"]["v_resid_v_grad"] == pytest.approx(1.0)  # |cos|: the sign of a direction means nothing
    assert d["null_norm"]["v_grad"] == pytest.approx(d["null_norm"]["v_resid"])
    f, r = d["dim"]["mlp"], d["rowspace_dim"]["mlp"]
    assert d["random_null_norm"]["mlp"] == pytest.approx(math.sqrt((f - r) / f))
    assert set(d["rows"]) == set(B.TABLE1_ROWS) and d["rows"]["full_mlp"] == {"site": "mlp", "direction": "full"}
    ld, top = B.patched(m, cache, batch, "resid", v_resid)
    cfg = {"lr": 0.1, "epochs": 2, "batch": 4}
    s = B.das_summary("resid", site, "tiny-gpt2", cfg, cache, batch, [3.0, 2.0, 1.5], ld, top, {"train_s": 0.1})
    assert s["hook"] == "blocks.1.hook_resid_post" and s["dim"] == m.spec.d_model and s["steps"] == 3
    assert (s["loss_first"], s["loss_last"]) == (3.0, 1.5)
    assert s["train_fldd"] == pytest.approx(S.fldd(ld, cache.clean_ld))
    assert s["train_interchange_acc"] == pytest.approx(float((top == batch.expected).float().mean()))
