"""Scorecard: every published number next to ours, with the model each came from.

The published numbers live in ``reference/published.yaml``; each entry names the path of the
matching value in a study's ``metrics.json``. A row is *comparable* only when both numbers come
from the same model.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from mechrepro.workflow.artifacts import read_json


def lookup(metrics: dict, dotted: str):
    """The value at a dotted path (``"variants.base.model_ld"``), or None where it is missing."""
    node = metrics
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def build(reference_path: str | Path, metrics_paths: dict[str, str]) -> list[dict]:
    """Rows ``{study, id, source, paper, paper_model, ours, our_model, comparable, artifact, key}``."""
    ref = yaml.safe_load(Path(reference_path).read_text())
    rows = []
    for study, path in metrics_paths.items():
        metrics = read_json(path)
        entry = ref[study]
        for n in entry["numbers"]:
            ours = lookup(metrics, n["ours"])
            rows.append({
                "study": study, "id": n["id"], "source": n["source"], "paper": n["value"],
                "paper_model": entry["model"], "ours": ours, "our_model": metrics.get("model"),
                "comparable": metrics.get("model") == entry["model"],
                "artifact": str(path), "key": n["ours"],
            })
    return rows


def _fmt(x) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.3f}"
    return str(x)


def to_markdown(rows: list[dict]) -> str:
    """A Markdown table of the scorecard."""
    lines = ["# Scorecard: published numbers vs ours", "",
             "`comparable` is yes only when both numbers come from the same model. "
             "`artifact` / `key` locate our number.", "",
             "| study | number | paper | paper model | ours | our model | comparable | artifact : key |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['study']} | {r['id']} ({r['source']}) | {_fmt(r['paper'])} | {r['paper_model']} | "
                     f"{_fmt(r['ours'])} | {r['our_model']} | {'yes' if r['comparable'] else 'no'} | "
                     f"`{r['artifact']}` : `{r['key']}` |")
    return "\n".join(lines) + "\n"
