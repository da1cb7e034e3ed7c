"""Scorecard rows and Markdown against a small fake metrics.json: which rows are compared (same model,
or a stated relative-depth mapping) and how."""

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
    comparison = "same model" if comparable else f"not compared: different models (gpt2, {model})"
    assert rows[2] | {} == {"study": "study_a", "id": "t2.edges", "source": "Table 2", "paper": 110,
                            "paper_model": "gpt2", "ours": 101, "our_model": model, "comparable": comparable,
                            "comparison": comparison, "artifact": str(metrics), "key": "table2.base.edges"}


def test_markdown_one_row_per_number(tmp_path):
    ref, metrics = _write(tmp_path, "gpt2")
    rows = S.build(ref, {"study_a": str(metrics)})
    md = S.to_markdown(rows)
    body = [line for line in md.splitlines() if line.startswith("| study_a |")]
    assert len(body) == len(rows) == 4
    assert "| study_a | t1.ld (Table 1) | 3.484 | gpt2 | 2.500 | gpt2 | same model |" in body[0]
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


FACTS = {
    "study_b_facts": {
        "paper": "P", "model": "gpt2-xl",
        "depth_map": {"paper_n_layers": 48, "our_n_layers": "model_spec.n_layers", "tolerance": 0.05},
        "numbers": [{"id": f"facts.{layer}.flip", "value": 0.5, "source": "[R]", "ours": "facts.{layer}.flip",
                     "layer": layer} for layer in (0, 5, 10, 45)],
    }
}


@pytest.mark.parametrize("layers,n_layers,expected", [
    # SmolLM2's default sweep: 30 layers, every third; GPT2-XL's 5 (0.104) -> 3 (0.10), 45 (0.94) -> 27 (0.90)
    ((0, 3, 6, 9, 12, 15, 18, 21, 24, 27), 30, {0: "0", 5: "3", 10: "6", 45: "27"}),
    # layer 5 of 48 (0.104) has no run layer within 0.05 of it among 0 and 2 of 4; 45 (0.94) neither
    ((0, 2), 4, {0: "0", 5: None, 10: None, 45: None}),
    ((0, 2), None, {0: None, 5: None, 10: None, 45: None}),  # our number of layers unknown
])
def test_layer_rows_map_by_relative_depth(tmp_path, layers, n_layers, expected):
    ref = tmp_path / "published.yaml"
    ref.write_text(yaml.safe_dump(FACTS))
    metrics = tmp_path / "metrics.json"
    spec = {"model_spec": {"n_layers": n_layers}} if n_layers else {}
    write_json(metrics, {"model": "smollm2-135m", **spec, "facts": {str(layer): {"flip": layer / 100} for layer in layers}})
    rows = {r["id"]: r for r in S.build(ref, {"study_b_facts": str(metrics)})}
    for paper_layer, ours in expected.items():
        r = rows[f"facts.{paper_layer}.flip"]
        if ours is None:
            assert r["ours"] is None and not r["comparable"] and r["comparison"].startswith("not compared"), r
            assert r["key"] == "facts.{layer}.flip"  # unresolved: the audit finds no value there either
        else:
            assert r["comparable"] and r["key"] == f"facts.{ours}.flip" and r["ours"] == int(ours) / 100, r
            assert r["comparison"] == (f"by relative depth: paper layer {paper_layer}/48 = {paper_layer / 48:.2f} ↔ "
                                       f"our layer {ours}/{n_layers} = {int(ours) / n_layers:.2f}")
    md = S.to_markdown(list(rows.values()))
    assert all(line.count(" | ") == 7 for line in md.splitlines() if line.startswith("| study_b_facts |"))


def test_every_layer_row_of_the_reference_maps_on_the_default_sweep(tmp_path):
    """The default config's facts layers (SmolLM2, 30 layers) reach every GPT2-XL row of the paper."""
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    metrics = tmp_path / "metrics.json"
    fields = {"flip_frac_1d", "flip_frac_full_mlp", "flip_frac_row", "rome", "derived_subspace", "row_only", "pearson"}
    layer_data = {str(layer): {f: 0.5 for f in fields} for layer in config["facts"]["layers"]}
    write_json(metrics, {"model": "smollm2-135m", "model_spec": {"n_layers": 30}, "facts": layer_data, "rome": layer_data})
    rows = S.build(ROOT / "reference" / "published.yaml", {"study_b_facts": str(metrics)})
    assert rows and all(r["comparable"] and r["ours"] == 0.5 for r in rows), [r for r in rows if not r["comparable"]]
