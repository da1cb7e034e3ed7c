"""Scorecard: every published number next to ours, and every claim with its verdict.

The published numbers and claims live in ``reference/published.yaml``. Each number names the path
of the matching value in a study's ``metrics.json``. A number is *compared* only where a comparison
means something: both numbers come from the same model, or the entry states a relative-depth
mapping (``depth_map``) and the row is keyed by a layer of the paper's model: it is then set beside
the layer of our run at the nearest relative depth (layer / number of layers), when one lies within
the stated tolerance. Every row says how (or why not) it is compared. Claims get their verdicts from
:mod:`mechrepro.workflow.claims`.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from mechrepro.workflow import claims as C
from mechrepro.workflow.artifacts import read_json


def lookup(metrics: dict, dotted: str):
    """The value at a dotted path (``"variants.base.model_ld"``), or None where it is missing."""
    node = metrics
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def map_layer(number: dict, depth_map: dict, metrics: dict) -> tuple[str, str, bool]:
    """``(key, how compared, compared?)`` of a number keyed by a layer of the paper's model
    (``number["layer"]``, ``{layer}`` in ``number["ours"]``): our run's layer at the nearest relative
    depth, within ``depth_map["tolerance"]``; otherwise the unresolved key and why not."""
    template, paper_layer = number["ours"], int(number["layer"])
    paper_n = int(depth_map["paper_n_layers"])
    depth = paper_layer / paper_n
    ours_n = lookup(metrics, depth_map["our_n_layers"])
    run = lookup(metrics, template.split(".{layer}", 1)[0])
    layers = sorted(int(k) for k in run) if isinstance(run, dict) and all(str(k).isdigit() for k in run) else []
    if not isinstance(ours_n, int) or ours_n <= 0 or not layers:
        return template, "not compared: our run has no layers to map to", False
    best = min(layers, key=lambda layer: (abs(layer / ours_n - depth), layer))
    gap = abs(best / ours_n - depth)
    where = f"paper layer {paper_layer}/{paper_n} = {depth:.2f}"
    if gap > float(depth_map["tolerance"]):
        return (template, f"not compared: no run layer within {depth_map['tolerance']} of relative depth {depth:.2f} "
                          f"(nearest: {best}/{ours_n} = {best / ours_n:.2f})", False)
    return template.replace("{layer}", str(best)), f"by relative depth: {where} ↔ our layer {best}/{ours_n} = " \
                                                   f"{best / ours_n:.2f}", True


def _number_row(study: str, entry: dict, n: dict, metrics: dict, path) -> dict:
    our_model = metrics.get("model")
    if "layer" in n and "depth_map" in entry:
        key, comparison, comparable = map_layer(n, entry["depth_map"], metrics)
    else:
        key = n["ours"]
        comparable = our_model == entry["model"]
        comparison = "same model" if comparable else f"not compared: different models ({entry['model']}, {our_model})"
    return {"study": study, "id": n["id"], "source": n["source"], "paper": n["value"], "paper_model": entry["model"],
            "ours": lookup(metrics, key), "our_model": our_model, "comparable": comparable,
            "comparison": comparison, "artifact": str(path), "key": key}


def _load(reference_path: str | Path, metrics_paths: dict[str, str]) -> tuple[dict, dict[str, dict]]:
    ref = yaml.safe_load(Path(reference_path).read_text())
    return ref, {study: read_json(path) for study, path in metrics_paths.items()}


def build(reference_path: str | Path, metrics_paths: dict[str, str]) -> list[dict]:
    """Number rows ``{study, id, source, paper, paper_model, ours, our_model, comparable, comparison,
    artifact, key}`` of every entry in ``metrics_paths`` (entry → its study's ``metrics.json``)."""
    ref, metrics = _load(reference_path, metrics_paths)
    return [_number_row(study, ref[study], n, metrics[study], metrics_paths[study])
            for study in metrics_paths for n in ref[study]["numbers"]]


def claim_rows(reference_path: str | Path, metrics_paths: dict[str, str]) -> list[dict]:
    """Every claim of every entry in ``metrics_paths`` with its verdict: ``{study, id, claim, where,
    evidence, paper_model, figure, verdict, reason, shown, test, partly, requires, artifact}``."""
    ref, metrics = _load(reference_path, metrics_paths)
    rows = []
    for study, path in metrics_paths.items():
        entry = ref[study]
        C.check_claims(entry.get("claims", []), where=f"{study}.claims")
        for c in entry.get("claims", []):
            v = C.verdict(c, metrics[study])
            rows.append({"study": study, **{k: c[k] for k in ("id", "claim", "where", "evidence", "figure")},
                         "paper_model": c.get("model", entry["model"]), "verdict": v.verdict, "reason": v.reason,
                         "shown": v.shown, **{k: C.render(c[k]) if k in c else None for k in ("test", "partly", "requires")},
                         "artifact": str(path)})
    return rows


def fmt(x) -> str:
    """A number as shown in the tables: 3 significant digits, ``—`` for a missing value."""
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.3f}" if 1e-3 <= abs(x) < 1e3 else f"{x:.3g}"
    return str(x)


_fmt = fmt  # the audit's name for it


NUMBERS_HEADER = ["| study | number | paper | paper model | ours | our model | compared | artifact : key |",
                  "|---|---|---|---|---|---|---|---|"]


def number_lines(rows: list[dict]) -> list[str]:
    """The numbers table (header and one line per number; the audit checks each line's number)."""
    return NUMBERS_HEADER + [
        f"| {r['study']} | {r['id']} ({r['source']}) | {fmt(r['paper'])} | {r['paper_model']} | {fmt(r['ours'])} | "
        f"{r['our_model']} | {r['comparison']} | `{r['artifact']}` : `{r['key']}` |" for r in rows]


def to_markdown(rows: list[dict]) -> str:
    """A Markdown table of the scorecard's numbers."""
    lines = ["# Scorecard: published numbers vs ours", "",
             "A number is compared only when both come from the same model, or through the relative-depth "
             "mapping the row states; `artifact` / `key` locate our number. The claims and their verdicts: "
             "`results/replication.md`.", ""]
    return "\n".join(lines + number_lines(rows)) + "\n"
