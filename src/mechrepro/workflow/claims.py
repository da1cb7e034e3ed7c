"""The papers' claims as data, and one evaluator that gives each its verdict on our metrics.

A claim lives in ``reference/published.yaml`` (``<entry>.claims``, one list per scorecard entry):

.. code-block:: yaml

    - id: A2
      claim: the paper's sentence, in our words
      where: where in the paper (section, table, figure)
      evidence: the paper's numbers
      model: gpt2                  # the model of the evidence (default: the entry's model)
      figure: table1_faithfulness  # the study's figure that shows it
      show: {DoubleIO F: variants.double_io.faithfulness}   # our numbers, as shown in the report
      requires: [variants.base.accuracy, ">=", 0.75]         # the model can do the task
      test: {all: [[variants.double_io.faithfulness, ">", 1.05], ...]}
      partly: {any: [...]}        # optional: the weaker test of "partly reproduced"

**Tests.** A test is a comparison ``[left, op, right]`` (``op``: ``<``, ``<=``, ``>``, ``>=``,
``==``, ``!=``) or ``{all: [tests]}`` / ``{any: [tests]}``. A side is an *operand*:

* a string: a dotted key of ``metrics.json`` (``variants.base.faithfulness``); a ``*`` part
  matches every key at that level (``facts.*.flip_frac_1d``: one value per layer);
* a number or boolean: a constant;
* ``{ratio: [a, b]}``, ``{diff: [a, b]}`` (a − b), ``{abs: a}``: element by element on ``*`` values;
* ``{mean: a}``, ``{min: a}``, ``{max: a}``, ``{count: a}``: of the ``*`` values of ``a``;
  ``{len: key}``: the length of a list or object;
* ``{share: [a, op, b]}``: the fraction of the ``*`` values for which the comparison holds.

A comparison must compare single values (aggregate ``*`` values first).

**Verdicts** (:func:`verdict`), in this order:

* *untestable*: a value a test reads (``requires``, ``test`` or ``partly``) is missing, null or
  not a number (NaN; a ratio over zero), or ``requires`` does not hold: this model cannot do the
  task the claim is about, so the metric cannot decide it;
* *reproduced*: ``test`` holds;
* *partly reproduced*: ``partly`` holds (the rule is stated with the verdict);
* *not reproduced*: otherwise.

A missing metric is never an error and never makes a claim true. A malformed test is an error of
the reference file (:func:`check_claims` finds it; a unit test runs it on the shipped file).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

REPRODUCED, PARTLY, NOT_REPRODUCED, UNTESTABLE = "reproduced", "partly reproduced", "not reproduced", "untestable"
VERDICTS = (REPRODUCED, PARTLY, NOT_REPRODUCED, UNTESTABLE)
OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq,
       "!=": operator.ne}
ELEMENTWISE = ("ratio", "diff", "abs")
AGGREGATES = ("mean", "min", "max", "count", "len", "share")
CLAIM_FIELDS = {"id", "claim", "where", "evidence", "model", "figure", "show", "requires", "test", "partly"}
REQUIRED_FIELDS = ("id", "claim", "where", "evidence", "figure", "show", "test")


class Missing(Exception):
    """A value a test needs is missing, null or not a number (the claim is untestable)."""


class ClaimError(ValueError):
    """A claim of the reference file is malformed (names the claim and what is wrong)."""


# ------------------------------------------------------------------------------------- operands
def _number(x, where: str):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        raise Missing(f"{where} is null")
    if isinstance(x, bool) or isinstance(x, (int, float, str)):
        return x
    raise Missing(f"{where} is not a single value")


class Values(dict):
    """The values a ``*`` key matched: ``{matched key: value}``, in the file's order."""


def lookup(metrics: dict, key: str, raw: bool = False):
    """The single value at dotted ``key`` (``raw``: whatever is there, e.g. a list); with ``*``
    parts, :class:`Values`. Raises :class:`Missing` when nothing, or no single value, is there."""
    nodes = {"": metrics}
    for part in key.split("."):
        nxt = {}
        for prefix, node in nodes.items():
            if not isinstance(node, dict):
                continue
            items = node.items() if part == "*" else ([(part, node[part])] if part in node else [])
            for k, v in items:
                nxt[f"{prefix}.{k}" if prefix else str(k)] = v
        nodes = nxt
    if not nodes:
        raise Missing(f"{key} is missing")
    if "*" not in key.split("."):
        return nodes[key] if raw and nodes[key] is not None else _number(nodes[key], key)
    return Values({k: _number(v, k) for k, v in nodes.items()})


def _pair(a, b, fn, name: str):
    """``fn`` element by element: two :class:`Values` pair up in order, a single value is broadcast."""
    if isinstance(a, Values) and isinstance(b, Values):
        if len(a) != len(b):
            raise Missing(f"{name}: the two sides match {len(a)} and {len(b)} values")
        return Values({ka: fn(va, vb) for (ka, va), vb in zip(a.items(), b.values())})
    if isinstance(a, Values):
        return Values({k: fn(v, b) for k, v in a.items()})
    if isinstance(b, Values):
        return Values({k: fn(a, v) for k, v in b.items()})
    return fn(a, b)


def _ratio(a, b):
    if b == 0:
        raise Missing("a ratio over zero")
    return a / b


def evaluate(expr, metrics: dict):
    """The value of an operand (a number, a boolean, or ``{key: value}`` for ``*`` operands)."""
    if isinstance(expr, str):
        return lookup(metrics, expr)
    if isinstance(expr, bool) or isinstance(expr, (int, float)):
        return expr
    if not isinstance(expr, dict) or len(expr) != 1:
        raise ClaimError(f"an operand must be a key, a number or a one-key mapping, not {expr!r}")
    (name, arg), = expr.items()
    if name in ("ratio", "diff"):
        a, b = (evaluate(x, metrics) for x in arg)
        return _pair(a, b, _ratio if name == "ratio" else operator.sub, name)
    if name == "abs":
        v = evaluate(arg, metrics)
        return Values({k: abs(x) for k, x in v.items()}) if isinstance(v, Values) else abs(v)
    if name == "len":
        v = lookup(metrics, arg, raw=True)
        if not isinstance(v, (list, dict)):
            raise Missing(f"{arg} is not a list")
        return len(v)
    if name == "share":
        left, op, right = arg
        held = _pair(evaluate(left, metrics), evaluate(right, metrics), OPS[op], "share")
        values = list(held.values()) if isinstance(held, Values) else [held]
        if not values:
            raise Missing("share: no values")
        return sum(bool(x) for x in values) / len(values)
    values = evaluate(arg, metrics)
    values = list(values.values()) if isinstance(values, Values) else [values]
    if name == "count":
        return len(values)
    if not values:
        raise Missing(f"{name}: no values")
    return {"mean": lambda v: sum(v) / len(v), "min": min, "max": max}[name](values)


def holds(test, metrics: dict) -> bool:
    """Whether ``test`` holds on ``metrics``; raises :class:`Missing` when a value it reads is missing."""
    if isinstance(test, dict):
        (name, parts), = test.items()
        results = [holds(t, metrics) for t in parts]  # every part is evaluated: any missing value counts
        return all(results) if name == "all" else any(results)
    left, op, right = test
    a, b = evaluate(left, metrics), evaluate(right, metrics)
    if isinstance(a, Values) or isinstance(b, Values):
        raise ClaimError(f"{test!r} compares several values: aggregate them (mean, min, max, share)")
    try:
        return bool(OPS[op](a, b))
    except TypeError as err:
        raise Missing(f"{left!r} {op} {right!r}: {err}") from None


# ------------------------------------------------------------------------------------- verdicts
@dataclass
class Verdict:
    """One claim's verdict, its reason, and the values shown beside it (``show``: label → value)."""

    claim: dict
    verdict: str
    reason: str
    shown: dict[str, object] = field(default_factory=dict)


def verdict(claim: dict, metrics: dict | None) -> Verdict:
    """The verdict of one claim on ``metrics`` (None: the study's metrics file is missing)."""
    metrics = metrics if isinstance(metrics, dict) else {}
    shown = {label: _shown(expr, metrics) for label, expr in (claim.get("show") or {}).items()}
    try:
        if "requires" in claim and not holds(claim["requires"], metrics):
            req = claim["requires"]
            parts = req["all"] if isinstance(req, dict) and "all" in req else [req]
            failed = "; ".join(render(t) for t in parts if not holds(t, metrics))
            return Verdict(claim, UNTESTABLE, f"not testable on this model: its 'testable when' test ({failed}) does "
                           "not hold", shown)
        if holds(claim["test"], metrics):
            return Verdict(claim, REPRODUCED, "the test holds", shown)
        if "partly" in claim and holds(claim["partly"], metrics):
            return Verdict(claim, PARTLY, "only the weaker ('partly') test holds", shown)
        return Verdict(claim, NOT_REPRODUCED, "the test does not hold" + (", nor the weaker one" if "partly" in claim
                                                                          else ""), shown)
    except Missing as why:
        return Verdict(claim, UNTESTABLE, f"a needed metric is missing: {why}", shown)


def _shown(expr, metrics: dict):
    try:
        return evaluate(expr, metrics)
    except Missing:
        return None


# ------------------------------------------------------------------------------------- text
def render(expr) -> str:
    """A test or operand as text, e.g. ``variants.double_io.faithfulness > 1.05 and ...``."""
    if isinstance(expr, list) and len(expr) == 3 and expr[1] in OPS:
        return f"{render(expr[0])} {expr[1]} {render(expr[2])}"
    if isinstance(expr, dict):
        (name, arg), = expr.items()
        if name in ("all", "any"):
            joined = f" {'and' if name == 'all' else 'or'} ".join(
                f"({render(t)})" if isinstance(t, dict) else render(t) for t in arg)
            return joined
        if name == "ratio":
            return f"{render(arg[0])} / {render(arg[1])}"
        if name == "diff":
            return f"({render(arg[0])} − {render(arg[1])})"
        if name == "abs":
            return f"|{render(arg)}|"
        if name == "share":
            return f"share({render(arg)})"
        return f"{name}({render(arg)})"
    return str(expr).lower() if isinstance(expr, bool) else str(expr)


# ------------------------------------------------------------------------------------- checks
def _check_operand(expr, where: str) -> None:
    if isinstance(expr, (str, int, float)):
        return
    if not isinstance(expr, dict) or len(expr) != 1:
        raise ClaimError(f"{where}: {expr!r} is not an operand (a key, a number or a one-key mapping)")
    (name, arg), = expr.items()
    if name in ("ratio", "diff"):
        if not isinstance(arg, list) or len(arg) != 2:
            raise ClaimError(f"{where}: {name} takes two operands")
        for a in arg:
            _check_operand(a, where)
    elif name == "share":
        _check_test(arg, where, inside_share=True)
    elif name == "len":
        if not isinstance(arg, str):
            raise ClaimError(f"{where}: len takes a key")
    elif name in ("abs", "mean", "min", "max", "count"):
        _check_operand(arg, where)
    else:
        raise ClaimError(f"{where}: unknown operation {name!r} (known: {', '.join(ELEMENTWISE + AGGREGATES)})")


def _multi(expr) -> bool:
    """Whether an operand gives several values (a ``*`` key not yet aggregated)."""
    if isinstance(expr, str):
        return "*" in expr.split(".")
    if isinstance(expr, dict):
        (name, arg), = expr.items()
        if name in ("ratio", "diff"):
            return any(_multi(a) for a in arg)
        return name == "abs" and _multi(arg)
    return False


def _check_test(test, where: str, inside_share: bool = False) -> None:
    if isinstance(test, dict):
        if len(test) != 1 or next(iter(test)) not in ("all", "any") or not isinstance(next(iter(test.values())), list):
            raise ClaimError(f"{where}: a combined test is {{all: [...]}} or {{any: [...]}}, not {test!r}")
        for t in next(iter(test.values())):
            _check_test(t, where)
        return
    if not isinstance(test, list) or len(test) != 3 or test[1] not in OPS:
        raise ClaimError(f"{where}: a comparison is [left, op, right] with op one of {' '.join(OPS)}, not {test!r}")
    _check_operand(test[0], where)
    _check_operand(test[2], where)
    if not inside_share and (_multi(test[0]) or _multi(test[2])):
        raise ClaimError(f"{where}: {render(test)} compares several values: aggregate them (mean, min, max, share)")


def check_claims(claims: list[dict], figures: set[str] | None = None, where: str = "claims") -> None:
    """Raise :class:`ClaimError` naming the first malformed claim (fields, tests, figure names)."""
    seen = set()
    for i, c in enumerate(claims or []):
        name = f"{where}[{i}] ({c.get('id', '?')})" if isinstance(c, dict) else f"{where}[{i}]"
        if not isinstance(c, dict):
            raise ClaimError(f"{name}: a claim is a mapping")
        missing = [k for k in REQUIRED_FIELDS if k not in c]
        unknown = sorted(set(c) - CLAIM_FIELDS)
        if missing or unknown:
            raise ClaimError(f"{name}: missing fields {missing}" if missing else f"{name}: unknown fields {unknown}")
        if c["id"] in seen:
            raise ClaimError(f"{name}: the id {c['id']!r} is used twice")
        seen.add(c["id"])
        if figures is not None and c["figure"] not in figures:
            raise ClaimError(f"{name}: the study has no figure {c['figure']!r}")
        if not isinstance(c["show"], dict) or not c["show"]:
            raise ClaimError(f"{name}: show maps labels to operands")
        for label, expr in c["show"].items():
            _check_operand(expr, f"{name} show {label!r}")
        for part in ("requires", "test", "partly"):
            if part in c:
                _check_test(c[part], f"{name} {part}")
