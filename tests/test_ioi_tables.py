"""Study A's tables and records: the circuit artifact, the inference table, value paths per variant,
Table 2 and metrics.json (no model needed)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from mechrepro.studies.ioi_generalization import analysis as A
from mechrepro.studies.ioi_generalization import circuit as C


def test_circuit_source_and_reference():
    assert C.circuit_source("auto", "gpt2") == "reference"
    assert C.circuit_source("auto", "tiny-gpt2") == "discover"
    assert C.circuit_source("discover", "gpt2") == "discover"
    ref = C.reference_circuit({"name_mover": [[9, 9]]}, "gpt2")
    assert ref["source"] == "reference" and ref["scores"] == {} and ref["classes"] == {"name_mover": [[9, 9]]}
    with pytest.raises(ValueError, match="needs model.name gpt2"):
        C.reference_circuit({}, "tiny-gpt2")


def test_finish_circuit_fills_every_class_and_counts_distinct_heads():
    raw = {"source": "discovered", "method": "exact", "classes": {"name_mover": [[3, 1]], "induction": [[1, 0], [3, 1]]},
           "scores": {"logits": [{"layer": 3, "head": 1, "effect": -0.5}],
                      "induction_keys": [{"layer": 0, "head": 0, "attribution": 0.1, "effect": None}]}}
    circuit, scores = C.finish_circuit(raw, "tiny")
    assert list(circuit["classes"]) == list(C.CLASSES) and circuit["classes"]["s_inhibition"] == []
    assert circuit["n_heads"] == 2 and circuit["model"] == "tiny" and "scores" not in circuit
    assert list(scores.columns) == C.SCORE_COLUMNS and C.SCORE_COLUMNS[:4] == ["step", "layer", "head", "role"]
    assert scores.step.tolist() == ["logits", "induction_keys"] and pd.isna(scores.attribution[0])
    _, empty = C.finish_circuit({"classes": {}, "scores": {}}, "tiny")
    assert empty.empty and list(empty.columns) == C.SCORE_COLUMNS


class _Batch:
    def __init__(self, order):
        self.order = order
        self.template = torch.tensor([i % 2 for i in range(len(order))])

    def __len__(self):
        return len(self.order)


def test_inference_table_pools_and_splits_by_order():
    batch = _Batch(["ABBA", "BABA", "ABBA", "BABA"])
    m = {"ld": torch.tensor([1.0, 2.0, 3.0, -2.0]), "correct": torch.tensor([1.0, 1.0, 1.0, 0.0]),
         "p_io": torch.tensor([0.5, 0.6, 0.7, 0.1])}
    frame, s = A.inference_table(batch, m, "base", "tiny")
    assert list(frame.columns) == ["prompt", "order", "template", "ld", "correct", "p_io"] and len(frame) == 4
    assert s["pooled"]["ld"] == pytest.approx(1.0) and s["pooled"]["accuracy"] == pytest.approx(0.75)
    assert s["by_order"]["ABBA"] == {"ld": 2.0, "accuracy": 1.0, "p_io": pytest.approx(0.6), "n": 2}
    assert s["by_order"]["BABA"]["ld"] == 0.0 and (s["variant"], s["model"], s["n"]) == ("base", "tiny", 4)


def test_value_paths_from_io2_only_for_double_io(monkeypatch):
    calls = []

    def fake(model, batch, circuit, role, cfg, progress=print):
        calls.append((batch, role))
        return pd.DataFrame({"source": [role], "effect_pct": [1.0]})

    monkeypatch.setattr(A, "value_paths", fake)
    frame = A.value_paths_by_variant(None, {"base": "b", "double_io": "d"}, {}, {})
    assert calls == [("b", "S2"), ("d", "S2"), ("d", "IO2")]
    assert frame.variant.tolist() == ["base", "double_io", "double_io"] and list(frame.index) == [0, 1, 2]


def _eval(variant, restored):
    return {"variant": variant, "n": 4, "model_ld": 2.0, "circuit_ld": 1.0, "faithfulness": 0.5, "accuracy": 1.0,
            "p_io": 0.5, "nodes": 5, "edges": 10, "by_order": {"ABBA": {}}, "restored": restored}


def test_table2_and_study_metrics():
    restored = {"s2_io2": {"ld": 1.8, "faithfulness": 0.9, "edges": 14, "edge_overlap_with_base": 0.7}}
    evals = {"base": _eval("base", {}), "double_io": _eval("double_io", restored)}
    assert A.table2_row("base", evals["base"]) == {"nodes": 5, "edges": 10, "edge_overlap": 1.0, "model_ld": 2.0,
                                                   "circuit_ld": 1.0, "faithfulness": 0.5}
    assert A.table2_row("double_io", evals["double_io"]) == {"nodes": 5, "edges": 14, "edge_overlap": 0.7,
                                                             "model_ld": 2.0, "circuit_ld": 1.8, "faithfulness": 0.9}
    circuit = {"model": "tiny", "method": "exact", "n_heads": 5, "source": "discovered", "classes": {"name_mover": []}}
    m = A.study_metrics(circuit, evals, {"description": "d"}, 40, {"kind": "mean"})
    assert m["restored"] == {"double_io": {"s2_io2": 1.8}} and m["restored_faithfulness"] == {"double_io": {"s2_io2": 0.9}}
    assert set(m["variants"]["base"]) == set(A.EVAL_KEYS) and m["table2"]["double_io"]["edges"] == 14
    assert (m["model"], m["model_description"], m["n_prompts"], m["ablation"]) == ("tiny", "d", 40, {"kind": "mean"})
