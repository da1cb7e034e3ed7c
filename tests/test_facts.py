"""Study B, factual recall and fact editing: facts, pairs, the per-layer sweep, ROME and the summaries."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mechrepro.studies.subspace_illusion import facts as F
from mechrepro.studies.subspace_illusion import rome as R
from mechrepro.core import subspace as S
from mechrepro.studies.subspace_illusion.metrics import ROME_KEYS

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ facts and pairs
def _facts(objects: dict[str, list[tuple[str, int]]], correct=None) -> list[dict]:
    """Hand-made facts: relation -> [(subject, object id)], all correct unless listed in ``correct``."""
    out = []
    for rel, items in objects.items():
        for subj, obj in items:
            ok = True if correct is None else (subj in correct)
            out.append({"relation": rel, "subject": subj, "object": str(obj), "object_id": obj, "correct": ok,
                        "tokens": [0, 5, 6, 7], "subject_pos": 2, "end_pos": 3})
    return out


def test_build_facts_positions_with_the_gpt2_tokenizer(tokenizer):
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    rels = {"capital": {"prompt": "The capital city of {} is", "facts": {"South Korea": "Seoul", "France": "Paris"}},
            "lead": {"prompt": "{} is located in the city of", "facts": {"The Eiffel Tower": "Paris"}}}
    facts = F.build_facts(rels, enc, 50256)
    assert len(facts) == 3
    korea = facts[0]
    assert korea["tokens"][0] == 50256 and korea["tokens"][1:] == enc("The capital city of South Korea is")
    assert tokenizer.decode(korea["tokens"][korea["subject_pos"]]) == " Korea"
    assert tokenizer.decode(korea["tokens"][korea["end_pos"]]) == " is"
    assert korea["object_id"] == enc(" Seoul")[0]
    tower = facts[2]
    assert tokenizer.decode(tower["tokens"][tower["subject_pos"]]) == " Tower"
    assert tokenizer.decode(tower["tokens"][1:tower["subject_pos"] + 1]) == "The Eiffel Tower"


def test_load_facts_data_checks_templates(tmp_path):
    rels = F.load_facts_data(ROOT / "config" / "facts_data.yaml")
    assert len(rels) >= 8 and all(r["prompt"].count("{}") == 1 for r in rels.values())
    bad = tmp_path / "bad.yaml"
    bad.write_text("relations:\n  capital:\n    prompt: The capital of France is\n    facts: {France: Paris}\n")
    with pytest.raises(ValueError, match="exactly one"):
        F.load_facts_data(bad)
    with pytest.raises(FileNotFoundError, match="facts.data_file"):
        F.load_facts_data(tmp_path / "missing.yaml")


def test_load_counterfact(tmp_path):
    recs = [{"requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
                                   "target_true": {"str": "French"}, "target_new": {"str": "English"},
                                   "relation_id": "P103"}},
            {"requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Thomas Joannes Stieltjes",
                                   "target_true": {"str": "Dutch"}, "relation_id": "P103"}}]
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(recs))
    rels = F.load_counterfact(path)
    (rel,) = rels.values()
    assert rel["facts"] == {"Danielle Darrieux": "French", "Thomas Joannes Stieltjes": "Dutch"}
    path.write_text(json.dumps([{"nope": 1}]))
    with pytest.raises(ValueError, match="record 0"):
        F.load_counterfact(path)


def test_make_pairs_filters_and_balances():
    facts = _facts({"a": [("x1", 1), ("x2", 2), ("x3", 1), ("x4", 3)], "b": [("y1", 7), ("y2", 8)],
                    "c": [("z1", 9), ("z2", 9)]}, correct={"x1", "x2", "x3", "y1", "y2", "z1", "z2"})
    pairs = F.make_pairs(facts, 100, seed=0)
    assert pairs, "pairs expected"
    for p in pairs:
        b, s = facts[p["base"]], facts[p["src"]]
        assert b["relation"] == s["relation"] == p["relation"]
        assert b["object_id"] != s["object_id"]
        assert b["correct"] and s["correct"]
    # x4 is wrong; relation c has one object only -> no pair
    assert {p["relation"] for p in pairs} == {"a", "b"}
    assert len(pairs) == len({(p["base"], p["src"]) for p in pairs}) == 4 + 2  # a: x1<->x2, x3<->x2 ; b: 2
    first = F.make_pairs(facts, 2, seed=0)
    assert len(first) == 2 and {p["relation"] for p in first} == {"a", "b"}  # round-robin over relations
    assert F.make_pairs(facts, 2, seed=0) == first  # deterministic
    everything = F.make_pairs(facts, 100, seed=0, require_correct=False)
    assert any(facts[p["base"]]["subject"] == "x4" for p in everything)


def test_check_pairs_message():
    facts = _facts({"a": [("x1", 1), ("x2", 2)]}, correct={"x1"})
    with pytest.raises(ValueError, match=r"only 0 fact pairs .*1 of 2 facts.*facts.min_pairs = 3.*require_correct"):
        F.check_pairs([], facts, 3, "tiny", "config/facts_data.yaml")
    F.check_pairs([{}] * 3, facts, 3, "tiny", "x")


def test_answer_facts_marks_the_models_top1(models):
    m = models["llama"]
    tokens = [0, 11, 12, 13, 14]
    with torch.no_grad():
        top = int(m(torch.tensor([tokens]), logits_at=torch.tensor([4])).argmax())
    facts = [{"relation": "r", "tokens": tokens, "subject_pos": 2, "end_pos": 4, "object_id": top},
             {"relation": "r", "tokens": tokens[:4], "subject_pos": 2, "end_pos": 3, "object_id": (top + 1) % 101}]
    out = F.answer_facts(m, facts, batch=1)
    assert out[0]["correct"] and out[0]["top1"] == top and 0 < out[0]["p_object"] <= 1
    assert out[1]["top1"] != out[1]["object_id"] or not out[1]["correct"]


# ------------------------------------------------------------------ corpus
WIKITEXT = """{{Infobox country|name=Peru|capital=[[Lima]]}}
'''Peru''' is a country in [[South America|western South America]], bordered by [[Ecuador]] and Colombia.<ref>{{cite web|url=x}}</ref>
== History ==
* a list item that is long enough to count as a paragraph of prose text
[[File:Flag of Peru.svg|thumb|The [[flag]] of Peru]]
{| class="wikitable"
| a table cell with many words that must never reach the corpus text at all
|}
Its capital is Lima, a city on the Pacific coast with about ten million people.<!-- hidden comment -->
Short line.
[[Category:Countries]]
"""


def test_wikitext_paragraphs_keep_prose_only():
    assert F.wikitext_paragraphs(WIKITEXT) == [
        "Peru is a country in western South America, bordered by Ecuador and Colombia.",
        "Its capital is Lima, a city on the Pacific coast with about ten million people."]


def _dump(path: Path, pages: list[tuple[str, str]]) -> Path:
    import bz2
    from xml.sax.saxutils import escape

    ns = "http://www.mediawiki.org/xml/export-0.10/"
    body = "".join(f"<page><title>{escape(t)}</title><revision><text>{escape(x)}</text></revision></page>"
                   for t, x in pages)
    path.write_bytes(bz2.compress(f'<mediawiki xmlns="{ns}">{body}</mediawiki>'.encode()))
    return path


def test_wikipedia_paragraphs_from_a_dump(tmp_path):
    """Articles only (no redirect, namespaced page or stub), every paragraph once, in a seeded order."""
    para = "word " * 30
    pages = [("Peru", WIKITEXT + "\n" + para.strip()), ("Lima", "#REDIRECT [[Lima, Peru]]"),
             ("Talk:Peru", para), ("Stub", "A stub article of only a few words, too short to use here."),
             ("Chile", "\n".join(f"Chile paragraph {i} " + para for i in range(4)))]
    dump = _dump(tmp_path / "d.xml.bz2", pages)
    paras = F.wikipedia_paragraphs(dump)
    assert len(paras) == 3 + 4 and sum(p.startswith("Chile paragraph") for p in paras) == 4
    assert not any("stub" in p or "REDIRECT" in p for p in paras)
    assert paras == F.wikipedia_paragraphs(dump) and sorted(paras) == sorted(F.wikipedia_paragraphs(dump, seed=1))


def test_wikipedia_sample_missing_names_the_fetch(tmp_path, monkeypatch):
    import shutil

    import yaml

    from mechrepro.studies.subspace_illusion import checks
    from mechrepro.workflow.config import ConfigError

    root = Path(__file__).resolve().parents[1]
    for name in ("facts_data.yaml", "subspace_ioi_data.yaml"):
        (tmp_path / "config").mkdir(exist_ok=True)
        shutil.copy(root / "config" / name, tmp_path / "config" / name)
    config = yaml.safe_load((root / "config" / "smoke.yaml").read_text())
    config["rome"]["corpus"] = "wikipedia_sample"
    assert checks.corpus_file(config) == [checks.WIKIPEDIA_SAMPLE]
    assert checks.corpus_file({"rome": {"corpus": "stdlib_docs"}}) == []
    with pytest.raises(ConfigError, match="'rome.corpus' is wikipedia_sample.*fetch_wikipedia_sample.sh"):
        checks.check_data_files(config, tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="fetch_wikipedia_sample.sh"):
        F.corpus_texts("wikipedia_sample")


def test_corpus_texts_and_batches(tokenizer):
    texts = F.corpus_texts("stdlib_docs")
    assert len(texts) > 200
    assert all(len(t.split()) >= 12 and ">>>" not in t for t in texts)
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    batches = list(F.corpus_batches(texts, enc, 50256, n_tokens=1000, chunk=64, batch=4))
    assert sum(int(mask.sum()) for _, mask in batches) == 1000
    for tokens, mask in batches:
        assert (tokens[:, 0] == 50256).all() and not mask[:, 0].any()
    with pytest.raises(ValueError, match="fewer than rome.corpus_tokens"):
        list(F.corpus_batches(texts[:2], enc, 50256, n_tokens=10 ** 6, chunk=64))


# ------------------------------------------------------------------ the sweep on a tiny model
def _tiny_facts(n_rel: int = 2, per_rel: int = 4, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for r in range(n_rel):
        for i in range(per_rel):
            length = 6 + i % 3
            toks = [0, *torch.randint(1, 101, (length,), generator=g).tolist()]
            out.append({"relation": f"r{r}", "subject": f"s{r}{i}", "object": f"o{i}", "tokens": toks,
                        "subject_pos": 3 + i % 2, "end_pos": length, "object_id": 10 + i, "correct": True})
    return out


def _sigma(m, layer, n=6, seed=3):
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randint(1, 101, (8, 16), generator=g) for _ in range(n)]
    sig, _ = R.key_moments(m, [layer], batches)
    return sig[layer]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_sweep_layer_summary_and_rank1_equivalence(models, arch):
    m = models[arch]
    facts = _tiny_facts()
    pairs = F.make_pairs(facts, 6, seed=0)
    layer = 1
    C = _sigma(m, layer)
    frame, summary, V = F.sweep_layer(m, layer, facts, pairs, C, steps=40, lrs=[0.05, 0.01], seed=0)
    assert summary["n_pairs"] == len(frame) == len(pairs) == 6
    assert V.shape == (6, m.spec.d_mlp)
    torch.testing.assert_close(V.norm(dim=1), torch.ones(6))
    for key in ("flip_frac_1d", "flip_frac_full_mlp", "flip_frac_row", "flip_frac_null", "flip_frac_rank1_edit"):
        assert 0.0 <= summary[key] <= 1.0
    # the rank-1 edit reproduces the patched key's MLP output on the edited key (pipeline code path)
    assert summary["rank1_key_max_err"] < 1e-5
    # the null-space part of v changes nothing: its LD equals the clean LD
    assert frame.ld_null.tolist() == pytest.approx(frame.ld_clean.tolist(), abs=1e-4)
    # flips are what the LDs say, as exact fractions k/n (a claim compares them with thresholds like 0.95)
    assert summary["flip_frac_1d"] == int((frame.ld_1d < 0).sum()) / len(frame)
    agree = int(((frame.ld_rank1_edit < 0) == (frame.ld_1d < 0)).sum())
    assert summary["rank1_agrees_1d"] == agree / len(frame)
    assert math.isclose(summary["ld_rel_1d"], frame.ld_1d.mean() / frame.ld_clean.mean(), rel_tol=1e-6)
    f, r = S.mlp_rowspace(m, layer).shape
    assert summary["random_null_norm"] == pytest.approx(math.sqrt((f - r) / f))
    assert 0.0 <= summary["null_norm"] <= 1.0
    # training lowered the loss below the clean LD on average (the loss is the patched LD)
    assert frame.final_loss.mean() < frame.ld_clean.mean()
    torch.testing.assert_close(torch.tensor(frame.final_loss.tolist()), torch.tensor(frame.ld_1d.tolist()),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_suffix_forward_matches_the_full_recompute(models, arch):
    """Recomputing only the positions from the subject on, over cached keys/values, changes nothing."""
    m = models[arch]
    facts = _tiny_facts(per_rel=5)
    pb = F.pair_batch(facts, F.make_pairs(facts, 8, seed=0))
    layer = 1
    kb, ks = F.key_at(m, layer, pb.tokens_base, pb.subj_base), F.key_at(m, layer, pb.tokens_src, pb.subj_src)
    patched = kb + 0.7 * (ks - kb)
    idx = torch.arange(len(pb))
    full = S.mlp_post_forward(m, layer, pb.tokens_base, pb.subj_base, pb.end_base)
    with torch.no_grad():
        ref = full(patched, idx)
        torch.testing.assert_close(F.SuffixForward(m, layer, pb.tokens_base, pb.subj_base, pb.end_base)(patched, idx),
                                   ref, atol=1e-5, rtol=1e-5)
        vocab = torch.tensor([3, 10, 11, 50])
        sub = F.SuffixForward(m, layer, pb.tokens_base, pb.subj_base, pb.end_base, vocab)
        torch.testing.assert_close(sub(patched[2:5], idx[2:5]), ref[2:5][:, vocab], atol=1e-5, rtol=1e-5)


def test_learn_pair_directions_rows_are_independent(models):
    """Each row's direction depends on its own pair only: training a subset gives the same rows."""
    m = models["llama"]
    facts = _tiny_facts()
    pairs = F.make_pairs(facts, 4, seed=0)
    pb = F.pair_batch(facts, pairs)
    kb, ks = F.key_at(m, 1, pb.tokens_base, pb.subj_base), F.key_at(m, 1, pb.tokens_src, pb.subj_src)
    fwd = S.mlp_post_forward(m, 1, pb.tokens_base, pb.subj_base, pb.end_base)
    V, loss = F.learn_pair_directions(kb, ks, fwd, pb.target, steps=10, lrs=[0.05], seed=0)
    # one row alone, with the same initial vector (row 0 of the seeded draw)
    sub = F.pair_batch(facts, pairs[:1])
    fwd1 = S.mlp_post_forward(m, 1, sub.tokens_base, sub.subj_base, sub.end_base)
    V1, _ = F.learn_pair_directions(kb[:1], ks[:1], fwd1, sub.target, steps=10, lrs=[0.05], seed=0)
    torch.testing.assert_close(V1[0], V[0], atol=1e-5, rtol=1e-4)


def test_sgd_sweep_recovers_a_planted_direction():
    """A linear read-out ``LD = k · d`` and sources that differ from the bases along ``d`` only
    (``k_src = k_base − c d``): the patched LD is ``k_base·d − c (v·d)²``, lowest at ``v = ±d``."""
    g = torch.Generator().manual_seed(21)
    n, f = 4, 12
    d = torch.randn(n, f, generator=g)
    d = d / d.norm(dim=1, keepdim=True)
    k_base = torch.randn(n, f, generator=g)
    k_src = k_base - 3.0 * d

    def forward_fn(patched, idx):  # logits of (base object, source object)
        ld = (patched * d[idx]).sum(1)
        return torch.stack([ld, torch.zeros_like(ld)], dim=1)

    target = torch.tensor([[0, 1]] * n)
    V, loss = F.learn_pair_directions(k_base, k_src, forward_fn, target, steps=200, lrs=[0.3, 0.03], seed=0,
                                      optimizer="sgd", trials=2)
    assert (V * d).sum(1).abs().min() > 0.999  # the planted direction, up to sign
    torch.testing.assert_close(loss, (k_base * d).sum(1) - 3.0, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(V.norm(dim=1), torch.ones(n))
    # the best step is kept: a run too short to get there returns the lowest loss it saw, at its direction
    V1, loss1 = F.learn_pair_directions(k_base, k_src, forward_fn, target, steps=3, lrs=[0.01], seed=0,
                                        optimizer="sgd")
    coef = ((k_src - k_base) * V1).sum(1)
    torch.testing.assert_close(loss1, ((k_base + coef[:, None] * V1) * d).sum(1))
    assert ((V1 * d).sum(1).abs() < 0.999).all()
    with pytest.raises(ValueError, match="facts.optimizer"):
        F.learn_pair_directions(k_base, k_src, forward_fn, target, steps=1, lrs=[0.1], seed=0, optimizer="lbfgs")
    # a loss that drifts upwards with every call, whatever the direction: the first step's direction is kept
    calls = []

    def drifting(patched, idx):
        calls.append(1)
        return forward_fn(patched, idx) + torch.tensor([10.0 * len(calls), 0.0])

    V2, loss2 = F.learn_pair_directions(k_base, k_src, drifting, target, steps=20, lrs=[0.3], seed=0, optimizer="sgd")
    u0 = torch.randn(n, f, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(V2, u0 / u0.norm(dim=1, keepdim=True))
    assert len(calls) == 20 and loss2.max() < 10.0 + (k_base * d).sum(1).abs().max() + 3.0


def test_sgd_on_a_tiny_model_lowers_the_patched_ld(models):
    m = models["gpt2"]
    facts = _tiny_facts()
    pb = F.pair_batch(facts, F.make_pairs(facts, 4, seed=0))
    kb, ks = F.key_at(m, 1, pb.tokens_base, pb.subj_base), F.key_at(m, 1, pb.tokens_src, pb.subj_src)
    fwd = S.mlp_post_forward(m, 1, pb.tokens_base, pb.subj_base, pb.end_base)
    V, loss = F.learn_pair_directions(kb, ks, fwd, pb.target, steps=30, lrs=[0.3], seed=0, optimizer="sgd")
    V0, loss0 = F.learn_pair_directions(kb, ks, fwd, pb.target, steps=1, lrs=[0.3], seed=0, optimizer="sgd")
    assert (loss <= loss0 + 1e-6).all() and (loss < loss0 - 1e-3).any()
    with torch.no_grad():
        ld = F._ld(F.patch_rows(fwd, kb, ks, V), pb.target)
    torch.testing.assert_close(ld, loss, atol=1e-5, rtol=1e-5)


class _Words:
    """A word-level tokenizer for tiny models: each word (and ".") is one id below 101, BOS 0."""

    def __init__(self):
        self.ids: dict[str, int] = {}

    def encode(self, text: str) -> list[int]:
        return [self.ids.setdefault(w, 1 + len(self.ids) % 100) for w in text.replace(".", " . ").split()]

    def decode(self, ids: list[int]) -> str:
        names = {v: k for k, v in self.ids.items()}
        return " ".join(names.get(i, f"t{i}") for i in ids)


def _word_facts(words: _Words) -> list[dict]:
    """Facts whose subject is the prompt's last word (a random tiny model barely moves information
    between positions, so the edit must act at the position read)."""
    rels = {"r0": {"prompt": "alpha beta {}", "facts": {f"s{i}": f"o{i}" for i in range(4)}},
            "r1": {"prompt": "gamma {}", "facts": {f"u{i}": f"p{i}" for i in range(4)}}}
    facts = F.build_facts(rels, words.encode, 0)
    for f in facts:
        f["correct"] = True
    return facts


def _setup(m, layer, words, method, contexts=("delta epsilon", "zeta eta theta"), **kw):
    hp = R.ValueParams(method=method, **({"steps": 20, "lr": 0.5, "early_stop": 0.0} | kw))
    return F.RomeSetup(m, layer, _sigma(m, layer), 1e-3, hp, list(contexts), words.encode, 0)


def test_rome_prompts_with_the_gpt2_tokenizer(tokenizer):
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    rels = {"capital": {"prompt": "The capital city of {} is", "facts": {"South Korea": "Seoul"}}}
    fact = F.build_facts(rels, enc, 50256)[0]
    tokens, subj, read, n = F.rome_prompts(fact, ["I like tea", "Once upon a time"], enc, 50256)
    assert n == 3 and len(tokens) == 4  # bare + 2 contexts, then "South Korea is a"
    assert tokens[0, :fact["end_pos"] + 1].tolist() == fact["tokens"]
    assert (subj[0], read[0]) == (fact["subject_pos"], fact["end_pos"])
    assert tokens[1, 1:read[1] + 1].tolist() == enc("I like tea. The capital city of South Korea is")
    for i in range(4):
        assert tokens[i, 0] == 50256 and tokenizer.decode(tokens[i, subj[i]]) == " Korea"
    assert tokenizer.decode(tokens[1:3, :].gather(1, read[1:3, None]).flatten()) == " is is"
    assert read[3] == subj[3] and tokenizer.decode(tokens[3, 1:5]) == "South Korea is a"
    tokens, subj, read, n = F.rome_prompts(fact, [], enc, 50256, essence=())
    assert n == 1 and tokens.tolist() == [fact["tokens"]]


def test_rome_layer_edits_and_diagnostics(models):
    m = models["gpt2"]
    words = _Words()
    facts = _word_facts(words)
    pairs = F.make_pairs(facts, 3, seed=0)
    layer = 1
    setup = _setup(m, layer, words, "rome")
    frame, summary = F.rome_layer(setup, facts, pairs)
    assert summary["n_pairs"] == 3 and summary["method"] == "rome"
    assert (frame.p_new_rome > frame.p_new_before).all() and summary["rome"] > 0.5
    assert (frame.n_contexts == 2).all() and (frame.steps <= 19).all()
    assert ((frame.delta_rel <= 4.0 + 1e-5) & (frame.clamped == (frame.delta_rel > 4.0 - 1e-4))).all()
    for col in ("rome", "derived_subspace", "row_only", "rome_delta_only"):
        assert (frame[col] <= 1.0 + 1e-9).all()
    assert set(F.rome_summary(frame, layer, "rome")) >= set(ROME_KEYS)
    json.dumps(summary, allow_nan=False)  # JSON-safe
    checked = 0
    for i, pair in enumerate(pairs):
        checked += _check_rome_row(m, layer, setup, words, frame.iloc[i], facts[pair["base"]], facts[pair["src"]])
    assert checked >= 1  # at least one edit whose clean model prefers the old object (a real alpha scan)


def _check_rome_row(m, layer, setup, words, row, base, src) -> bool:
    """The diagnostics of one edit, recomputed independently with full hooked forward passes."""
    tok, subj, end = torch.tensor([base["tokens"]]), torch.tensor([base["subject_pos"]]), torch.tensor([base["end_pos"]])
    tokens, s, read, n = F.rome_prompts(base, setup.contexts, words.encode, 0)
    run = R.SubjectRun(m, layer, tokens, s, read)
    res = R.compute_value(run, n, src["object_id"], setup.params)
    assert row.delta_norm == pytest.approx(float(res.delta.norm()))

    def hooked(delta):
        with torch.no_grad():
            return m(tok, hooks={f"blocks.{layer}.hook_mlp_out": lambda x: x.index_put(
                (torch.tensor([0]), subj), x[0, subj] + delta)}, logits_at=end)[0]

    new, old = src["object_id"], base["object_id"]
    p0 = float(hooked(0 * res.delta).softmax(-1)[new])
    p1 = float(hooked(res.delta).softmax(-1)[new])
    assert row.rome_delta_only == pytest.approx(float(R.rewrite_score(p0, p1)), abs=1e-5)
    # spill: |kᵀu| at the other positions of the prompt (the subject's own is 1)
    u = R.rome_left(setup.C, run.keys[:n].mean(0), F.key_at(m, layer, tok, subj)[0], setup.ridge)
    coef = R.collect_keys(m, [layer], [tok])[layer] @ u
    assert coef[base["subject_pos"]] == pytest.approx(1.0, abs=1e-4)
    assert row.spill_max == pytest.approx(float(coef[:base["subject_pos"]].abs().max()), rel=1e-4)
    clean = hooked(0 * res.delta)
    if clean[new] >= clean[old] or math.isnan(row.alpha_min_rel):
        return False
    a, unit = row.alpha_min_rel * float(res.delta.norm()), res.delta / res.delta.norm()
    assert hooked(a * 1.001 * unit)[new] > hooked(a * 1.001 * unit)[old]
    assert hooked(a * 0.99 * unit)[new] <= hooked(a * 0.99 * unit)[old]
    return True


def test_rome_layer_simplified_method(models):
    m = models["llama"]
    words = _Words()
    facts = _word_facts(words)
    pairs = F.make_pairs(facts, 2, seed=0)
    frame, summary = F.rome_layer(_setup(m, 1, words, "simplified", steps=12, weight_decay=0.01, clamp=10.0),
                                  facts, pairs)
    assert summary["method"] == "simplified" and (frame.n_contexts == 0).all()
    assert (frame.steps == 12).all() and not frame.stopped_early.any() and (frame.loss_kl == 0).all()
    assert (frame.p_new_rome > frame.p_new_before).all()
    with pytest.raises(ValueError, match="rome.method"):
        R.ValueParams(method="sgd")


def test_pearson():
    assert F.pearson([1, 2, 3], [2, 4, 6.5]) == pytest.approx(0.9986, abs=1e-3)
    assert math.isnan(F.pearson([1, 1, 1], [1, 2, 3]))
    assert math.isnan(F.pearson([1], [2]))


# ------------------------------------------------------------------ the summary stages
class _Named(list):
    """A list with attributes, as Snakemake's input/output objects."""


def _snk(tmp_path, inputs, output, rule):
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"name": "tiny", "weight_sha256": "0" * 64, "description": "tiny"}))
    data = tmp_path / "data.json"  # the facts dataset (facts_summary records what the facts are)
    data.write_text(json.dumps({"require_correct": True, "n_facts": 5, "n_correct": 3, "pairs": [[0, 1], [1, 2]]}))
    inp = _Named([*inputs, str(manifest), str(data)])
    inp.layers, inp.manifest, inp.data = inputs, str(manifest), str(data)
    return SimpleNamespace(config={"seed": 0, "model": {"device": "cpu", "dtype": "float32", "name": "tiny"}},
                           input=inp, output=[str(output)],
                           log=[], threads=1, rule=rule, wildcards=SimpleNamespace())


def test_facts_summary_collects_layers_in_order(tmp_path):
    from mechrepro.studies.subspace_illusion import stages as SF

    paths = []
    for layer in (10, 2):
        row = {k: 0.5 for k in SF.FACTS_KEYS} | {"layer": layer, "n_pairs": 4, "extra": 1}
        p = tmp_path / f"layer{layer}.json"
        p.write_text(json.dumps(row))
        paths.append(str(p))
    out = tmp_path / "facts.json"
    SF.facts_summary(_snk(tmp_path, paths, out, "facts_summary"))
    got = json.loads(out.read_text())
    assert list(got) == ["facts", "facts_dataset"] and list(got["facts"]) == ["2", "10"]
    assert got["facts_dataset"] == {"require_correct": True, "n_facts": 5, "n_correct": 3, "n_pairs": 2}
    assert set(got["facts"]["2"]) == set(SF.FACTS_KEYS) and got["facts"]["10"]["n_pairs"] == 4
    assert json.loads(Path(str(out) + ".prov.json").read_text())["model"]["name"] == "tiny"
    bad = tmp_path / "layer3.json"
    bad.write_text(json.dumps({"layer": 3, "n_pairs": 1}))
    with pytest.raises(ValueError, match="missing"):
        SF.facts_summary(_snk(tmp_path, [str(bad)], out, "facts_summary"))


def test_count_correct_by_relation():
    from mechrepro.studies.subspace_illusion.facts import count_correct

    facts = [{"relation": "capital", "correct": True}, {"relation": "capital", "correct": False},
             {"relation": "language", "correct": True}]
    assert count_correct(facts) == (2, {"capital": {"n": 2, "correct": 1}, "language": {"n": 1, "correct": 1}})
    assert count_correct([]) == (0, {})
