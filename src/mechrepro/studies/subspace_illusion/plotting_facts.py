"""Figures of Study B's factual-recall and fact-editing part (notebooks/subspace_illusion/facts_*, rome_*).

The notebooks call :func:`load`, one ``*_data`` function (the table of plotted numbers, saved as
the figure's CSV) and the matching ``plot_*`` function. The paper's curves are read from
``reference/published.yaml`` (entry ``study_b_facts``) and drawn against relative depth
(layer / number of layers), since the default model has 30 layers and GPT2-XL 48.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from mechrepro.workflow.artifacts import read_json  # noqa: E402
from mechrepro.workflow.figures import add_caption, save, suptitle  # noqa: E402,F401

PAPER_LAYERS = 48  # GPT2-XL, the paper's model for this part


@dataclass
class FactArtifacts:
    results: Path
    data: dict
    facts: dict
    rome: dict
    n_layers: int
    description: str
    published: dict

    def layer_csv(self, kind: str, layer: str) -> pd.DataFrame:
        return pd.read_csv(self.results / kind / f"layer{layer}.csv")


def load(results_dir: str | Path, reference: str | Path | None = None) -> FactArtifacts:
    """Read facts.json, rome.json, the dataset and the model manifest (for the layer count and caption)."""
    results = Path(results_dir)
    root = results.parents[1]
    data = read_json(results / "facts" / "data.json")
    manifest_dirs = sorted((root / "resources" / "models").glob("*/manifest.json"))
    n_layers, description = None, data.get("model_description", data.get("model", "?"))
    for m in manifest_dirs:
        man = read_json(m)
        if man.get("name") == data.get("model"):
            n_layers = man["spec"]["n_layers"]
            description = man.get("description", description)
    ref_path = Path(reference) if reference else root / "reference" / "published.yaml"
    published = yaml.safe_load(ref_path.read_text()).get("study_b_facts", {}) if ref_path.is_file() else {}
    return FactArtifacts(results, data, read_json(results / "facts.json")["facts"],
                         read_json(results / "rome.json")["rome"], n_layers or 0, description, published)


def paper_curve(art: FactArtifacts, prefix: str, field: str) -> pd.DataFrame:
    """The paper's per-layer values ``{prefix}.{layer}.{field}`` with their relative depth."""
    rows = []
    for n in art.published.get("numbers", []):
        parts = n["ours"].split(".")
        if len(parts) == 3 and parts[0] == prefix and parts[2] == field:
            rows.append({"layer": int(parts[1]), "depth": int(parts[1]) / PAPER_LAYERS, "value": n["value"]})
    return pd.DataFrame(rows, columns=["layer", "depth", "value"])


def _depth(art: FactArtifacts, layer) -> float:
    return int(layer) / art.n_layers if art.n_layers else float("nan")


def caption(art: FactArtifacts, n: str, note: str = "") -> str:
    text = f"Model: {art.description}. N = {n}."
    if "smollm2" in str(art.data.get("model", "")) and "Q4_1" not in art.description:
        text += " SmolLM2 is the Q4_1-quantised GGUF copy, dequantised: its weights differ from the original checkpoint."
    if not art.data.get("require_correct", True):
        text += " Facts were NOT filtered by the model's answers (facts.require_correct: false, a test setting)."
    return text + (" " + note.strip() if note else "")


# ------------------------------------------------------------------ facts: flip fractions
FLIP_KINDS = {"flip_frac_1d": "1-D patch (learned v)", "flip_frac_full_mlp": "full MLP key patch",
              "flip_frac_row": "row-space part of v", "flip_frac_null": "null-space part of v",
              "flip_frac_rank1_edit": "rank-1 edit equivalent to the 1-D patch"}


def flips_data(art: FactArtifacts) -> pd.DataFrame:
    rows = [{"layer": int(l), "depth": _depth(art, l), "n_pairs": s["n_pairs"],
             **{k: s[k] for k in FLIP_KINDS}, "rank1_agrees_1d": s["rank1_agrees_1d"],
             "ld_rel_1d": s["ld_rel_1d"], "ld_rel_full_mlp": s["ld_rel_full_mlp"]}
            for l, s in art.facts.items()]
    return pd.DataFrame(rows).sort_values("layer").reset_index(drop=True)


def plot_flips(data: pd.DataFrame, art: FactArtifacts):
    fig, ax = plt.subplots(figsize=(8, 4.6))
    styles = {"flip_frac_1d": ("C0", "o", "-"), "flip_frac_full_mlp": ("C1", "s", "-"),
              "flip_frac_row": ("C2", "^", "-"), "flip_frac_null": ("C7", "v", ":"),
              "flip_frac_rank1_edit": ("C3", "x", "--")}
    for key, label in FLIP_KINDS.items():
        c, m, ls = styles[key]
        ax.plot(data.depth, data[key], color=c, marker=m, ls=ls, label=f"ours: {label}")
    paper = paper_curve(art, "facts", "flip_frac_1d")
    if len(paper):
        ax.plot(paper.depth, paper.value, color="0.5", ls="--", marker=".", label="paper [R]: 1-D patch, GPT2-XL")
    ax.set_xlabel("relative depth (layer / number of layers); our layers: " + ", ".join(map(str, data.layer)))
    ax.set_ylabel("fraction of fact pairs flipped")
    ax.set_ylim(-0.03, 1.03)
    ax.legend(fontsize=8, loc="upper right")
    suptitle(fig, "Facts: 1-D subspace patches flip facts, the full MLP key and the row-space part do not")
    n = int(data.n_pairs.max()) if len(data) else 0
    add_caption(fig, caption(art, f"{n} fact pairs per layer", "Flipped: after the intervention at the subject's "
                             "last token, logit(source object) > logit(base object). The rank-1 edit agrees with "
                             "the 1-D patch on a mean fraction of " f"{data.rank1_agrees_1d.mean():.3f} of pairs."))
    return fig


# ------------------------------------------------------------------ facts: null-space norm
def null_norm_data(art: FactArtifacts) -> pd.DataFrame:
    rows = []
    for l, s in art.facts.items():
        frame = art.layer_csv("facts", l)
        rows.append({"layer": int(l), "depth": _depth(art, l), "n_pairs": len(frame),
                     "null_norm_mean": float(frame.null_norm.mean()), "null_norm_std": float(frame.null_norm.std()),
                     "null_norm_min": float(frame.null_norm.min()), "null_norm_max": float(frame.null_norm.max()),
                     "random_null_norm": s["random_null_norm"]})
    return pd.DataFrame(rows).sort_values("layer").reset_index(drop=True)


def plot_null_norm(data: pd.DataFrame, art: FactArtifacts):
    fig, ax = plt.subplots(figsize=(8, 4.2))
    ax.errorbar(data.layer, data.null_norm_mean, yerr=data.null_norm_std.fillna(0), marker="o", capsize=3,
                label="ours: mean ‖v_null‖ of the learned directions (± sd)")
    ax.fill_between(data.layer, data.null_norm_min, data.null_norm_max, alpha=0.15, label="ours: min-max over pairs")
    ax.plot(data.layer, data.random_null_norm, color="k", ls="--", label="random unit vector: sqrt((f - r) / f)")
    ax.set_xlabel("layer")
    ax.set_ylabel("null-space norm of the unit direction")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8, loc="lower left")
    suptitle(fig, "Facts: how much of each learned direction lies in the kernel of the MLP out projection")
    n = int(data.n_pairs.max()) if len(data) else 0
    add_caption(fig, caption(art, f"{n} directions per layer", "v = v_row + v_null against the row space of W_out "
                             "(the down projection). The paper reports 0.45-0.6 for GPT2-XL, where a random "
                             "direction gives 0.87."))
    return fig


# ------------------------------------------------------------------ ROME vs derived subspace intervention
ROME_KINDS = {"rome": "ROME edit", "derived_subspace": "derived subspace intervention", "row_only": "its row-space part"}


def rome_data(art: FactArtifacts) -> pd.DataFrame:
    rows = []
    for l, s in art.rome.items():
        frame = art.layer_csv("rome", l)
        rows.append({"layer": int(l), "depth": _depth(art, l), "n_pairs": s["n_pairs"],
                     **{k: s[k] for k in ROME_KINDS}, **{f"{k}_sem": float(frame[k].sem()) for k in ROME_KINDS},
                     "pearson": s["pearson"], "exact_frac": s["exact_frac"]})
    return pd.DataFrame(rows).sort_values("layer").reset_index(drop=True)


def plot_rome(data: pd.DataFrame, art: FactArtifacts):
    fig, ax = plt.subplots(figsize=(8, 4.6))
    for (key, label), c in zip(ROME_KINDS.items(), ("C3", "C0", "C2")):
        ax.errorbar(data.depth, data[key], yerr=data[f"{key}_sem"].fillna(0), color=c, marker="o", capsize=3,
                    label=f"ours: {label}")
    for key, c in (("rome", "C3"), ("derived_subspace", "C0")):
        paper = paper_curve(art, "rome", key)
        if len(paper):
            ax.plot(paper.depth, paper.value, color=c, ls=":", alpha=0.6, label=f"paper [R]: {ROME_KINDS[key]}, GPT2-XL")
    for _, r in data.iterrows():
        if pd.notna(r.pearson):
            ax.annotate(f"r={r.pearson:.2f}", (r.depth, r.derived_subspace), textcoords="offset points",
                        xytext=(0, -14), ha="center", fontsize=7, color="C0")
    ax.set_xlabel("relative depth (layer / number of layers); our layers: " + ", ".join(map(str, data.layer)))
    ax.set_ylabel("mean rewrite score")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    suptitle(fig, "Fact editing: ROME vs the 1-D subspace intervention it amounts to")
    n = int(data.n_pairs.max()) if len(data) else 0
    add_caption(fig, caption(art, f"{n} edits per layer", "Rewrite score (p_after - p_before) / (1 - p_before) of "
                             "the new object (Hase et al. 2023); error bars: standard error over edits; r: Pearson "
                             "correlation of the ROME and derived scores over the edits."))
    return fig
