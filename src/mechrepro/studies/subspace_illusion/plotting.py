"""Figure helpers for Study B's notebooks (``notebooks/subspace_illusion/*.ipynb``).

The notebooks only read their declared artifacts and draw; the code is here: :func:`load` gives
the figure's :class:`Artifacts` (read lazily), one ``*_data`` function per figure builds the table
of plotted numbers (saved as the figure's CSV), one ``plot_*`` function draws it, and
:func:`caption` writes the caption of each of the study's three parts: the Section 3 toy network
(its weights), the IOI part (model description, site, N) and the factual-recall part (model, N).

The factual-recall figures draw the paper's curves from ``reference/published.yaml`` (entry
``study_b_facts``) against relative depth (layer / number of layers, from the model's manifest),
since the default model has 30 layers and GPT2-XL 48.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from mechrepro.studies.subspace_illusion import FACTS_FIGURES  # noqa: E402
from mechrepro.workflow import figures  # noqa: E402
from mechrepro.workflow.figures import add_caption, fmt_num, no_data, save, suptitle  # noqa: E402,F401

ROW_ORDER = ("full_mlp", "v_mlp", "v_mlp_row", "v_mlp_null", "full_resid", "v_resid", "v_resid_row", "v_resid_null",
             "v_grad", "v_mean")
ROW_LABELS = {"full_mlp": "full MLP", "v_mlp": "v_MLP (DAS)", "v_mlp_row": "v_MLP rowspace part",
              "v_mlp_null": "v_MLP nullspace part", "full_resid": "full residual", "v_resid": "v_resid (DAS)",
              "v_resid_row": "v_resid rowspace part", "v_resid_null": "v_resid nullspace part",
              "v_grad": "v_grad (name-mover gradient)", "v_mean": "v_mean (ABB − BAB means)"}
SITE_COLORS = {"mlp": "#c44e52", "resid": "#3b6fb6"}
ORDER_COLORS = {"ABB": "#3b6fb6", "BAB": "#e1812c"}
TOY_LABELS = {"full": "all units\n(full patch)", "e3": "e3\n(faithful unit)", "v": "v ∝ e1 + e2",
              "v_null": "v_null (∝ e1)", "v_row": "v_row (∝ e2)"}
PROJECTION_PANELS = (("v_resid", "residual · v_resid (DAS)"), ("v_grad", "residual · v_grad"),
                     ("v_mean", "residual · v_mean"), ("v_mlp", "MLP hidden · v_MLP (DAS)"),
                     ("v_mlp_null", "MLP hidden · v_MLP nullspace part"),
                     ("v_mlp_row", "MLP hidden · v_MLP rowspace part"))
DORMANT_CONDITIONS = (("clean", "clean (no patch)"), ("full_mlp", "full-MLP patch"), ("v_mlp", "v_MLP patch"),
                      ("v_mlp_row", "v_MLP rowspace-part patch"), ("v_mlp_null", "v_MLP nullspace-part patch"))
DORMANT_COLORS = {"clean": "0.55", "full_mlp": "#55a868", "v_mlp": "#c44e52", "v_mlp_row": "#8172b2",
                  "v_mlp_null": "#ccb974"}
PAPER = "Makelov, Lange & Nanda 2023"


# --------------------------------------------------------------------------------------------
# Loading and captions


class Artifacts(figures.Artifacts):
    """The Study B artifacts one figure reads (``results/subspace_illusion``), lazily; the facts
    figures also read the dataset, a summary, the model's manifest and the paper's curves."""

    study = "subspace_illusion"

    @cached_property
    def dataset(self) -> dict:
        """The facts dataset (``facts/data.json``): model, description, facts and pairs."""
        return self.json("facts/data.json")

    @cached_property
    def facts(self) -> dict:
        """Per layer: the 1-D patching summary (``facts.json``)."""
        return self.json("facts.json")["facts"]

    @cached_property
    def rome(self) -> dict:
        """Per layer: the ROME summary (``rome.json``)."""
        return self.json("rome.json")["rome"]

    def layer_csv(self, kind: str, layer: str) -> pd.DataFrame:
        return self.csv(f"{kind}/layer{layer}.csv")

    @cached_property
    def model_manifest(self) -> dict:
        """The manifest of the facts dataset's model (empty when missing)."""
        return self.manifest(self.dataset.get("model", "?"), default={})

    @property
    def n_layers(self) -> int:
        """Layers of the facts dataset's model (0 when its manifest is missing)."""
        return self.model_manifest.get("spec", {}).get("n_layers") or 0

    @property
    def description(self) -> str:
        """The model's recorded description."""
        data = self.dataset
        return self.model_manifest.get("description", data.get("model_description", data.get("model", "?")))

    @property
    def published(self) -> dict:
        """The paper's factual-recall numbers (``reference/published.yaml``, entry ``study_b_facts``)."""
        return self.reference("study_b_facts")


def load(root: str | Path = ".", fig_name: str | None = None, inputs: list[str] | None = None) -> Artifacts:
    """The artifacts of one figure under the workflow directory ``root``; with ``inputs``, reading any
    other file raises :class:`~mechrepro.workflow.figures.UndeclaredInputError`."""
    return Artifacts(root, fig_name, inputs)


def caption(art: Artifacts, n: int | str | None = None, note: str = "") -> str:
    """The caption of the figure ``art.figure``: the toy network's weights, or the IOI part's model,
    site and N, or the factual-recall part's model and N (``n``: overrides the default N text);
    then ``note``."""
    if art.figure == "toy_example":
        text = toy_caption(art.json("toy.json")["toy"])
    elif art.figure in FACTS_FIGURES:
        text = facts_caption(art, n)
    else:
        text = ioi_caption(art.metrics, n)
    return text + (" " + note.strip() if note else "")


def ioi_caption(metrics: dict, n: int | str | None = None) -> str:
    """Model (its recorded description), the site and N."""
    ioi = metrics.get("ioi", {})
    n_text = (f"N = {ioi.get('n_test', '?')} held-out test pairs (template T2), directions learned on "
              f"{ioi.get('n_train', '?')} training pairs (T0–T1; names, places and objects disjoint)."
              if n is None else f"N = {n}.")
    return " ".join([f"Model: {metrics.get('model_description') or metrics.get('model', '?')}.",
                     f"Site: layer {ioi.get('layer', '?')} ({ioi.get('layer_rule', '?')}), END position; name movers "
                     f"{', '.join(f'{l}.{h}' for l, h in ioi.get('name_movers', []))}.", n_text])


# --------------------------------------------------------------------------------------------
# Toy example (Section 3)


def toy_data(art: Artifacts) -> pd.DataFrame:
    """One row per patch: output change and the patched hidden state (h1, h2, h3)."""
    toy = art.json("toy.json")["toy"]
    rows = [{"patch": "full", "effect": toy["full"], "h1": toy["h_src"][0], "h2": toy["h_src"][1],
             "h3": toy["h_src"][2]}]
    for key in ("e3", "v", "v_null", "v_row"):
        h = toy["h_patched"][key]
        rows.append({"patch": key, "effect": toy[key], "h1": h[0], "h2": h[1], "h3": h[2]})
    frame = pd.DataFrame(rows)
    frame["y_base"], frame["y_src"] = toy["y_base"], toy["y_src"]
    return frame


def plot_toy(data: pd.DataFrame, toy: dict):
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [1.25, 1]},
                                  layout="constrained")
    colors = ["0.55", "#55a868", "#c44e52", "#ccb974", "#8172b2"]
    bars = ax.bar([TOY_LABELS[p] for p in data.patch], data.effect, color=colors[:len(data)])
    for b, v in zip(bars, data.effect):
        ax.annotate(f"{v:+.3g}" if abs(v) > 1e-9 else "0", (b.get_x() + b.get_width() / 2, v),
                    xytext=(0, -3 if v < 0 else 3), textcoords="offset points", ha="center",
                    va="top" if v < 0 else "bottom", fontsize=9)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_ylabel("output change  y(patched) − y(base)")
    ax.set_title("Patching from x = −1 into x = +1")
    lo = min(data.effect.min(), 0)
    ax.set_ylim(lo * 1.25 - 0.1, max(data.effect.max(), 0) + 0.4)
    # the (h1, h2) plane: where the patches move the hidden state
    hb, hs = toy["h_base"], toy["h_src"]
    ax2.scatter([hb[0]], [hb[1]], s=70, color="#3b6fb6", zorder=3, label="base h (x = +1)")
    ax2.scatter([hs[0]], [hs[1]], s=70, color="#e1812c", zorder=3, label="source h (x = −1)")
    hv = toy["h_patched"]["v"]
    ax2.scatter([hv[0]], [hv[1]], s=90, marker="*", color="#c44e52", zorder=3, label="after the v patch")
    ax2.annotate("", xy=(hv[0], hv[1]), xytext=(hb[0], hb[1]),
                 arrowprops=dict(arrowstyle="->", color="#c44e52", lw=1.4))
    offsets = {"v": (0.06, 0.04), "v_null": (-0.05, -0.2), "v_row": (0.06, 0.0)}
    for key, color in (("v", "#c44e52"), ("v_null", "#ccb974"), ("v_row", "#8172b2")):
        d = np.array(toy["directions"][key])
        ax2.annotate("", xy=(d[0], d[1]), xytext=(0, 0), arrowprops=dict(arrowstyle="->", color=color, lw=2))
        ax2.text(d[0] + offsets[key][0], d[1] + offsets[key][1], key, color=color, fontsize=10)
    w = toy["weights"]["readout_w"]
    ax2.set_xlabel(f"h1 (tracks x; output weight {w[0]:g}: kernel of W_out)")
    ax2.set_ylabel(f"h2 (0 on the data; output weight {w[1]:g})")
    ax2.set_xlim(-1.5, 1.5)
    ax2.set_ylim(-1.5, 1.5)
    ax2.axhline(0, color="0.8", lw=0.8)
    ax2.axvline(0, color="0.8", lw=0.8)
    ax2.set_aspect("equal")
    ax2.set_title(f"Hidden units h1, h2 (h3 = x: faithful unit, weight {w[2]:g})")
    ax2.legend(loc="lower left", fontsize=8, frameon=False)
    suptitle(fig, "Toy example: patching the faithful unit e3 vs a 1-D patch along v ∝ e1 + e2 and its two parts")
    return fig


def toy_caption(toy: dict) -> str:
    w = toy["weights"]
    return (f"Linear network of {PAPER}, Section 3: h = x·w_in with w_in = {w['w_in']}, output y = h @ W_out @ r "
            f"with W_out = {w['W_out']} and r = {w['r']}, so y = w·h with w = {w['readout_w']}. Patches from "
            f"x_src = {toy['x_src']:g} into x_base = {toy['x_base']:g} (y_base = {toy['y_base']:g}, "
            f"y_src = {toy['y_src']:g}), a' = a_base + (vᵀa_src − vᵀa_base)/‖v‖² · v. v_row / v_null: the parts of v in "
            f"the row space / kernel of W_out (‖v_null‖ = {toy['v_null_norm']:.3f}), each re-normalised. Every number "
            "is computed by mechrepro.core.subspace, not asserted; no language model is involved.")


# --------------------------------------------------------------------------------------------
# Table 1


def _published(art: Artifacts) -> dict[str, dict[str, tuple[float, str]]]:
    """``{row: {"fldd" | "interchange_acc": (value, "P" | "R")}}`` from ``reference/published.yaml``."""
    entry = art.reference("study_b")
    out: dict[str, dict[str, tuple[float, str]]] = {}
    for n in entry.get("numbers", []):
        parts = n["ours"].split(".")
        if parts[0] == "ioi_table1" and len(parts) == 3:
            kind = "P" if n.get("source", "").startswith("[P]") else "R"
            out.setdefault(parts[1], {})[parts[2]] = (float(n["value"]), kind)
    return out


def _bootstrap(frame: pd.DataFrame, row: str, n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float, float]:
    """95% percentile bootstrap intervals over test pairs of FLDD and interchange accuracy."""
    rng = np.random.default_rng(seed)
    clean, ld, hit = (frame[c].to_numpy(float) for c in ("clean_ld", f"ld_{row}", f"hit_{row}"))
    idx = rng.integers(0, len(frame), size=(n_boot, len(frame)))
    fl = 100 * (1 - ld[idx].mean(1) / clean[idx].mean(1))
    acc = hit[idx].mean(1)
    return (*np.percentile(fl, [2.5, 97.5]), *np.percentile(acc, [2.5, 97.5]))


def table1_data(art: Artifacts) -> pd.DataFrame:
    """Table 1: our FLDD and interchange accuracy per row (with bootstrap 95% intervals over the test
    pairs) beside the published numbers ([P] paper, [R] authors' repository)."""
    metrics = art.metrics
    table = metrics.get("ioi_table1", {})
    pairs = art.csv("ioi_pairs.csv")
    pub = _published(art)
    rows = []
    for row in ROW_ORDER:
        if row not in table:
            continue
        lo, hi, alo, ahi = _bootstrap(pairs, row)
        p = pub.get(row, {})
        rows.append({"row": row, "label": ROW_LABELS[row], "site": "mlp" if "mlp" in row else "resid",
                     "fldd": table[row]["fldd"], "fldd_lo": lo, "fldd_hi": hi,
                     "interchange_acc": table[row]["interchange_acc"], "acc_lo": alo, "acc_hi": ahi,
                     "published_fldd": p.get("fldd", (np.nan, ""))[0], "published_fldd_kind": p.get("fldd", (0, ""))[1],
                     "published_acc": p.get("interchange_acc", (np.nan, ""))[0],
                     "published_acc_kind": p.get("interchange_acc", (0, ""))[1]})
    return pd.DataFrame(rows)


def plot_table1(data: pd.DataFrame, metrics: dict):
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), sharey=True, layout="constrained")
    y = np.arange(len(data))[::-1]
    for ax, col, lo, hi, pcol, kcol, scale, xlabel in (
            (axes[0], "fldd", "fldd_lo", "fldd_hi", "published_fldd", "published_fldd_kind", 1.0,
             "FLDD (%): 100 = IO preference erased, > 100 = flipped"),
            (axes[1], "interchange_acc", "acc_lo", "acc_hi", "published_acc", "published_acc_kind", 100.0,
             "interchange accuracy (%): top token = base S name")):
        vals = data[col].to_numpy(float) * scale
        err = np.abs(np.vstack([data[lo].to_numpy(float) * scale, data[hi].to_numpy(float) * scale]) - vals)
        colors = [SITE_COLORS[s] for s in data.site]
        ax.barh(y, vals, xerr=err, color=colors, alpha=0.85, height=0.65, capsize=2, label="ours (95% bootstrap CI)")
        tops = data[hi].to_numpy(float) * scale
        for yi, v, top in zip(y, vals, tops):
            x = np.nanmax([v, top, 0.0]) if np.isfinite(v) else 0.0
            ax.annotate(f"{v:.1f}", (x, yi), xytext=(4, 0), textcoords="offset points", va="center", fontsize=8)
        for kind, marker, face in (("P", "D", "black"), ("R", "o", "none")):
            sel = (data[kcol] == kind).to_numpy() & np.isfinite(data[pcol].to_numpy(float))
            if sel.any():
                ax.scatter(data[pcol].to_numpy(float)[sel] * scale, y[sel], marker=marker, s=32, facecolors=face,
                           edgecolors="black", zorder=4,
                           label="paper [P] (GPT-2 small, layer 8)" if kind == "P" else "authors' repository [R]")
        ax.axvline(0, color="black", lw=0.8)
        if col == "fldd":
            ax.axvline(100, color="0.5", lw=0.8, ls="--")
        ax.set_xlabel(xlabel)
    axes[0].set_yticks(y, data.label)
    axes[1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, fontsize=8)
    ioi = metrics.get("ioi", {})
    suptitle(fig, f"Table 1 — 1-D subspace patches vs full patches at layer {ioi.get('layer', '?')} "
                  f"(red: MLP hidden, blue: residual stream)")
    return fig


def table1_note(metrics: dict) -> str:
    ioi = metrics.get("ioi", {})
    nn, rn = ioi.get("null_norm", {}), ioi.get("random_null_norm", {})
    cos = ioi.get("cos", {})
    model = metrics.get("model", "?")
    same = "the same model as the paper" if model == "gpt2" else f"{model}, not the paper's GPT-2 small"
    return (f"Clean run: mean LD {ioi.get('clean_ld', float('nan')):.2f}, accuracy {ioi.get('clean_acc', float('nan')):.3f}. "
            f"FLDD = 100·(1 − mean LD_patched / mean LD_clean) with LD = logit(IO) − logit(S); interchange accuracy = "
            f"share of pairs whose top token over the whole vocabulary is the base prompt's S name. Rowspace: MLP — the "
            f"row space of the out (down) projection ({ioi.get('rowspace_dim', {}).get('mlp', '?')} of "
            f"{ioi.get('dim', {}).get('mlp', '?')} dims); residual — the span of the name movers' query weights "
            f"({ioi.get('rowspace_dim', {}).get('resid', '?')} of {ioi.get('dim', {}).get('resid', '?')} dims). "
            f"Nullspace norm ‖v_null‖/‖v‖: v_MLP {nn.get('v_mlp', float('nan')):.2f} (random "
            f"{rn.get('mlp', float('nan')):.2f}), v_resid {nn.get('v_resid', float('nan')):.2f} (random "
            f"{rn.get('resid', float('nan')):.2f}). |cos(v_resid, v_grad)| = {cos.get('v_resid_v_grad', float('nan')):.2f}. "
            f"Markers: published numbers, measured on GPT-2 small — ours come from {same}.")


# --------------------------------------------------------------------------------------------
# Histograms


def projections_data(art: Artifacts) -> pd.DataFrame:
    frame = art.csv("ioi_projections.csv")
    return frame[frame.direction.isin([d for d, _ in PROJECTION_PANELS])].reset_index(drop=True)


def _hist(ax, groups: list[tuple[str, np.ndarray, str]], bins: int = 40) -> None:
    allv = np.concatenate([v for _, v, _ in groups if len(v)]) if groups else np.array([])
    if not len(allv) or not np.isfinite(allv).any():
        no_data(ax)
        return
    lo, hi = np.nanmin(allv), np.nanmax(allv)
    if hi - lo < 1e-9 * max(1.0, abs(hi)):
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    for label, v, color in groups:
        ax.hist(v, bins=edges, alpha=0.55, color=color, label=label)


def plot_projections(data: pd.DataFrame):
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.4), layout="constrained")
    for ax, (direction, title) in zip(axes.flat, PROJECTION_PANELS):
        sub = data[data.direction == direction]
        groups = [(f"{o} base prompts", sub[sub.order == o].value.to_numpy(float), ORDER_COLORS[o])
                  for o in ("ABB", "BAB")]
        _hist(ax, groups)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("projection at END")
    axes[0, 0].set_ylabel("test pairs")
    axes[1, 0].set_ylabel("test pairs")
    axes[0, 0].legend(frameon=False, fontsize=8, loc="upper center")
    suptitle(fig, "Clean activations at the site projected on each direction, by name order "
                  "(ABB: IO first; BAB: subject first)")
    return fig


PROJECTIONS_NOTE = ("A direction that carries the name-position feature separates ABB from BAB. In the paper's account "
                    "of the illusion, the nullspace part of v_MLP separates the two orders (but the out projection "
                    "ignores it) while its rowspace part hardly varies (a dormant direction); the bottom panels show "
                    "what this model does.")


def dormant_data(art: Artifacts) -> pd.DataFrame:
    return art.csv("ioi_dormant.csv")


def plot_dormant(data: pd.DataFrame):
    """One histogram row per condition, on a shared x axis (ABB and BAB prompts together)."""
    conds = [(c, label) for c, label in DORMANT_CONDITIONS if (data.condition == c).any()]
    fig, axes = plt.subplots(max(1, len(conds)), 1, figsize=(9, 1.15 * max(1, len(conds)) + 1.6), sharex=True,
                             layout="constrained", squeeze=False)
    axes = axes[:, 0]
    allv = data.value.to_numpy(float)
    finite = allv[np.isfinite(allv)]
    lo, hi = (finite.min(), finite.max()) if len(finite) else (-1.0, 1.0)
    if hi - lo < 1e-9 * max(1.0, abs(hi)):
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, 61)
    clean = data[data.condition == "clean"].value.to_numpy(float)
    for ax, (c, label) in zip(axes, conds):
        v = data[data.condition == c].value.to_numpy(float)
        ax.hist(v, bins=edges, color=DORMANT_COLORS[c], alpha=0.85)
        if len(clean) and c != "clean":
            ax.axvspan(np.nanmin(clean), np.nanmax(clean), color="0.85", zorder=0)
        ax.set_ylabel("pairs", fontsize=8)
        ax.text(0.01, 0.92, f"{label}: mean {fmt_num(float(np.nanmean(v)))}", transform=ax.transAxes, va="top",
                fontsize=9)
    axes[-1].set_xlabel("MLP output at END projected on v_grad (grey band: range of the clean values)")
    suptitle(fig, "Dormant pathway: the MLP output at END projected on v_grad, clean and after each MLP patch")
    return fig


def dormant_summary(data: pd.DataFrame) -> pd.DataFrame:
    """Mean, standard deviation, min and max of the projection per condition."""
    return data.groupby("condition", sort=False).value.agg(["mean", "std", "min", "max"]).reset_index()


DORMANT_NOTE = ("Clean: the MLP output of the base prompts; full-MLP patch: the source prompts' MLP output; v_MLP "
                "patch: the base MLP hidden activation with its v_MLP component taken from the source (and the same "
                "with the rowspace and nullspace parts). v_grad: the normalised mean gradient of the name movers' "
                "attention-score difference END→N1 − END→N2 w.r.t. the residual at the site.")


# --------------------------------------------------------------------------------------------
# Factual recall and fact editing (Section 6)

PAPER_LAYERS = 48  # GPT2-XL, the paper's model for this part


def paper_curve(art: Artifacts, prefix: str, field: str) -> pd.DataFrame:
    """The paper's per-layer values (the numbers ``{prefix}.{layer}.{field}`` keyed by a GPT2-XL
    ``layer``) with their relative depth."""
    rows = [{"layer": int(n["layer"]), "depth": int(n["layer"]) / PAPER_LAYERS, "value": n["value"]}
            for n in art.published.get("numbers", []) if "layer" in n and n["ours"] == f"{prefix}.{{layer}}.{field}"]
    return pd.DataFrame(rows, columns=["layer", "depth", "value"])


def _depth(art: Artifacts, layer) -> float:
    return int(layer) / art.n_layers if art.n_layers else float("nan")


def facts_caption(art: Artifacts, n: int | str | None = None) -> str:
    """Model (its recorded description, with the SmolLM2 quantisation note) and N."""
    data, description = art.dataset, art.description
    text = f"Model: {description}. N = {'?' if n is None else n}."
    if "smollm2" in str(data.get("model", "")) and "Q4_1" not in description:
        text += " SmolLM2 is the Q4_1-quantised GGUF copy, dequantised: its weights differ from the original checkpoint."
    if not data.get("require_correct", True):
        text += " Facts were NOT filtered by the model's answers (facts.require_correct: false, a test setting)."
    return text


def facts_n(data: pd.DataFrame, what: str) -> str:
    """N of a facts figure: the largest number of pairs of a layer, e.g. '6 fact pairs per layer'."""
    return f"{int(data.n_pairs.max()) if len(data) else 0} {what}"


# ------------------------------------------------------------------ facts: flip fractions
FLIP_KINDS = {"flip_frac_1d": "1-D patch (learned v)", "flip_frac_full_mlp": "full MLP key patch",
              "flip_frac_row": "row-space part of v", "flip_frac_null": "null-space part of v",
              "flip_frac_rank1_edit": "rank-1 edit equivalent to the 1-D patch"}


def flips_data(art: Artifacts) -> pd.DataFrame:
    rows = [{"layer": int(l), "depth": _depth(art, l), "n_pairs": s["n_pairs"],
             **{k: s[k] for k in FLIP_KINDS}, "rank1_agrees_1d": s["rank1_agrees_1d"],
             "ld_rel_1d": s["ld_rel_1d"], "ld_rel_full_mlp": s["ld_rel_full_mlp"]}
            for l, s in art.facts.items()]
    return pd.DataFrame(rows).sort_values("layer").reset_index(drop=True)


def plot_flips(data: pd.DataFrame, art: Artifacts):
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
    return fig


def flips_note(data: pd.DataFrame) -> str:
    return ("Flipped: after the intervention at the subject's last token, logit(source object) > logit(base "
            "object). The rank-1 edit agrees with the 1-D patch on a mean fraction of "
            f"{data.rank1_agrees_1d.mean():.3f} of pairs.")


# ------------------------------------------------------------------ facts: null-space norm
def null_norm_data(art: Artifacts) -> pd.DataFrame:
    rows = []
    for l, s in art.facts.items():
        frame = art.layer_csv("facts", l)
        rows.append({"layer": int(l), "depth": _depth(art, l), "n_pairs": len(frame),
                     "null_norm_mean": float(frame.null_norm.mean()), "null_norm_std": float(frame.null_norm.std()),
                     "null_norm_min": float(frame.null_norm.min()), "null_norm_max": float(frame.null_norm.max()),
                     "random_null_norm": s["random_null_norm"]})
    return pd.DataFrame(rows).sort_values("layer").reset_index(drop=True)


def plot_null_norm(data: pd.DataFrame):
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
    return fig


NULL_NORM_NOTE = ("v = v_row + v_null against the row space of W_out (the down projection). The paper reports "
                  "0.45-0.6 for GPT2-XL, where a random direction gives 0.87.")


# ------------------------------------------------------------------ ROME vs derived subspace intervention
ROME_KINDS = {"rome": "ROME edit", "derived_subspace": "derived subspace intervention", "row_only": "its row-space part",
              "rome_delta_only": "ROME's delta at the subject token only"}


def rome_data(art: Artifacts) -> pd.DataFrame:
    rows = []
    for l, s in art.rome.items():
        frame = art.layer_csv("rome", l)
        rows.append({"layer": int(l), "depth": _depth(art, l), "n_pairs": s["n_pairs"],
                     **{k: s[k] for k in ROME_KINDS}, **{f"{k}_sem": float(frame[k].sem()) for k in ROME_KINDS},
                     "pearson": s["pearson"], "exact_frac": s["exact_frac"]})
    return pd.DataFrame(rows).sort_values("layer").reset_index(drop=True)


def plot_rome(data: pd.DataFrame, art: Artifacts):
    fig, ax = plt.subplots(figsize=(8, 4.6))
    for (key, label), c in zip(ROME_KINDS.items(), ("C3", "C0", "C2", "C1")):
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
    return fig


ROME_NOTE = ("Rewrite score (p_after - p_before) / (1 - p_before) of the new object (Hase et al. 2023); error bars: "
             "standard error over edits; r: Pearson correlation of the ROME and derived scores over the edits. "
             "'delta at the subject token only': the optimised value change added at the subject alone, without "
             "the weight edit's changes at the prompt's other tokens.")
