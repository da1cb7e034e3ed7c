"""Figure helpers for Study B's toy and IOI notebooks (``notebooks/subspace_illusion/*.ipynb``).

The notebooks only read artifacts of ``results/subspace_illusion`` and draw; the code is here:
one ``*_data`` function per figure builds the table of plotted numbers (saved as the figure's
CSV), one ``plot_*`` function draws it, :func:`caption` writes the caption (model description,
N, site). Saving and caption placement reuse :mod:`mechrepro.studies.ioi_generalization.plotting`.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from mechrepro.workflow.artifacts import read_json  # noqa: E402
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


class Artifacts:
    """The Study B artifacts under ``results_dir`` (``results/subspace_illusion``)."""

    def __init__(self, results_dir: str | Path):
        self.root = Path(results_dir)

    def json(self, name: str) -> dict:
        return read_json(self.root / name)

    def csv(self, name: str) -> pd.DataFrame:
        return pd.read_csv(self.root / name)

    @property
    def metrics(self) -> dict:
        return self.json("metrics.json")


def load(results_dir: str | Path) -> Artifacts:
    return Artifacts(results_dir)


def caption(metrics: dict, note: str = "") -> str:
    """Model (its recorded description), the site and N, then ``note``."""
    ioi = metrics.get("ioi", {})
    parts = [f"Model: {metrics.get('model_description') or metrics.get('model', '?')}.",
             f"Site: layer {ioi.get('layer', '?')} ({ioi.get('layer_rule', '?')}), END position; name movers "
             f"{', '.join(f'{l}.{h}' for l, h in ioi.get('name_movers', []))}.",
             f"N = {ioi.get('n_test', '?')} held-out test pairs (template T2), directions learned on "
             f"{ioi.get('n_train', '?')} training pairs (T0–T1; names, places and objects disjoint)."]
    if note:
        parts.append(note.strip())
    return " ".join(parts)


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


def _published(reference_file: str | Path) -> dict[str, dict[str, tuple[float, str]]]:
    """``{row: {"fldd" | "interchange_acc": (value, "P" | "R")}}`` from ``reference/published.yaml``."""
    path = Path(reference_file)
    if not path.is_file():
        return {}
    entry = (yaml.safe_load(path.read_text()) or {}).get("study_b", {})
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


def table1_data(art: Artifacts, reference_file: str | Path) -> pd.DataFrame:
    """Table 1: our FLDD and interchange accuracy per row (with bootstrap 95% intervals over the test
    pairs) beside the published numbers ([P] paper, [R] authors' repository)."""
    metrics = art.metrics
    table = metrics.get("ioi_table1", {})
    pairs = art.csv("ioi_pairs.csv")
    pub = _published(reference_file)
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
