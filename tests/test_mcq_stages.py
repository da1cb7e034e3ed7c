"""Study C stages called directly: the organism (trained, saved, loaded like any model), the
real-model path on a tiny random grouped-query Llama with MMLU prompts, and a clear error when a
hub model cannot be reached."""

from __future__ import annotations

import copy
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from mechrepro.workflow import artifacts as art
from mechrepro.studies.mcq_circuits import data as mcq
from mechrepro.studies.mcq_circuits import organism
from mechrepro.studies.mcq_circuits import stages as stages_mcq
from mechrepro.core.registry import ModelUnavailableError, load_model

ROOT = Path(__file__).resolve().parents[1]


class _Files(list):
    """Snakemake-like named file list."""

    def __init__(self, **named):
        super().__init__(v for v in named.values() if not isinstance(v, list))
        for k, v in named.items():
            setattr(self, k, v)


def _snk(rule: str, config: dict, tmp: Path, inputs: dict, outputs: dict, wildcards: dict | None = None):
    return SimpleNamespace(rule=rule, config=config, input=_Files(**inputs), output=_Files(**outputs),
                           wildcards=SimpleNamespace(**(wildcards or {})), log=[str(tmp / f"{rule}.log")], threads=1)


def _organism_cfg(**over) -> dict:
    cfg = copy.deepcopy(yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())["mcq"]["organism"])
    return cfg | over


@pytest.fixture(scope="module")
def smoke_config():
    cfg = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
    cfg["mcq"]["n_items"] = 8
    return cfg


def test_organism_trains_saves_and_loads_like_any_model(tmp_path, tokenizer, one_thread):
    cfg = _organism_cfg(steps=4, eval_every=2, n_eval=8)
    assert cfg["label_control"] is True
    org, summary = organism.train(cfg, tokenizer, tokenizer.bos_token_id, seed=0, progress=lambda s: None)
    assert summary["steps_run"] == 4 and len(summary["train_tokens_sha256"]) == 64
    assert [h["step"] for h in summary["history"]] == [2, 4] and "seconds" in summary["history"][0]
    assert set(summary["history"][0]["heldout_accuracy_by_label_set"]) == set(cfg["train_label_sets"])
    manifest = organism.save(org, tokenizer, tmp_path / "m", summary)
    assert manifest["source"]["kind"] == "trained" and manifest["spec"]["n_kv_heads"] == 4
    assert manifest["label_control"]["rule"].startswith("positions before the answer line")
    lm = load_model(tmp_path / "m")
    assert lm.manifest["weight_sha256"] == manifest["weight_sha256"]
    assert lm.model.control is not None  # the control is part of the analysed model
    prompts = mcq.make_prompts(mcq.synthetic_items(8, 5), "random_letters", lm.tokenizer, lm.bos_id, 0)
    batch = mcq.to_batch(prompts, lm.bos_id)
    with torch.no_grad():
        ours = lm.model(batch["tokens"], logits_at=batch["end"]).gather(1, batch["answer_ids"])
        ref = org.option_logits(batch)  # the model as trained, over its own vocabulary
    assert torch.allclose(ours, ref, atol=1e-4)
    # a second training run with the same seed is identical
    org2, summary2 = organism.train(cfg, tokenizer, tokenizer.bos_token_id, seed=0, progress=lambda s: None)
    assert summary2["train_tokens_sha256"] == summary["train_tokens_sha256"]
    assert all(torch.equal(a, b) for a, b in zip(org.model.state_dict().values(), org2.model.state_dict().values()))


def test_training_uses_deterministic_kernels_and_restores_the_setting(tokenizer, one_thread):
    # with two threads the default organism's weights differed between two runs of one seed
    # after 40 steps; deterministic kernels made them identical (docs/results.md, Study C)
    seen = []
    cfg = _organism_cfg(steps=2, eval_every=1, n_eval=4)
    assert not torch.are_deterministic_algorithms_enabled()
    organism.train(cfg, tokenizer, tokenizer.bos_token_id, seed=0,
                   progress=lambda s: seen.append(torch.are_deterministic_algorithms_enabled()))
    assert seen == [True, True] and not torch.are_deterministic_algorithms_enabled()


def test_correctness_probe_reads_each_options_word_not_its_adjective(tokenizer):
    # an adjective comes before its option's word, so under causal attention it cannot know
    # whether its option is correct: the probe reads the last content token of each option only
    item = mcq.MCQItem("Which option says dog?", ["big cat", "dog", "old horse"], 1, task="copy")
    p = mcq.tokenize(item, mcq.label_set("abcd", 3, random.Random(0)), tokenizer,
                     tokenizer.bos_token_id)
    assert [len(c) for c in p.content_pos] == [2, 1, 2]
    last, target = organism.correctness_targets(mcq.to_batch([p], tokenizer.bos_token_id))
    assert last.tolist() == [[c[-1] for c in p.content_pos]]
    assert [tokenizer.decode([p.tokens[i]]) for i in last[0].tolist()] == [" cat", " dog", " horse"]
    assert target.tolist() == [[False, True, False]]


def test_first_stage_uses_its_label_sets_then_the_training_mix(tokenizer):
    cfg = _organism_cfg(first_steps=3, first_label_sets=["random_letters"], train_label_sets=["abcd", "numbers"],
                        batch_size=12)
    rng = random.Random(0)
    ctok = organism.CachedTokenizer(tokenizer)
    letters_ab = {tokenizer(x, add_special_tokens=False)["input_ids"][0] for x in "ABCD1234"}
    for step in range(6):
        batch = organism.training_batch(cfg, step, rng, ctok, tokenizer.bos_token_id)
        labels = {int(t) for t in batch["tokens"].gather(1, batch["label_pos"]).flatten()}
        if step < 3:  # random letters E..Z only: a letter can be produced only by copying it
            assert not labels & letters_ab
        else:
            assert labels <= letters_ab


def test_answer_loss_over_the_vocabulary_or_the_options(tokenizer):
    cfg = _organism_cfg(batch_size=4)
    ctok = organism.CachedTokenizer(tokenizer)
    org = organism.Organism(cfg, organism.used_token_ids(ctok, tokenizer.bos_token_id), None, seed=0)
    batch = organism.training_batch(cfg, 50, random.Random(1), ctok, tokenizer.bos_token_id)
    full, opt, _, _ = org.losses(batch)
    rows = torch.arange(len(full))
    target = org.index(batch["answer_ids"])[rows, batch["correct"]]
    assert torch.allclose(opt, full.gather(1, org.index(batch["answer_ids"])))
    vocab = org.answer_loss(full, opt, batch, "vocabulary")
    options = org.answer_loss(full, opt, batch, "options")
    assert torch.allclose(vocab, torch.nn.functional.cross_entropy(full, target))
    assert torch.allclose(options, torch.nn.functional.cross_entropy(opt, batch["correct"]))
    assert vocab > options  # the softmax over the whole vocabulary also pays for every letter not offered


def test_copying_a_label_gets_gradient_only_from_the_vocabulary_loss():
    # END attends equally to both labels and adds c * (a letter's own answer direction): the option-only
    # loss is blind to c (both options rise together), the vocabulary-wide loss rewards it
    vocab, shown, answer = 6, torch.tensor([1, 4]), 1
    for kind, zero in (("options", True), ("vocabulary", False)):
        c = torch.zeros((), requires_grad=True)
        full = 0.5 * c * torch.nn.functional.one_hot(shown, vocab).float().sum(0)[None]  # [1, vocab]
        opt = full[:, shown]
        loss = (torch.nn.functional.cross_entropy(opt, torch.tensor([0])) if kind == "options"
                else torch.nn.functional.cross_entropy(full, torch.tensor([answer])))
        (g,) = torch.autograd.grad(loss, c)
        assert (abs(float(g)) < 1e-7) is zero, kind


def test_training_stops_once_every_training_label_set_is_learned(tokenizer, monkeypatch, one_thread):
    cfg = _organism_cfg(steps=8, eval_every=2, stop_accuracy=0.9, min_steps=0, train_label_sets=["abcd", "numbers"])
    # held-out accuracy per evaluation: ABCD is learned first, numbers at the second evaluation
    rounds = iter([{"A": 1.0, "1": 0.5}, {"A": 1.0, "1": 0.95}])
    current: dict = {}

    def fake_evaluate(model, prompts, pad_id, batch_size=128):
        if not current:
            current.update(next(rounds, {"A": 1.0, "1": 1.0}))
        return {"accuracy": current.pop(prompts[0].labels[0]), "loss": 0.0, "n": len(prompts)}

    monkeypatch.setattr(organism, "evaluate", fake_evaluate)
    _, summary = organism.train(cfg, tokenizer, tokenizer.bos_token_id, seed=0, progress=lambda s: None)
    assert summary["steps_run"] == 4  # not 2: numbers were still at 0.5 there


def test_organism_below_the_gate_fails_with_the_measured_accuracy(tokenizer, one_thread):
    cfg = _organism_cfg(steps=2, eval_every=2, n_eval=8, min_accuracy=0.99, label_control=False)  # without the control
    with pytest.raises(organism.OrganismTooWeakError, match=r"reached 0\.\d+ held-out accuracy .*min_accuracy = 0\.99"):
        organism.train(cfg, tokenizer, tokenizer.bos_token_id, seed=0, progress=lambda s: None)


def test_real_model_path_on_a_tiny_grouped_query_llama_with_mmlu(tmp_path, smoke_config, one_thread):
    cfg = copy.deepcopy(smoke_config)
    cfg["mcq"].update(model="tiny-llama", n_shots=1)
    mdir = tmp_path / "model"
    stages_mcq.mcq_model(_snk("mcq_model", cfg, tmp_path, {}, {"manifest": str(mdir / "manifest.json"),
                                                                  "training": str(tmp_path / "organism.json")}))
    assert art.read_json(tmp_path / "organism.json")["trained"] is False
    data = tmp_path / "abcd.json"
    stages_mcq.mcq_dataset(_snk("mcq_dataset", cfg, tmp_path, {"manifest": str(mdir / "manifest.json")},
                                {"out": str(data)}, {"labels": "abcd"}))
    d = art.read_json(data)
    assert d["n"] == 8 and len(d["shots"]) == 1 and d["source"].startswith("MMLU")
    assert {it["uid"] for it in d["items"]}.isdisjoint({s["uid"] for s in d["shots"]})  # shots never evaluated
    assert d["prompts"][0]["text"].count("Answer:") == 2 and len(d["corrupted"]) == 8
    acc = tmp_path / "acc"
    stages_mcq.mcq_accuracy(_snk("mcq_accuracy", cfg, tmp_path, {"manifest": str(mdir / "manifest.json"),
                                                                   "data": str(data)},
                                 {"csv": str(acc) + ".csv", "json": str(acc) + ".json"}))
    summary = art.read_json(str(acc) + ".json")
    assert summary["n"] == 8 and 0 <= summary["accuracy"] <= 1 and summary["model"] == "tiny-llama"


def test_unreachable_hub_model_gives_a_clear_error(tmp_path, smoke_config, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = copy.deepcopy(smoke_config)
    cfg["mcq"]["model"] = "hf:Qwen/Qwen2.5-0.5B"
    snk = _snk("mcq_model", cfg, tmp_path, {}, {"manifest": str(tmp_path / "m" / "manifest.json"),
                                                "training": str(tmp_path / "organism.json")})
    with pytest.raises(ModelUnavailableError, match="cannot load 'Qwen/Qwen2.5-0.5B'.*HF_HOME"):
        stages_mcq.mcq_model(snk)
