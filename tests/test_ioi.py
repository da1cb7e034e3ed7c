"""IOI datasets with the real GPT-2 tokenizer and the project's data file."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from mechrepro.studies.ioi_generalization import data as ioi
from mechrepro.studies.ioi_generalization.data import DatasetError, make_dataset

BOS = 50256
N = 30  # 15 templates x 2 orders


@pytest.fixture(scope="module")
def datasets(ioi_data, tokenizer):
    return {v: make_dataset(ioi_data, v, N, tokenizer, BOS, seed=3) for v in ioi.VARIANTS}


def _dec(tokenizer, ids):
    return tokenizer.decode(ids)


def _count(name, text):
    return len(re.findall(rf"\b{re.escape(name)}\b", text))


def test_tokenizer_is_gpt2(tokenizer):
    ids = tokenizer("When Mary and John went to the store", add_special_tokens=False)["input_ids"]
    assert ids == [2215, 5335, 290, 1757, 1816, 284, 262, 3650]
    assert tokenizer.bos_token_id == BOS
    assert len(tokenizer) == 50257


@pytest.mark.parametrize("variant", ioi.VARIANTS)
def test_positions_point_at_the_right_tokens(datasets, tokenizer, variant):
    ds = datasets[variant]
    assert ds["variant"] == variant and len(ds["prompts"]) == N
    n_io = {"base": 1, "double_io": 2, "triple_io": 3}[variant]
    orders_seen = set()
    for p in ds["prompts"]:
        toks, pos, io, s = p["tokens"], p["positions"], p["io"], p["s"]
        orders_seen.add(p["order"])
        assert toks[0] == BOS
        assert _dec(tokenizer, toks[1:]) == p["text"]
        assert set(pos) == set(ioi.ROLES)

        def prefix(role):
            return _dec(tokenizer, toks[1: pos[role] + 1])

        # each name position is that mention of the name (1st / 2nd / 3rd occurrence)
        assert _dec(tokenizer, [toks[pos["S1"]]]) == " " + s and _count(s, prefix("S1")) == 1
        assert _dec(tokenizer, [toks[pos["S2"]]]) == " " + s and _count(s, prefix("S2")) == 2
        assert _dec(tokenizer, [toks[pos["IO1"]]]) == " " + io and _count(io, prefix("IO1")) == 1
        assert toks[pos["S2"]] == p["s_token"] and toks[pos["IO1"]] == p["io_token"]
        assert pos["S1+1"] == pos["S1"] + 1 and pos["IO1+1"] == pos["IO1"] + 1
        assert _dec(tokenizer, [toks[pos["S1+1"]]]).strip() not in (s, io)
        and_role = "IO1+1" if p["order"] == "ABBA" else "S1+1"
        assert _dec(tokenizer, [toks[pos[and_role]]]) == " and"
        if p["order"] == "ABBA":
            assert pos["IO1"] < pos["S1"]
        else:
            assert pos["S1"] < pos["IO1"]
        if n_io >= 2:
            assert _dec(tokenizer, [toks[pos["IO2"]]]) == " " + io and _count(io, prefix("IO2")) == 2
            assert pos["S1"] < pos["IO2"] < pos["S2"] and pos["IO1"] < pos["IO2"]
        else:
            assert pos["IO2"] == -1
        if n_io == 3:
            assert _dec(tokenizer, [toks[pos["IO3"]]]) == " " + io and _count(io, prefix("IO3")) == 3
            assert pos["IO2"] < pos["IO3"] < pos["S2"]
        else:
            assert pos["IO3"] == -1
        assert _count(io, p["text"]) == n_io and _count(s, p["text"]) == 2
        assert pos["END"] == len(toks) - 1 and _dec(tokenizer, [toks[-1]]) == " to"
        assert pos["S2"] < pos["END"]
    assert orders_seen == {"ABBA", "BABA"}


@pytest.mark.parametrize("variant", ioi.VARIANTS)
def test_abba_baba_balanced_and_all_templates_used(datasets, variant):
    prompts = datasets[variant]["prompts"]
    orders = [p["order"] for p in prompts]
    assert orders.count("ABBA") == orders.count("BABA") == N // 2
    pairs = {(p["template"], p["order"]) for p in prompts}
    assert pairs == {(t, o) for t in range(15) for o in ("ABBA", "BABA")}


@pytest.mark.parametrize("variant", ioi.VARIANTS)
def test_abc_prompts_align_and_use_other_names(datasets, tokenizer, variant):
    name_roles = ("S1", "IO1", "S2", "IO2", "IO3")
    for p in datasets[variant]["prompts"]:
        toks, abc, pos = p["tokens"], p["abc_tokens"], p["positions"]
        assert len(abc) == len(toks)
        assert _dec(tokenizer, abc[1:]) == p["abc_text"]
        name_pos = {pos[r] for r in name_roles if pos[r] >= 0}
        for i in range(len(toks)):
            if i not in name_pos:
                assert abc[i] == toks[i], (p["text"], p["abc_text"], i)
        abc_names = [abc[i] for i in sorted(name_pos)]
        assert len(set(abc_names)) == len(abc_names)  # distinct names in every slot
        assert p["io_token"] not in abc_names and p["s_token"] not in abc_names
        assert _count(p["io"], p["abc_text"]) == 0 and _count(p["s"], p["abc_text"]) == 0
        for t in abc_names:
            assert _dec(tokenizer, [t]).strip() in datasets[variant]["names"]


def test_single_token_filtering(ioi_data, tokenizer):
    words = ["Mary", "Zachary", "Xqzyvbrtx", "John", "Mary"]
    assert ioi.single_token_words(words, tokenizer) == ["Mary", "John"]
    ds = make_dataset(ioi_data, "base", 40, tokenizer, BOS, seed=0)
    assert "Zachary" in ioi_data["names"] and "Zachary" not in ds["names"]
    data = copy.deepcopy(ioi_data)
    data["names"] = data["names"][:12] + ["Xqzyvbrtx", "Zachary"]
    ds = make_dataset(data, "double_io", 40, tokenizer, BOS, seed=0)
    assert "Xqzyvbrtx" not in ds["names"] and len(ds["names"]) == 12
    used = {p["io"] for p in ds["prompts"]} | {p["s"] for p in ds["prompts"]}
    assert used <= set(data["names"][:12])
    assert all("Xqzyvbrtx" not in p["abc_text"] and "Zachary" not in p["abc_text"] for p in ds["prompts"])
    # one template => every prompt has the same length (positions align)
    data["templates"] = data["templates"][:1]
    ds = make_dataset(data, "triple_io", 10, tokenizer, BOS, seed=0)
    assert len({len(p["tokens"]) for p in ds["prompts"]}) == 1
    assert len({tuple(p["positions"].values()) for p in ds["prompts"] if p["order"] == "ABBA"}) == 1


@pytest.mark.parametrize("bad,needle", [
    ("When {N1} and {N2} went to the {PLACE}, gave a {OBJECT} to", "{S}"),
    ("When {N1} and {N1} went to the {PLACE}, {S} gave a {OBJECT} to", "{N1}"),
    ("When {N2} and {N1} went to the {PLACE}, {S} gave a {OBJECT} to", "order"),
    ("When {N1} and {N2} went to the {CITY}, {S} gave a {OBJECT} to", "{CITY}"),
])
def test_bad_template_raises(ioi_data, tokenizer, bad, needle):
    data = copy.deepcopy(ioi_data)
    data["templates"] = data["templates"][:3] + [bad]
    with pytest.raises(DatasetError, match=re.escape(needle)) as exc:
        make_dataset(data, "base", 8, tokenizer, BOS, seed=0)
    assert "template 3" in str(exc.value)


def test_too_few_names_raises(ioi_data, tokenizer):
    data = copy.deepcopy(ioi_data)
    data["names"] = ["Mary", "John", "Tom", "Anna", "Kate", "Zachary", "Xqzyvbrtx", "Sam"]
    with pytest.raises(DatasetError, match="only 6 of the 8 names.*at least 10"):
        make_dataset(data, "base", 8, tokenizer, BOS, seed=0)
    with pytest.raises(DatasetError, match="at least 20"):
        make_dataset(ioi_data | {"names": ioi_data["names"][:19]}, "base", 8, tokenizer, BOS, seed=0,
                     min_names=20)


def test_other_dataset_errors(ioi_data, tokenizer):
    with pytest.raises(DatasetError, match="unknown ioi variant 'quad_io'.*base, double_io, triple_io"):
        make_dataset(ioi_data, "quad_io", 8, tokenizer, BOS, seed=0)
    with pytest.raises(DatasetError, match="at least 2"):
        make_dataset(ioi_data, "base", 1, tokenizer, BOS, seed=0)
    with pytest.raises(DatasetError, match="places"):
        make_dataset(ioi_data | {"places": ["Xqzyvbrtx"]}, "base", 8, tokenizer, BOS, seed=0)


def test_same_seed_same_dataset_and_names_shared_across_variants(ioi_data, tokenizer, datasets):
    again = make_dataset(ioi_data, "double_io", N, tokenizer, BOS, seed=3)
    assert again == datasets["double_io"]
    other = make_dataset(ioi_data, "double_io", N, tokenizer, BOS, seed=4)
    assert [p["text"] for p in other["prompts"]] != [p["text"] for p in again["prompts"]]
    keys = ("io", "s", "place", "object", "template", "order")
    for i in range(N):
        ref = {k: datasets["base"]["prompts"][i][k] for k in keys}
        for v in ("double_io", "triple_io"):
            assert {k: datasets[v]["prompts"][i][k] for k in keys} == ref
    # the names really vary from prompt to prompt
    assert len({p["io"] for p in datasets["base"]["prompts"]}) > 10


def test_to_batch_pads_and_subsets(datasets):
    ds = datasets["triple_io"]
    batch = ioi.to_batch(ds, pad_id=0)
    lengths = [len(p["tokens"]) for p in ds["prompts"]]
    assert batch.tokens.shape == (N, max(lengths)) == batch.abc.shape
    for i, p in enumerate(ds["prompts"]):
        assert batch.tokens[i, : lengths[i]].tolist() == p["tokens"]
        assert (batch.tokens[i, lengths[i]:] == 0).all()
        assert batch.abc[i, : lengths[i]].tolist() == p["abc_tokens"]
        for r in ioi.ROLES:
            assert batch.pos[r][i] == p["positions"][r]
    assert batch.io.tolist() == [p["io_token"] for p in ds["prompts"]]
    assert batch.s.tolist() == [p["s_token"] for p in ds["prompts"]]
    assert batch.template.tolist() == [p["template"] for p in ds["prompts"]]
    sub = batch.subset([3, 0])
    assert len(sub) == 2 and sub.order == [batch.order[3], batch.order[0]]
    assert torch.equal(sub.tokens, batch.tokens[[3, 0]]) and torch.equal(sub.pos["S2"], batch.pos["S2"][[3, 0]])


def test_render_spans():
    r = ioi.render(ioi.insert_variant("When {N1} and {N2} left, {S} gave it to", ["{IO} ran.", "{IO} sat."]),
                   {"N1": "Ann", "N2": "Bob", "S": "Bob", "IO": "Ann"}, "x", "y")
    assert r.text == "When Ann and Bob left, Ann ran. Ann sat. Bob gave it to"
    assert {k: r.text[a:b] for k, (a, b) in r.spans.items()} == {
        "N1": "Ann", "N2": "Bob", "IO2": "Ann", "IO3": "Ann", "S": "Bob"}
    assert r.spans["IO2"][0] < r.spans["IO3"][0] < r.spans["S"][0]
