"""Scorecard rows and Markdown against a small fake metrics.json."""

from __future__ import annotations

import pytest
import yaml

from mechrepro.workflow import scorecard as S
from mechrepro.workflow.artifacts import ArtifactError, write_json

from conftest import ROOT

REF = {
    "study_a": {
        "paper": "P", "model": "gpt2",
        "numbers": [
            {"id": "t1.ld", "value": 3.484, "source": "Table 1", "ours": "variants.base.model_ld"},
            {"id": "t1.acc", "value": 0.99, "source": "Table 1", "ours": "variants.base.accuracy"},
            {"id": "t2.edges", "value": 110, "source": "Table 2", "ours": "table2.base.edges"},
            {"id": "missing", "value": 1.0, "source": "Fig 9", "ours": "variants.quad.model_ld"},
        ],
    }
}


def _write(tmp_path, model):
    ref = tmp_path / "published.yaml"
    ref.write_text(yaml.safe_dump(REF))
    metrics = tmp_path / "metrics.json"
    write_json(metrics, {"model": model, "variants": {"base": {"model_ld": 2.5, "accuracy": 0.75}},
                         "table2": {"base": {"edges": 101}}})
    return ref, metrics


@pytest.mark.parametrize("model,comparable", [("gpt2", True), ("smollm2-135m", False), (None, False)])
def test_build_rows(tmp_path, model, comparable):
    ref, metrics = _write(tmp_path, model)
    rows = S.build(ref, {"study_a": str(metrics)})
    assert [r["id"] for r in rows] == ["t1.ld", "t1.acc", "t2.edges", "missing"]
    assert [r["ours"] for r in rows] == [2.5, 0.75, 101, None]
    assert [r["paper"] for r in rows] == [3.484, 0.99, 110, 1.0]
    assert all(r["comparable"] is comparable for r in rows)
    assert all(r["paper_model"] == "gpt2" and r["our_model"] == model for r in rows)
    assert rows[2] | {} == {"study": "study_a", "id": "t2.edges", "source": "Table 2", "paper": 110,
                            "paper_model": "gpt2", "ours": 101, "our_model": model, "comparable": comparable,
                            "artifact": str(metrics), "key": "table2.base.edges"}


def test_markdown_one_row_per_number(tmp_path):
    ref, metrics = _write(tmp_path, "gpt2")
    rows = S.build(ref, {"study_a": str(metrics)})
    md = S.to_markdown(rows)
    body = [line for line in md.splitlines() if line.startswith("| study_a |")]
    assert len(body) == len(rows) == 4
    assert "| study_a | t1.ld (Table 1) | 3.484 | gpt2 | 2.500 | gpt2 | yes |" in body[0]
    assert "| 110 | gpt2 | 101 |" in body[2]
    assert "| — |" in body[3]  # missing value
    assert f"`{metrics}` : `variants.quad.model_ld`" in body[3]
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(rows)  # header, separator, one line per number
    assert table[1] == "|---|---|---|---|---|---|---|---|"
    assert all(line.count(" | ") == table[0].count(" | ") for line in table[2:])  # same column count


def test_real_reference_has_one_row_per_published_number(tmp_path):
    ref = yaml.safe_load((ROOT / "reference" / "published.yaml").read_text())
    metrics = tmp_path / "metrics.json"
    write_json(metrics, {"model": "tiny-gpt2", "circuit": {"n_heads": 7}})
    rows = S.build(ROOT / "reference" / "published.yaml", {"study_a": str(metrics)})
    assert len(rows) == len(ref["study_a"]["numbers"])
    assert len({r["id"] for r in rows}) == len(rows)  # ids are unique
    assert not any(r["comparable"] for r in rows)
    assert [r["ours"] for r in rows if r["key"] == "circuit.n_heads"] == [7]
    md = S.to_markdown(rows)
    assert sum(line.startswith("| study_a |") for line in md.splitlines()) == len(rows)


def test_missing_metrics_raises_artifact_error(tmp_path):
    ref, _ = _write(tmp_path, "gpt2")
    with pytest.raises(ArtifactError, match="nope.json"):
        S.build(ref, {"study_a": str(tmp_path / "nope.json")})


def test_reference_texts_keep_the_markdown_table_intact():
    """A '|' in a number's id or source would split its scorecard.md row (and hide it from the audit)."""
    from pathlib import Path

    ref = yaml.safe_load((Path(__file__).resolve().parents[1] / "reference" / "published.yaml").read_text())
    for study, entry in ref.items():
        for n in entry["numbers"]:
            assert "|" not in f"{n['id']} {n['source']} {n['ours']}", (study, n["id"])
