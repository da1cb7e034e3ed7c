"""Integration: Study B's factual-recall and fact-editing rules in the shared smoke run (config/smoke.yaml)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml


from mechrepro.studies import study
from mechrepro.studies.subspace_illusion import FACTS_FIGURES as FACTS_FIGURE_NAMES
from mechrepro.studies.subspace_illusion.metrics import FACTS_KEYS, ROME_KEYS

FACTS_RESULTS, FACTS_FIGURES = study("subspace_illusion").results, study("subspace_illusion").figures_dir

pytestmark = pytest.mark.integration


def test_facts_and_rome_parts(smoke):
    cfg = yaml.safe_load((smoke / "config" / "config.yaml").read_text())
    layers = [str(l) for l in cfg["facts"]["layers"]]
    facts = json.loads((smoke / FACTS_RESULTS / "facts.json").read_text())
    rome = json.loads((smoke / FACTS_RESULTS / "rome.json").read_text())
    assert list(facts) == ["facts", "facts_dataset"] and list(facts["facts"]) == layers
    assert list(rome) == ["rome"] and list(rome["rome"]) == layers
    for layer in layers:
        row = facts["facts"][layer]
        assert set(row) == set(FACTS_KEYS)
        assert row["n_pairs"] == cfg["facts"]["n_pairs"]
        for key in ("flip_frac_1d", "flip_frac_full_mlp", "flip_frac_row", "flip_frac_null", "flip_frac_rank1_edit"):
            assert 0.0 <= row[key] <= 1.0
        assert row["rank1_key_max_err"] < 1e-4  # the rank-1 edit equals the patch on the edited key
        assert 0.0 < row["null_norm"] <= 1.0 and 0.0 < row["random_null_norm"] < 1.0
        r = rome["rome"][layer]
        assert set(r) == set(ROME_KEYS) and r["n_pairs"] == cfg["rome"]["n_pairs"]
        frame = pd.read_csv(smoke / FACTS_RESULTS / "rome" / f"layer{layer}.csv")
        assert r["rome"] == pytest.approx(frame.rome.mean())
        # ROME's value step as published, with its contexts and diagnostics
        summary = json.loads((smoke / FACTS_RESULTS / "rome" / f"layer{layer}.json").read_text())
        n_ctx = sum(n for _, n in cfg["rome"]["context_lengths"])
        assert summary["method"] == "rome" and len(summary["contexts"]) == n_ctx
        assert (frame.n_contexts <= n_ctx).all() and (frame.steps <= cfg["rome"]["steps"] - 1).all()
        assert (frame.delta_rel <= cfg["rome"]["clamp"] + 1e-4).all()
        assert r["clamp_frac"] == pytest.approx(frame.clamped.mean())
        for col in ("v0_norm", "gain_rel", "z_norm", "spill_max", "rome_delta_only", "alpha_min_rel"):
            assert col in frame
        assert (smoke / FACTS_RESULTS / "rome" / "key_stats" / f"layer{layer}.safetensors").stat().st_size > 1000
    data = json.loads((smoke / FACTS_RESULTS / "facts" / "data.json").read_text())
    assert data["require_correct"] is False and len(data["pairs"]) == cfg["facts"]["n_pairs"]
    # facts_dataset (what the claims read) restates the dataset it was computed from
    summary = facts["facts_dataset"]
    assert summary["require_correct"] is data["require_correct"]
    assert summary["n_pairs"] == len(data["pairs"]) and summary["n_facts"] == len(data["facts"])
    for p in data["pairs"]:
        assert data["facts"][p["base"]]["relation"] == data["facts"][p["src"]]["relation"]
    prov = json.loads((smoke / FACTS_RESULTS / "facts.json.prov.json").read_text())
    assert prov["rule"] == "facts_summary" and prov["model"]["name"] == "tiny-gpt2"


def test_facts_figures_and_scorecard(smoke):
    for fig in FACTS_FIGURE_NAMES:
        png = smoke / FACTS_FIGURES / f"{fig}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", fig
        assert png.stat().st_size > 5000, fig
        assert len(pd.read_csv(smoke / FACTS_FIGURES / f"{fig}.csv")) == 2
        assert (smoke / FACTS_FIGURES / f"{fig}.png.prov.json").exists()
    card = (smoke / "results" / "scorecard.md").read_text()
    assert card.count("| study_b_facts |") >= 30
    # layer 0 is in the smoke sweep: its row carries our number
    row = next(line for line in card.splitlines() if "facts.0.flip_frac_1d (" in line)
    assert "| — |" not in row.split("gpt2-xl", 1)[1].split("tiny-gpt2")[0]
