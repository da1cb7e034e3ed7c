"""The claims evaluator (mechrepro.workflow.claims) and the claims of reference/published.yaml."""

from __future__ import annotations

import math

import pytest
import yaml

from mechrepro.workflow import claims as C

from conftest import ROOT

METRICS = {
    "model": "m",
    "variants": {"base": {"faithfulness": 0.9, "accuracy": 0.95}, "double_io": {"faithfulness": 1.3},
                 "triple_io": {"faithfulness": 0.98}},
    "facts": {"0": {"flip": 1.0, "full": 0.5}, "3": {"flip": 0.8, "full": 0.0}, "6": {"flip": 0.6, "full": 0.0}},
    "low_rank": {"found": False, "loss": None, "nan": float("nan")},
    "circuit": {"classes": {"induction": [[5, 5], [5, 8]], "duplicate_token": []}},
}


def claim(test, partly=None, requires=None, **extra):
    c = {"id": "X1", "claim": "c", "where": "w", "evidence": "e", "figure": "f", "show": {"F": "variants.base.faithfulness"},
         "test": test, **extra}
    if partly is not None:
        c["partly"] = partly
    if requires is not None:
        c["requires"] = requires
    return c


@pytest.mark.parametrize("expr,value", [
    ("variants.base.faithfulness", 0.9),
    (2, 2),
    ({"ratio": ["variants.double_io.faithfulness", "variants.base.faithfulness"]}, 1.3 / 0.9),
    ({"diff": ["variants.double_io.faithfulness", 1]}, 0.3),
    ({"abs": {"diff": ["variants.triple_io.faithfulness", 1]}}, 0.02),
    ({"mean": "facts.*.flip"}, 0.8),
    ({"max": "facts.*.full"}, 0.5),
    ({"min": {"diff": ["facts.*.flip", "facts.*.full"]}}, 0.5),
    ({"mean": {"ratio": ["facts.*.full", "facts.*.flip"]}}, 0.5 / 3),
    ({"count": "facts.*.flip"}, 3),
    ({"share": ["facts.*.flip", ">=", 0.8]}, 2 / 3),
    ({"share": ["facts.*.flip", ">", "facts.*.full"]}, 1.0),
    ({"len": "circuit.classes.induction"}, 2),
    ({"len": "circuit.classes.duplicate_token"}, 0),
])
def test_operands(expr, value):
    assert C.evaluate(expr, METRICS) == pytest.approx(value)


@pytest.mark.parametrize("expr", ["variants.quad.faithfulness", "low_rank.loss", "low_rank.nan", "facts.*.nope",
                                  {"ratio": ["variants.base.faithfulness", "facts.3.full"]},
                                  {"mean": "low_rank.*"}, "variants.base", {"len": "variants.base.accuracy"}])
def test_missing_null_nan_and_non_values_are_missing(expr):
    with pytest.raises(C.Missing):
        C.evaluate(expr, METRICS)


def test_verdicts():
    hi = ["variants.double_io.faithfulness", ">", 1.05]
    lo = ["variants.triple_io.faithfulness", ">", 1.05]
    assert C.verdict(claim(hi), METRICS).verdict == C.REPRODUCED
    v = C.verdict(claim({"all": [hi, lo]}, partly={"any": [hi, lo]}), METRICS)
    assert v.verdict == C.PARTLY and "only the weaker" in v.reason
    assert C.verdict(claim({"all": [hi, lo]}), METRICS).verdict == C.NOT_REPRODUCED
    assert C.verdict(claim(lo, partly=lo), METRICS).verdict == C.NOT_REPRODUCED
    assert C.verdict(claim(["low_rank.found", "==", True]), METRICS).verdict == C.NOT_REPRODUCED
    assert C.verdict(claim(["low_rank.found", "==", False]), METRICS).verdict == C.REPRODUCED


def test_requires_and_missing_metrics_make_a_claim_untestable_never_true():
    hi = ["variants.double_io.faithfulness", ">", 1.05]
    v = C.verdict(claim(hi, requires=["variants.base.accuracy", ">=", 0.99]), METRICS)
    assert v.verdict == C.UNTESTABLE and "not testable on this model" in v.reason
    assert "(variants.base.accuracy >= 0.99)" in v.reason  # the requirement that failed
    # a missing value anywhere in a test (even beside a part that holds) is untestable, not true
    for test in (["low_rank.loss", "<", 1], {"any": [hi, ["low_rank.loss", "<", 1]]}, {"all": [hi, ["nope", ">", 0]]}):
        v = C.verdict(claim(test), METRICS)
        assert v.verdict == C.UNTESTABLE and "missing" in v.reason, test
    assert C.verdict(claim(hi, requires=["nope.x", ">", 0]), METRICS).verdict == C.UNTESTABLE
    assert C.verdict(claim(["low_rank.loss", "<", 1], partly=hi), METRICS).verdict == C.UNTESTABLE
    # no metrics file at all
    v = C.verdict(claim(hi), None)
    assert v.verdict == C.UNTESTABLE and v.shown == {"F": None}


def test_shown_values():
    c = claim(["variants.base.faithfulness", ">", 0], show={"F": "variants.base.faithfulness", "gone": "x.y",
                                                           "flips": {"mean": "facts.*.flip"}})
    assert C.verdict(c, METRICS).shown == {"F": 0.9, "gone": None, "flips": pytest.approx(0.8)}


@pytest.mark.parametrize("test", [
    ["variants.base.faithfulness", "=>", 1],
    ["a", ">"],
    {"every": [["a", ">", 1]]},
    ["facts.*.flip", ">", 0.5],  # several values compared: aggregate first
    [{"ratio": ["a"]}, ">", 1],
    [{"median": "facts.*.flip"}, ">", 1],
    [{"len": 3}, ">", 1],
])
def test_malformed_tests_are_refused(test):
    with pytest.raises(C.ClaimError):
        C.check_claims([claim(test)])


def test_malformed_claims_are_refused():
    with pytest.raises(C.ClaimError, match="missing fields"):
        C.check_claims([{"id": "X"}])
    with pytest.raises(C.ClaimError, match="unknown fields"):
        C.check_claims([claim(["a", ">", 1], verdict="reproduced")])
    with pytest.raises(C.ClaimError, match="used twice"):
        C.check_claims([claim(["a", ">", 1]), claim(["a", ">", 1])])
    with pytest.raises(C.ClaimError, match="no figure"):
        C.check_claims([claim(["a", ">", 1])], figures={"g"})


def test_render():
    t = {"all": [["a.b", ">", 1.05], {"any": [[{"abs": {"diff": ["x", 1]}}, "<", 0.1], [{"mean": "f.*.y"}, ">=", 0.5]]},
                 [{"share": [{"ratio": ["m.*.l", "m.*.f"]}, ">=", 0.9]}, ">=", 0.5], ["c", "==", True]]}
    assert C.render(t) == ("a.b > 1.05 and (|(x − 1)| < 0.1 or mean(f.*.y) >= 0.5) and "
                           "share(m.*.l / m.*.f >= 0.9) >= 0.5 and c == true")


def _reference_claims():
    from mechrepro.studies import studies

    ref = yaml.safe_load((ROOT / "reference" / "published.yaml").read_text())
    for s in studies().values():
        for key in s.scorecard:
            yield s, key, ref[key].get("claims", [])


def test_reference_claims_are_well_formed_and_every_claim_is_untestable_without_metrics():
    ids = set()
    n = 0
    for s, key, claims in _reference_claims():
        C.check_claims(claims, set(s.figures), where=f"{key}.claims")
        for c in claims:
            assert c["id"] not in ids, c["id"]
            assert c["id"].startswith(s.letter), (c["id"], s.letter)
            ids.add(c["id"])
            n += 1
            for metrics in (None, {}, {"model": "x"}):
                assert C.verdict(c, metrics).verdict == C.UNTESTABLE, c["id"]
    assert n >= 20


def test_reference_claim_texts_keep_tables_and_templates_intact():
    """No '|' (a Markdown table cell), and no Jinja markers (the report's front page is a template)."""
    for _, key, claims in _reference_claims():
        for c in claims:
            text = " ".join(str(c[k]) for k in ("id", "claim", "where", "evidence", "figure")) + " ".join(c["show"])
            assert "|" not in text and "{{" not in text and "{%" not in text and "{#" not in text, (key, c["id"])


def test_nan_is_missing():
    assert C.verdict(claim(["low_rank.nan", ">", 0]), METRICS).verdict == C.UNTESTABLE
    assert math.isnan(METRICS["low_rank"]["nan"])
