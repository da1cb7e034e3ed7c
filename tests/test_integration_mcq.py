"""Integration: Study C's rules in the shared smoke run (config/smoke.yaml: a 20-step organism with the
accuracy gate set to 0, three label sets, tiny numbers of questions). Its claims may be untestable: the
point is that every artifact is written."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest


from mechrepro.studies import study

C = study("mcq_circuits")
MCQ_RESULTS, MCQ_FIGURES, MCQ_FIGURES_LIST = C.results, C.figures_dir, list(C.figures)

pytestmark = pytest.mark.integration


def test_metrics_contract(smoke):
    m = json.loads((smoke / MCQ_RESULTS / "metrics.json").read_text())
    assert m["model"] == "mcq-organism" and "trained here" in m["model_description"]
    assert set(m["accuracy"]) == {"abcd", "random_letters", "numbers"}
    assert all(0.0 <= v <= 1.0 for v in m["accuracy"].values())
    assert len(m["top_nodes"]) == 5
    for node in m["top_nodes"]:
        assert set(node) == {"node", "dla", "total_effect", "direct_effect", "category"}
        assert node["node"].startswith(("L", "MLP")) and isinstance(node["dla"], float)
    assert set(m["low_rank"]["loss_by_rank"]) == {"1", "2", "4", "full"}  # d_head 8 in smoke: 8 is "full"
    assert set(m["mutations"]) == {"abcd", "random_letters", "numbers"}
    for row in m["mutations"].values():
        assert set(row) == {"full", "low_rank", "ablated"}
    # the full head on normal labels is the model itself on the items it answers correctly
    assert m["mutations"]["abcd"]["full"] == 1.0
    # what the claims of reference/published.yaml read (the claims themselves are not in metrics.json)
    assert "claims" not in m and set(m["low_rank_kept"]) | set(m["low_rank_excluded"]) == {"random_letters", "numbers"}
    assert not set(m["low_rank_kept"]) & set(m["low_rank_excluded"]) and set(m["low_rank_recovered"]) == set(m["low_rank_kept"])
    # the correct-letter checks: every head checked, the low-rank head counts only if it passed them all
    v = m["verification"]
    assert v["n_heads_passing"] == len(v["heads_passing"]) and set(v["thresholds"]) >= {"min_swap", "min_key_r2"}
    assert m["low_rank"]["correct_letter_head"] == (m["low_rank"]["head"] in v["heads_passing"])
    assert m["organism"]["label_control"] is True and m["organism"]["timings"]["train_seconds"] > 0
    assert isinstance(m["low_rank"]["correct_letter_head"], bool) and set(m["low_rank"]["key_position_r2"]) >= {"abcd"}
    assert sum(m["head_categories"].values()) == 2 * 4 and m["patching"]["n_flagged"] == len(m["patching"]["flagged"])


def test_artifacts_figures_and_provenance(smoke):
    dla = json.loads((smoke / MCQ_RESULTS / "dla.json").read_text())
    assert dla["max_abs_sum_error"] < 1e-3  # the parts sum to the logit difference
    verify = pd.read_csv(smoke / MCQ_RESULTS / "verify.csv")
    assert len(verify) == 2 * 4 and {"correct_share_random_letters", "swap_head", "ov_letters", "key_position_r2",
                                     "passes"} <= set(verify)
    training = json.loads((smoke / MCQ_RESULTS / "organism.json").read_text())
    assert [h["step"] for h in training["history"]] == [10, 20]  # the training-time / accuracy curve
    heads = pd.read_csv(smoke / MCQ_RESULTS / "heads.csv")
    assert len(heads) == 2 * 4 and heads.category.notna().all()
    patching = pd.read_csv(smoke / MCQ_RESULTS / "patching.csv")
    assert len(patching) == 2 * 4 + 2 and {"total_effect", "direct_effect", "indirect_flag"} <= set(patching)
    for fig in MCQ_FIGURES_LIST:
        png = smoke / MCQ_FIGURES / f"{fig}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000, fig
        pd.read_csv(smoke / MCQ_FIGURES / f"{fig}.csv")
        assert json.loads(Path(str(png) + ".prov.json").read_text())["rule"] == "figure"
    manifest = json.loads((smoke / "resources/models/mcq-organism/manifest.json").read_text())
    assert manifest["source"]["kind"] == "trained" and manifest["source"]["train_tokens_sha256"]
    for path in (smoke / MCQ_RESULTS).rglob("*.json"):
        if not path.name.endswith(".prov.json"):
            prov = json.loads(Path(str(path) + ".prov.json").read_text())
            assert prov["rule"].startswith("mcq_") and prov["model"]["name"] == "mcq-organism"
    card = (smoke / "results" / "scorecard.md").read_text()
    assert card.count("| study_c |") == 3 and "chinchilla-70b" in card
