"""Figures of Study C (multiple-choice circuits): data tables and plots for the notebooks.

Each figure has a ``*_data`` function (the table of plotted numbers, saved as the figure's CSV)
and a ``plot_*`` function. Notebooks under ``notebooks/mcq_circuits/`` call them with the figure's
:class:`Artifacts` (:func:`load`: read lazily, only the figure's declared inputs) and put
:func:`caption` under the figure.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from mechrepro.studies.mcq_circuits import data as mcq  # noqa: E402
from mechrepro.workflow import figures  # noqa: E402
from mechrepro.workflow.figures import add_caption, no_data, save, suptitle  # noqa: E402,F401

PAPER = ("Lieberum et al. 2023, Does Circuit Analysis Interpretability Scale? Evidence from Multiple Choice "
         "Capabilities in Chinchilla (arXiv 2307.09458)")
LABEL_SET_NAMES = {"abcd": "A B C D (normal)", "random_letters": "random letters", "other_letters": "other ordered letters",
                   "numbers": "numbers 1-4", "shuffled": "shuffled ABCD", "separator": "separator ')'",
                   "no_prelude": "no prelude", "any_letters": "any letters"}
CATEGORY_COLORS = {"correct-letter": "#d62728", "content-gatherer": "#1f77b4", "single-letter": "#ff7f0e",
                   "uniform": "#2ca02c", "amplification": "#9467bd", "other": "#c7c7c7", "mlp": "#8c564b"}


class Artifacts(figures.Artifacts):
    """The Study C artifacts one figure reads (``results/mcq_circuits``), lazily."""

    study = "mcq_circuits"

    @property
    def label_sets(self) -> list[str]:
        return list(self.metrics["label_sets"])


def load(root: str | Path = ".", fig_name: str | None = None, inputs: list[str] | None = None) -> Artifacts:
    """The artifacts of one figure under the workflow directory ``root``; with ``inputs``, reading any
    other file raises :class:`~mechrepro.workflow.figures.UndeclaredInputError`."""
    return Artifacts(root, fig_name, inputs)


def caption(art: Artifacts, n: int | str | None = None, note: str = "") -> str:
    """Model (with its training / quantisation notes), N and a note."""
    m = art.metrics
    parts = [f"Model: {m.get('model_description', m.get('model'))}."]
    if m.get("model") == "mcq-organism":
        parts.append("Not the paper's model (Chinchilla 70B, closed): a small transformer trained by this pipeline "
                     "on synthetic questions.")
    if "Q4_1" in str(m.get("model_description", "")):
        parts.append("Weights are a Q4_1-quantised copy and differ from the original checkpoint.")
    if n is not None:
        parts.append(f"N = {n}.")
    if note:
        parts.append(note)
    return " ".join(parts)


def _trained_sets(art: Artifacts) -> list[str]:
    """The label sets the organism was trained on (none for a pretrained model)."""
    return mcq.seen_label_sets((art.json("organism.json", default={}).get("config") or {}).get("train_label_sets", []))


# ------------------------------------------------------------------------------ accuracy table
def accuracy_data(art: Artifacts) -> pd.DataFrame:
    trained = _trained_sets(art)
    rows = []
    for s in art.label_sets:
        a = art.json(f"accuracy/{s}.json")
        rows.append({"label_set": s, "description": LABEL_SET_NAMES.get(s, s), "accuracy": a["accuracy"],
                     "loss": a["loss"], "ld": a["ld"], "n": a["n"], "seen_in_training": s in trained,
                     **{f"acc_correct_{k}": v for k, v in a["by_correct_position"].items()}})
    return pd.DataFrame(rows)


def training_curve(art: Artifacts) -> pd.DataFrame:
    """The organism's training-time / accuracy curve (``organism.json`` history): one row per
    evaluation and training label set; empty for a pretrained model."""
    rows = []
    for h in art.json("organism.json", default={}).get("history", []):
        by_set = h.get("heldout_accuracy_by_label_set", {"abcd": h["heldout_accuracy"]})
        rows += [{"step": h["step"], "seconds": h.get("seconds"), "label_set": s, "accuracy": a} for s, a in by_set.items()]
    return pd.DataFrame(rows, columns=["step", "seconds", "label_set", "accuracy"])


def plot_accuracy(data: pd.DataFrame, curve: pd.DataFrame | None = None):
    with_curve = curve is not None and not curve.empty
    fig, axes = plt.subplots(1, 3 if with_curve else 2, figsize=(16 if with_curve else 11, 4.2),
                             gridspec_kw={"width_ratios": [1.4, 1, 1] if with_curve else [1.4, 1]})
    ax, ax2 = axes[:2]
    x = np.arange(len(data))
    colors = ["#1f77b4" if s else "#ff7f0e" for s in data.seen_in_training]
    bars = ax.bar(x, data.accuracy, color=colors)
    for b, v in zip(bars, data.accuracy):
        ax.text(b.get_x() + b.get_width() / 2, v + 0.01, f"{v:.2f}", ha="center", fontsize=8)
    ax.axhline(0.25, color="k", ls="--", lw=0.8, label="chance (4 options)")
    ax.set_xticks(x, data.description, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("accuracy (argmax over the options' answer tokens)")
    ax.bar([0], [0], color="#1f77b4", label="label set seen in training")
    ax.bar([0], [0], color="#ff7f0e", label="unseen (mutation)")
    ax.legend(fontsize=7, loc="lower left")
    ax2.bar(x, data.loss, color=colors)
    ax2.axhline(np.log(4), color="k", ls="--", lw=0.8, label="ln 4 (uniform)")
    ax2.set_xticks(x, data.label_set, rotation=30, ha="right", fontsize=8)
    ax2.set_ylabel("loss (cross-entropy over the options)")
    ax2.legend(fontsize=7)
    if with_curve:
        # against the step, not the seconds: a figure must not change with the machine's speed (the
        # seconds of every evaluation are in organism.json's history)
        for s, g in curve.groupby("label_set", sort=False):
            axes[2].plot(g.step, g.accuracy, marker=".", label=LABEL_SET_NAMES.get(s, s))
        axes[2].axhline(0.25, color="k", ls="--", lw=0.8)
        axes[2].set_xlabel("training step (seconds per step: organism.json history)")
        axes[2].set_ylabel("held-out accuracy")
        axes[2].set_ylim(0, 1.05)
        axes[2].set_title("organism training curve", fontsize=9)
        axes[2].legend(fontsize=7)
    suptitle(fig, "Accuracy and loss on normal labels and on each label mutation")
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------ DLA
def dla_data(art: Artifacts) -> pd.DataFrame:
    return art.csv("dla.csv")


def plot_dla(data: pd.DataFrame, summary: dict):
    heads = data[data.kind == "head"]
    mlps = data[data.kind == "mlp"]
    L, H = int(heads.layer.max()) + 1, int(heads["head"].max()) + 1
    grid = np.full((L, H), np.nan)
    for r in heads.itertuples():
        grid[r.layer, r.head] = r.dla
    fig, axes = plt.subplots(1, 3, figsize=(13, max(3.5, 0.5 * L + 2)), gridspec_kw={"width_ratios": [1.2, 1, 1]})
    lim = np.nanmax(np.abs(grid)) or 1.0
    im = axes[0].imshow(grid, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
    for (l, h), v in np.ndenumerate(grid):
        if L * H <= 200:
            axes[0].text(h, l, f"{v:.2f}", ha="center", va="center", fontsize=7)
    axes[0].set_xticks(range(H))
    axes[0].set_yticks(range(L))
    axes[0].set_xlabel("head")
    axes[0].set_ylabel("layer")
    axes[0].set_title("head DLA (logit diff)")
    fig.colorbar(im, ax=axes[0], fraction=0.046)
    axes[1].barh(mlps.layer, mlps.dla, xerr=mlps.dla_sem, color=["#d62728" if v > 0 else "#1f77b4" for v in mlps.dla])
    axes[1].set_yticks(range(L))
    axes[1].invert_yaxis()
    axes[1].set_xlabel("MLP DLA")
    axes[1].set_ylabel("layer")
    axes[1].set_title("MLP DLA")
    share = summary.get("share_by_k", {})
    ks = sorted(int(k) for k in share)
    axes[2].plot(ks, [share[str(k)] if str(k) in share else share[k] for k in ks], marker="o")
    axes[2].set_xlabel("top-k nodes (by |DLA|)")
    axes[2].set_ylabel("share of the summed |DLA|")
    axes[2].set_ylim(0, 1.02)
    axes[2].set_title(f"top-{summary['top_k']} share: {summary['top_k_share_abs']:.2f}")
    suptitle(fig, "Direct logit attribution at the final position")
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------ patching
def patching_data(art: Artifacts) -> pd.DataFrame:
    frame = art.csv("patching.csv")
    heads = art.csv("heads.csv").set_index("node")["category"]
    frame["category"] = [heads.get(n, "mlp") for n in frame.node]
    return frame


def plot_patching(data: pd.DataFrame, summary: dict):
    fig, ax = plt.subplots(figsize=(7.5, 6))
    for cat, g in data.groupby("category"):
        ax.scatter(g.direct_effect, g.total_effect, s=28, label=cat, color=CATEGORY_COLORS.get(cat, "k"),
                   marker="s" if cat == "mlp" else "o")
    top = data.reindex(data.total_effect.abs().sort_values(ascending=False).index[:8])
    for r in top.itertuples():
        ax.annotate(r.node + (" (!)" if r.indirect_flag else ""), (r.direct_effect, r.total_effect), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    lim = max(data.total_effect.abs().max(), data.direct_effect.abs().max()) * 1.1 or 1
    ax.plot([-lim, lim], [-lim, lim], color="0.6", lw=0.8, ls="--", label="total = direct")
    ax.axhline(0, color="0.85", lw=0.6)
    ax.axvline(0, color="0.85", lw=0.6)
    ax.set_xlabel("direct effect on LD (downstream frozen)")
    ax.set_ylabel("total effect on LD (downstream recomputed)")
    ax.legend(fontsize=7)
    suptitle(fig, f"Activation patching from the content-permuted prompt (clean LD {summary['clean_ld']:.2f}, "
                  f"corrupted LD {summary['corrupt_ld']:.2f})")
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------ head categories
def heads_data(art: Artifacts) -> pd.DataFrame:
    return art.csv("heads.csv")


def plot_heads(data: pd.DataFrame, top: int = 8):
    L, H = int(data.layer.max()) + 1, int(data["head"].max()) + 1
    cats = list(CATEGORY_COLORS)
    fig, axes = plt.subplots(1, 2, figsize=(13, max(3.8, 0.5 * L + 2.5)), gridspec_kw={"width_ratios": [1, 1.4]})
    ax = axes[0]
    for r in data.itertuples():
        ax.add_patch(plt.Rectangle((r.head - 0.5, r.layer - 0.5), 1, 1, color=CATEGORY_COLORS[r.category]))
        if L * H <= 200:
            ax.text(r.head, r.layer, f"{r.correct_share:.2f}\n{r.label_att:.2f}", ha="center", va="center", fontsize=6)
    ax.set_xlim(-0.5, H - 0.5)
    ax.set_ylim(L - 0.5, -0.5)
    ax.set_xticks(range(H))
    ax.set_yticks(range(L))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title("category (text: correct-label share / label attention)", fontsize=9)
    for c in cats[:-1]:
        ax.bar([0], [0], color=CATEGORY_COLORS[c], label=c)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0, -0.2), ncol=3)
    letters = [c.removeprefix("dla_") for c in data.columns if c.startswith("dla_")]
    sel = data.reindex(data.dla.abs().sort_values(ascending=False).index[:top])
    x = np.arange(len(sel))
    w = 0.8 / max(1, len(letters))
    for j, lab in enumerate(letters):
        axes[1].bar(x + j * w - 0.4 + w / 2, sel[f"dla_{lab}"], w, label=f"correct = {lab}")
    axes[1].set_xticks(x, [f"{n}\n{c}" for n, c in zip(sel.node, sel.category)], fontsize=7)
    axes[1].axhline(0, color="k", lw=0.6)
    axes[1].set_ylabel("DLA (logit diff)")
    axes[1].set_title(f"top-{len(sel)} heads by |DLA|, split by the correct letter", fontsize=9)
    axes[1].legend(fontsize=7)
    suptitle(fig, "Head categories from the final position's attention")
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------ low rank
def low_rank_data(art: Artifacts) -> pd.DataFrame:
    lr = art.json("low_rank.json")
    rows = []
    for kind, by_rank in lr["by_kind"].items():
        for r, v in by_rank.items():
            rows.append({"kind": kind, "rank": r, "rank_num": lr["d_head"] if r == "full" else int(r), **v})
    return pd.DataFrame(rows)


def plot_low_rank(data: pd.DataFrame, lr: dict, keys: pd.DataFrame):
    fig = plt.figure(figsize=(15, 4.8))
    ax = fig.add_subplot(1, 3, 1)
    for kind, g in data.groupby("kind"):
        g = g.sort_values("rank_num")
        ax.plot(g.rank_num, g.loss, marker="o", label=f"{kind} compressed" if kind != "qkv" else "q, k and v")
    ax.axhline(lr["full"]["loss"], color="k", ls="--", lw=0.8, label="full head")
    ax.axhline(lr["ablated"]["loss"], color="r", ls=":", lw=0.8, label="head mean-ablated")
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"rank r (head dim {lr['d_head']})")
    ax.set_ylabel("loss (cross-entropy over the options)")
    ax.set_title(f"{lr['head']}: loss vs rank", fontsize=9)
    ax.legend(fontsize=7)
    if keys.empty or "pc3" not in keys:
        no_data(fig.add_subplot(1, 3, 2), "fewer than 3 key dimensions")
        return fig
    for i, (col, title) in enumerate((("position", "keys by list position"), ("label", "keys by letter"))):
        ax3 = fig.add_subplot(1, 3, 2 + i, projection="3d")
        vals = sorted(keys[col].astype(str).unique())
        cmap = plt.get_cmap("tab10" if len(vals) <= 10 else "tab20")
        for j, v in enumerate(vals):
            g = keys[keys[col].astype(str) == v]
            ax3.scatter(g.pc1, g.pc2, g.pc3, s=6, color=cmap(j % cmap.N), label=v)
        ax3.set_title(title, fontsize=9)
        ax3.set_xlabel("pc1", fontsize=7)
        ax3.set_ylabel("pc2", fontsize=7)
        ax3.set_zlabel("pc3", fontsize=7)
        ax3.legend(fontsize=6, ncol=2 if len(vals) > 8 else 1, loc="upper left")
    suptitle(fig, f"Low-rank compression of {lr['head']} ({lr['selection']})")
    return fig


# ------------------------------------------------------------------------------ mutations (Fig. 11)
def mutations_data(art: Artifacts) -> pd.DataFrame:
    trained = _trained_sets(art)
    rows = []
    for s in art.label_sets:
        m = art.json(f"mutations/{s}.json")
        for setting in ("full", "low_rank", "ablated"):
            rows.append({"label_set": s, "description": LABEL_SET_NAMES.get(s, s), "setting": setting,
                         "accuracy": m[setting]["accuracy"], "loss": m[setting]["loss"], "ld": m[setting]["ld"],
                         "n": m["n"], "head": m["head"], "rank": m["rank"], "seen_in_training": s in trained})
    return pd.DataFrame(rows)


def mutations_note(art: Artifacts) -> str:
    """Which mutated label sets the low-rank claims count, and why the others do not (``metrics.json``)."""
    m = art.metrics
    kept, excluded = m.get("low_rank_kept") or {}, m.get("low_rank_excluded") or {}
    name = lambda s: LABEL_SET_NAMES.get(s, s)  # noqa: E731
    note = "The low-rank claims count " + (", ".join(name(s) for s in kept) or "no mutated set")
    if excluded:
        note += "; not " + "; ".join(f"{name(s)}: {why}" for s, why in excluded.items())
    return note + "."


def plot_mutations(data: pd.DataFrame):
    sets = list(dict.fromkeys(data.label_set))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    x = np.arange(len(sets))
    names = {"full": "full head", "low_rank": f"low-rank head (r = {data['rank'].iloc[0]})", "ablated": "mean-ablated head"}
    for ax, value in zip(axes, ("accuracy", "loss")):
        for j, setting in enumerate(("full", "low_rank", "ablated")):
            g = data[data.setting == setting].set_index("label_set").reindex(sets)
            ax.bar(x + (j - 1) * 0.27, g[value], 0.27, label=names[setting])
        ax.set_xticks(x, [LABEL_SET_NAMES.get(s, s) + (" *" if data[data.label_set == s].seen_in_training.iloc[0] else "")
                          for s in sets], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(value)
        if value == "accuracy":
            ax.axhline(0.25, color="k", ls="--", lw=0.8)
            ax.set_ylim(0, 1.05)
    # one legend above both panels: inside an axis it hid the tallest bars, under them the caption
    suptitle(fig, f"Label mutations with {data['head'].iloc[0]} full, low-rank or mean-ablated "
                  "(paper Figure 11; * = label set seen in training)")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="upper center", bbox_to_anchor=(0.5, 0.93), ncol=3,
               fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.89))
    return fig
