"""Figure helpers for the Study A notebooks (``notebooks/ioi_generalization/*.ipynb``).

The notebooks only read artifacts and draw; everything longer than a few lines lives here:

* :func:`load` — the artifacts one figure reads (:class:`Artifacts`, lazily, checked against the
  figure's declared inputs; missing per-variant files give empty tables, so a figure can still be
  drawn with a "no data" panel);
* :func:`caption` / :func:`add_caption` — the caption under every figure: model (its recorded
  description), N, circuit and ablation choices;
* one ``*_data`` function per figure that builds the tidy table of plotted numbers, and one
  ``plot_*`` function that draws it;
* :func:`save` — writes ``{figures_dir}/{fig_name}.png`` and ``.csv`` atomically.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib import patheffects  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from mechrepro.workflow import figures  # noqa: E402
from mechrepro.workflow.figures import add_caption, fmt_num, no_data, save, sem, suptitle  # noqa: E402,F401

VARIANTS = ("base", "double_io", "triple_io")
VARIANT_LABELS = {"base": "Base IOI", "double_io": "DoubleIO", "triple_io": "TripleIO"}
CLASSES = ("name_mover", "backup_name_mover", "negative_name_mover", "s_inhibition", "induction",
           "duplicate_token", "previous_token")
CLASS_SHORT = {"name_mover": "NM", "backup_name_mover": "bNM", "negative_name_mover": "nNM",
               "s_inhibition": "SI", "induction": "Ind", "duplicate_token": "Dup", "previous_token": "Prev"}
CLASS_LABELS = {"name_mover": "name mover", "backup_name_mover": "backup name mover",
                "negative_name_mover": "negative name mover", "s_inhibition": "S-inhibition",
                "induction": "induction", "duplicate_token": "duplicate token", "previous_token": "previous token"}
CLASS_KEY = ", ".join(f"{CLASS_SHORT[c]} = {CLASS_LABELS[c]}" for c in CLASSES)
RUN_COLORS = {"model": "#3b6fb6", "circuit": "#e1812c"}
RUN_LABELS = {"model": "full model", "circuit": "circuit"}
ORDER_LABELS = {"ABBA": "IO first (ABBA)", "BABA": "S first (BABA)"}
RESTORE_ORDER = ("s2_only", "io2_only", "io3_only", "s2_io2", "s2_io2_io3", "all")
RESTORE_LABELS = {"s2_only": "S2 only\n(base circuit)", "io2_only": "IO2 only", "io3_only": "IO3 only",
                  "s2_io2": "S2 + IO2", "s2_io2_io3": "S2 + IO2\n+ IO3", "all": "all tokens"}
DISCOVERY_STEPS = {
    "logits": "1. head → logits at END",
    "backup": "2. growth of 1 with the\nname movers knocked out",
    "name_mover_queries": "3. head → (backup) name-mover\nqueries at END",
    "s_inhibition_values": "4. head → S-inhibition values\n(best position)",
    "induction_keys": "5. head → induction keys\n(best position)",
}
VALUE_PATH_GROUPS = (("base", "S2"), ("double_io", "S2"), ("double_io", "IO2"))
VALUE_PATH_COLORS = {("base", "S2"): "#7f7f7f", ("double_io", "S2"): "#3b6fb6", ("double_io", "IO2"): "#c44e52",
                     ("triple_io", "S2"): "#55a868"}

ATTENTION_COLUMNS = ["prompt", "order", "head", "layer", "head_index", "class", "run", "attn_correct",
                     "attn_incorrect"]
PROMPT_COLUMNS = ["prompt", "order", "template", "model_ld", "circuit_ld", "model_correct", "model_p_io",
                  "circuit_correct"]
SCORE_COLUMNS = ["step", "layer", "head", "role", "effect", "effect_other", "attribution", "effect_knocked_out",
                 "effect_clean"]
CURVE_COLUMNS = ["step", "node", "class", "size", "faithfulness", "gain", "admitted", "stage"]
MECHANISM_RUN_COLUMNS = ["run", "draw", "heads", "ld", "variant"]
VALUE_PATH_COLUMNS = ["variant", "source", "layer", "head", "class", "attribution_pct", "effect_pct"]



# --------------------------------------------------------------------------------------------
# Loading


class Artifacts(figures.Artifacts):
    """The Study A artifacts one figure reads (``results/ioi_generalization``); missing per-variant
    files give empty tables."""

    study = "ioi_generalization"

    @property
    def variants(self) -> list[str]:
        """Variants with metrics, in the paper's order."""
        have = self.metrics.get("variants", {})
        return [v for v in VARIANTS if v in have] + [v for v in have if v not in VARIANTS]

    def circuit(self) -> dict:
        if self.exists("circuit.json"):
            return self.json("circuit.json")
        return {"classes": self.metrics.get("circuit", {}).get("classes", {})}

    def eval(self, variant: str) -> dict:
        return self.json(f"eval/{variant}.json", default={})

    def attention(self, variant: str) -> pd.DataFrame:
        return self.csv(f"eval/{variant}_attention.csv", ATTENTION_COLUMNS)

    def prompts(self, variant: str) -> pd.DataFrame:
        return self.csv(f"eval/{variant}_prompts.csv", PROMPT_COLUMNS)

    def scores(self) -> pd.DataFrame:
        return self.csv("circuit_scores.csv", SCORE_COLUMNS)

    def value_paths(self) -> pd.DataFrame:
        return self.csv("value_paths.csv", VALUE_PATH_COLUMNS)

    def head_classes(self) -> dict[tuple[int, int], list[str]]:
        """(layer, head) -> every class the head is listed in (in :data:`CLASSES` order)."""
        out: dict[tuple[int, int], list[str]] = {}
        classes = self.metrics.get("circuit", {}).get("classes") or self.circuit().get("classes", {})
        for cls in CLASSES:
            for l, h in classes.get(cls, []):
                out.setdefault((int(l), int(h)), []).append(cls)
        return out


def load(root: str | Path = ".", fig_name: str | None = None, inputs: list[str] | None = None) -> Artifacts:
    """The artifacts of one figure under the workflow directory ``root``; with ``inputs``, reading any
    other file raises :class:`~mechrepro.workflow.figures.UndeclaredInputError`."""
    return Artifacts(root, fig_name, inputs)


# --------------------------------------------------------------------------------------------
# Captions, empty panels, saving


def describe_ablation(ablation: dict | None) -> str:
    """Human-readable ablation choice, e.g. 'mean ablation over ABC prompts per template'."""
    ablation = ablation or {}
    kind, ref = ablation.get("kind", "?"), ablation.get("reference", "?")
    refs = {"abc_per_template": "over ABC prompts per template (each variant's own ABC prompts)"}
    return f"{kind} ablation of every head and position outside the circuit, means {refs.get(ref, ref)}"


def describe_circuit(metrics: dict) -> str:
    circ = metrics.get("circuit", {})
    method = metrics.get("circuit_method", "?")
    how = {"attribution": "path patching, senders ranked by attribution patching and the top ones confirmed exactly",
           "exact": "exact path patching of every sender"}.get(method)
    return (f"{circ.get('n_heads', '?')}-head circuit, {circ.get('source', '?')} (method: {method}"
            + (f"; {how})" if how else ")"))


def caption(art: Artifacts, n: int | str | None = None, note: str = "", *, circuit: bool = True) -> str:
    """Caption text: model description, N (default: the prompts per variant), and (for circuit figures,
    ``circuit=True``) circuit method and ablation, then ``note``."""
    metrics = art.metrics
    n_text = f"N = {metrics.get('n_prompts', '?')} prompts per variant (ABBA/BABA balanced)" if n is None \
        else f"N = {n}"
    parts = [f"Model: {metrics.get('model_description') or metrics.get('model', '?')}.", f"{n_text}."]
    if circuit:
        parts.append(f"Circuit: {describe_circuit(metrics)}.")
        parts.append(f"Ablation: {describe_ablation(metrics.get('ablation'))}.")
    if note:
        parts.append(note.strip())
    return " ".join(parts)


def _head_label(layer: int, head: int, classes: list[str] | str | None) -> str:
    if isinstance(classes, str):
        classes = [classes] if classes else []
    short = "/".join(CLASS_SHORT.get(c, c) for c in classes or [])
    return f"{layer}.{head}" + (f"\n{short}" if short else "")


def _class_rank(cls: str) -> int:
    return CLASSES.index(cls) if cls in CLASSES else len(CLASSES)


def _bar_labels(ax, bars, values, errors=None, fontsize=8):
    errors = [0.0] * len(values) if errors is None else [0.0 if not np.isfinite(e) else e for e in errors]
    for b, v, e in zip(bars, values, errors):
        if v is None or not np.isfinite(v):
            continue
        y = v + e if v >= 0 else v - e
        ax.annotate(fmt_num(v), (b.get_x() + b.get_width() / 2, y), xytext=(0, 2 if v >= 0 else -2),
                    textcoords="offset points", ha="center", va="bottom" if v >= 0 else "top", fontsize=fontsize)


def _fig_legend(fig, ax) -> None:
    """One legend for the figure, right of the axes (outside the data)."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside right upper", frameon=False)


# --------------------------------------------------------------------------------------------
# Circuit discovery (Wang et al.'s path-patching steps)


def discovery_data(art: Artifacts) -> pd.DataFrame:
    """circuit_scores.csv plus ``value`` (exact effect where computed, else the attribution
    estimate), ``value_kind`` and the head's circuit classes."""
    scores = art.scores().copy()
    classes = art.head_classes()
    if scores.empty:
        return scores.assign(value=pd.Series(dtype=float), value_kind=pd.Series(dtype=str),
                             classes=pd.Series(dtype=str))
    exact = scores["effect"].notna()
    scores["value"] = scores["effect"].where(exact, scores["attribution"])
    scores["value_kind"] = np.where(exact, "exact", np.where(scores["attribution"].notna(), "attribution", ""))
    # position-resolved steps: one cell per head, its strongest position (an exact value before an estimate)
    scores["_rank"] = list(zip(scores.value_kind != "exact", -scores.value.abs().fillna(-1)))
    scores = scores.sort_values("_rank", kind="stable").drop_duplicates(["step", "layer", "head"]).drop(columns="_rank")
    scores = scores.sort_values(["step", "layer", "head"], kind="stable").reset_index(drop=True)
    scores["classes"] = ["/".join(classes.get((int(l), int(h)), [])) for l, h in zip(scores.layer, scores["head"])]
    return scores


def plot_discovery(data: pd.DataFrame, art: Artifacts):
    classes = art.head_classes()
    n_layers = int(max([data.layer.max() if len(data) else -1] + [l for l, _ in classes] + [0])) + 1
    n_heads = int(max([data["head"].max() if len(data) else -1] + [h for _, h in classes] + [0])) + 1
    # No discovery scores at all (reference circuit, or an empty table): one map of the circuit heads.
    steps = list(DISCOVERY_STEPS) if data.value.notna().any() else [None]
    ncols = 1 if steps == [None] else 5 if n_layers >= 1.5 * n_heads else 3
    nrows = -(-len(steps) // ncols)
    cell = 0.32
    pw, ph = max(6.0 if ncols == 1 else 3.2, n_heads * cell + 1.6), max(3.0, n_layers * cell + 1.3)
    fig, axes = plt.subplots(nrows, ncols, figsize=(pw * ncols, ph * nrows), constrained_layout=True,
                             squeeze=False)
    cmap = plt.get_cmap("RdBu_r").copy()
    cmap.set_bad("#e6e6e6")
    label_size = max(5.0, min(8.0, cell * 72 * 0.32))
    source = art.metrics.get("circuit", {}).get("source")
    for ax in axes.ravel()[len(steps):]:
        ax.set_axis_off()
    for ax, step in zip(axes.ravel(), steps):
        d = data[data.step == step]
        grid = np.full((n_layers, n_heads), np.nan)
        if step is None:
            ax.set_title("circuit heads\n(" + ("reference circuit: no discovery scores" if source == "reference"
                                               else "circuit_scores.csv has no scores") + ")")
            if not classes:
                no_data(ax, "the circuit has no heads")
                continue
            ax.imshow(grid, cmap=cmap, aspect="auto", interpolation="nearest")
        elif d.value.isna().all():
            ax.set_title(DISCOVERY_STEPS[step])
            no_data(ax, "no senders for this step (its receiver class is empty)")
            continue
        else:
            ax.set_title(DISCOVERY_STEPS[step])
            grid[d.layer.astype(int), d["head"].astype(int)] = d.value
            vmax = float(np.nanmax(np.abs(grid))) or 1e-9
            im = ax.imshow(grid, cmap=cmap, vmin=-vmax, vmax=vmax, aspect="auto", interpolation="nearest")
            fig.colorbar(im, ax=ax, shrink=0.8, label="relative LD change")
        exact = d[d.value_kind == "exact"]
        if step is not None and 0 < len(exact) < len(d.dropna(subset=["value"])):
            for l, h in zip(exact.layer, exact["head"]):
                ax.add_patch(Rectangle((h - 0.5, l - 0.5), 1, 1, fill=False, lw=1.4, ec="black"))
        for (l, h), cls in classes.items():
            ax.text(h, l, "/".join(CLASS_SHORT[c] for c in cls), ha="center", va="center", fontsize=label_size,
                    fontweight="bold", color="black",
                    path_effects=[patheffects.withStroke(linewidth=2, foreground="white")])
        ax.set_xticks(range(n_heads))
        ax.set_yticks(range(n_layers))
        ax.tick_params(labelsize=7 if n_layers > 16 else 9)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
    suptitle(fig, "IOI circuit discovery by path patching (Wang et al. 2022 procedure; Nainani et al. 2024 §5.2)")
    return fig


def discovery_n(art: Artifacts) -> str:
    """N of the discovery figure: the base prompts used for path patching."""
    if art.metrics.get("circuit", {}).get("source") == "reference":
        return "no discovery (reference circuit)"
    return f"{art.circuit().get('n_prompts', '?')} base prompts for discovery"


def discovery_note(data: pd.DataFrame) -> str:
    mixed = (data.value_kind == "attribution").any() and (data.value_kind == "exact").any()
    if not data.value.notna().any():
        return "Labels mark circuit heads: " + CLASS_KEY + "."
    return ("Colour: relative change of the mean logit difference, (LD_patched − LD_clean)/LD_clean, when the head's "
            "output is replaced by its ABC-prompt value along that path only (Wang et al.'s path patching unless "
            "circuit.path_patching is direct; steps 4-5: the head's strongest position). "
            + ("Outlined cells: exact path patching; other cells: attribution (gradient) estimate. " if mixed else "")
            + "Grey: not a sender for that step. Labels mark circuit heads: " + CLASS_KEY + ".")


# --------------------------------------------------------------------------------------------
# Table 1: faithfulness of the base circuit on each variant


def table1_data(art: Artifacts) -> pd.DataFrame:
    rows = []
    for v in art.variants:
        m = art.metrics["variants"][v]
        p = art.prompts(v)
        rows.append({"variant": v, "model_ld": m.get("model_ld"), "circuit_ld": m.get("circuit_ld"),
                     "faithfulness": m.get("faithfulness"), "accuracy": m.get("accuracy"), "p_io": m.get("p_io"),
                     "n": m.get("n"), "model_ld_sem": sem(p.model_ld), "circuit_ld_sem": sem(p.circuit_ld)})
    return pd.DataFrame(rows, columns=["variant", "model_ld", "circuit_ld", "faithfulness", "accuracy", "p_io", "n",
                                       "model_ld_sem", "circuit_ld_sem"])


def plot_table1(data: pd.DataFrame):
    fig, ax = plt.subplots(figsize=(7.5, 4.6), constrained_layout=True)
    if data.empty:
        no_data(ax, "metrics.json has no variants")
        return fig
    x = np.arange(len(data))
    w = 0.38
    for i, run in enumerate(("model", "circuit")):
        bars = ax.bar(x + (i - 0.5) * w, data[f"{run}_ld"], w, yerr=data[f"{run}_ld_sem"].fillna(0), capsize=3,
                      color=RUN_COLORS[run], label=f"{RUN_LABELS[run]} LD")
        _bar_labels(ax, bars, data[f"{run}_ld"].tolist(), data[f"{run}_ld_sem"].tolist())
    for xi, (_, r) in zip(x, data.iterrows()):
        ax.text(xi, 1.02, f"faithfulness\n{r.faithfulness:.3f}", transform=ax.get_xaxis_transform(), ha="center",
                va="bottom", fontsize=9, fontweight="bold")
    ax.margins(y=0.12)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(x, [VARIANT_LABELS.get(v, v) for v in data.variant])
    ax.set_ylabel("logit difference  logit(IO) − logit(S)")
    _fig_legend(fig, ax)
    ax.set_title("Table 1 (Nainani et al. 2024): base IOI circuit evaluated on each variant", pad=34)
    return fig


# --------------------------------------------------------------------------------------------
# Figures 2-4: attention of the circuit heads


def _head_order(frame: pd.DataFrame) -> list[str]:
    heads = frame[["head", "layer", "head_index", "class"]].drop_duplicates("head")
    heads = heads.assign(rank=heads["class"].map(_class_rank)).sort_values(["rank", "layer", "head_index"])
    return heads["head"].tolist()


def attention_shift_data(art: Artifacts, variants=("double_io", "triple_io")) -> pd.DataFrame:
    """Per circuit head, variant and run: mean over prompts of attn_correct(variant) − attn_correct(base),
    paired by prompt index (the variants share names, template and order per index)."""
    cols = ["variant", "head", "layer", "head_index", "class", "run", "base_attn", "variant_attn", "change",
            "change_sem", "n"]
    # only the configured variants (the figure's inputs): another variant's file is at best stale
    configured = art.variants
    base = art.attention("base") if "base" in configured else pd.DataFrame(columns=ATTENTION_COLUMNS)
    rows = []
    if base.empty:
        return pd.DataFrame(columns=cols)
    keys = ["prompt", "order", "head", "layer", "head_index", "class", "run"]
    for v in variants:
        att = art.attention(v) if v in configured else pd.DataFrame(columns=ATTENTION_COLUMNS)
        if att.empty:
            continue
        m = base[keys + ["attn_correct"]].merge(att[keys + ["attn_correct"]], on=keys, suffixes=("_base", "_var"))
        m["change"] = m.attn_correct_var - m.attn_correct_base
        for (head, run), g in m.groupby(["head", "run"], sort=False):
            r = g.iloc[0]
            rows.append({"variant": v, "head": head, "layer": r.layer, "head_index": r.head_index, "class": r["class"],
                         "run": run, "base_attn": g.attn_correct_base.mean(), "variant_attn": g.attn_correct_var.mean(),
                         "change": g.change.mean(), "change_sem": sem(g.change), "n": len(g)})
    frame = pd.DataFrame(rows, columns=cols)
    if len(frame):
        order = {h: i for i, h in enumerate(_head_order(frame))}
        frame = frame.sort_values(["variant", "head"], key=lambda s: s.map(order) if s.name == "head" else s)
    return frame.reset_index(drop=True)


def _grouped_head_bars(ax, frame: pd.DataFrame, value: str, err: str | None, heads: list[str]):
    x = np.arange(len(heads))
    w = 0.38
    for i, run in enumerate(("model", "circuit")):
        d = frame[frame.run == run].set_index("head").reindex(heads)
        ax.bar(x + (i - 0.5) * w, d[value], w, yerr=None if err is None else d[err].fillna(0), capsize=2,
               color=RUN_COLORS[run], label=RUN_LABELS[run], error_kw={"lw": 0.8})
    info = frame.drop_duplicates("head").set_index("head").reindex(heads)
    ax.set_xticks(x, [_head_label(int(r.layer), int(r.head_index), r["class"]) for _, r in info.iterrows()],
                  fontsize=8 if len(heads) > 16 else 9)
    ax.set_xlim(-0.6, len(heads) - 0.4)
    prev = None
    for xi, cls in zip(x, info["class"]):
        if prev is not None and cls != prev:
            ax.axvline(xi - 0.5, color="0.6", lw=0.8, ls=":")
        prev = cls
    return x


def plot_attention_shift(data: pd.DataFrame, variants=("double_io", "triple_io")):
    heads = _head_order(data) if len(data) else []
    fig, axes = plt.subplots(len(variants), 1, figsize=(max(7.5, 0.55 * len(heads) + 2), 3.3 * len(variants)),
                             constrained_layout=True, squeeze=False, sharex=bool(heads))
    for ax, v in zip(axes[:, 0], variants):
        d = data[data.variant == v]
        ax.set_title(f"{VARIANT_LABELS[v]} − Base IOI")
        if d.empty:
            no_data(ax, f"no attention data for {VARIANT_LABELS[v]} or base")
            continue
        _grouped_head_bars(ax, d, "change", "change_sem", heads)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_ylabel("Δ attention to\ncorrect token(s)")
        if not fig.legends:
            _fig_legend(fig, ax)
    suptitle(fig, "Fig 2 (Nainani et al. 2024): change of each circuit head's attention between Base IOI and the "
                 "variants")
    return fig


ATTENTION_NOTE = ("Attention of each head from its query position to its class's correct token(s) "
                  "(name movers END→IO, S-inhibition END→S2, induction S2→S1+1, duplicate token S2→S1, "
                  "previous token S1+1→S1); incorrect: name movers END→S, S-inhibition END→IO2 (IO1 in Base), "
                  "induction S2→IO1+1, duplicate token S2→IO1, previous token S1+1→IO1. ")


def sinh_attention_data(art: Artifacts, variant: str = "double_io") -> pd.DataFrame:
    """The example attention row (one prompt, top S-inhibition head at END), model and circuit, plus the
    mean over all prompts of that head's attention to S2 and to IO2 (``panel='mean'`` rows)."""
    ex = art.eval(variant).get("example_attention") or {}
    cols = ["panel", "head", "prompt", "position", "token", "role", "model", "circuit", "model_sem", "circuit_sem", "n"]
    if not ex or not ex.get("model"):
        return pd.DataFrame(columns=cols)
    roles = {p: r for r, p in (ex.get("positions") or {}).items() if p is not None and p >= 0}
    strings = ex.get("token_strings") or [str(t) for t in ex.get("tokens", [])]
    rows = [{"panel": "example", "head": ex["head"], "prompt": ex.get("prompt", 0), "position": i,
             "token": strings[i] if i < len(strings) else "", "role": roles.get(i, ""), "model": m, "circuit": c}
            for i, (m, c) in enumerate(zip(ex["model"], ex["circuit"]))]
    att = art.attention(variant)
    a = att[(att["head"].astype(str) == ex["head"]) & (att["class"] == "s_inhibition")]
    for col, role in (("attn_correct", "S2"), ("attn_incorrect", "IO2")):
        if a.empty:
            break
        vals = {run: a[a.run == run][col] for run in ("model", "circuit")}
        rows.append({"panel": "mean", "head": ex["head"], "role": role, "model": vals["model"].mean(),
                     "circuit": vals["circuit"].mean(), "model_sem": sem(vals["model"]),
                     "circuit_sem": sem(vals["circuit"]), "n": len(vals["model"])})
    return pd.DataFrame(rows, columns=cols)


def _token_text(tok: str) -> str:
    tok = str(tok).replace("\n", "\\n").replace("\t", "\\t")
    return tok if tok.strip() else repr(tok)


def plot_sinh_attention(data: pd.DataFrame, variant: str = "double_io"):
    ex = data[data.panel == "example"]
    mean = data[data.panel == "mean"]
    n_tok = max(len(ex), 8)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(max(9, 0.42 * n_tok + 4), 4.8), constrained_layout=True,
                                  gridspec_kw={"width_ratios": [max(4, 0.42 * n_tok), 2.4]})
    if ex.empty:
        no_data(ax, "no S-inhibition head in the circuit (no example attention)")
        no_data(ax2)
        suptitle(fig, f"Fig 3 (Nainani et al. 2024): S-inhibition head attention at END on a {VARIANT_LABELS[variant]} "
                     "prompt")
        return fig
    head = ex["head"].iloc[0]
    x = np.arange(len(ex))
    w = 0.4
    for i, run in enumerate(("model", "circuit")):
        ax.bar(x + (i - 0.5) * w, ex[run], w, color=RUN_COLORS[run], label=RUN_LABELS[run])
    labels = [_token_text(t) + (f"  [{r}]" if r else "") for t, r in zip(ex.token, ex.role)]
    ax.set_xticks(x, labels, rotation=70, ha="right", rotation_mode="anchor", fontsize=9)
    for lab, r in zip(ax.get_xticklabels(), ex.role):
        if r in ("S2", "IO2", "IO1", "S1", "IO3"):
            lab.set_fontweight("bold")
            lab.set_color("#c44e52" if r.startswith("S") else "#2a7f3f")
    ax.set_xlim(-0.6, len(ex) - 0.4)
    ax.set_ylabel("attention from END")
    ax.set_title(f"Head {head}, prompt {int(ex.prompt.iloc[0])} (query END)")
    _fig_legend(fig, ax)
    if mean.empty:
        no_data(ax2, f"head {head} is logged under another class in the attention table "
                     "(a head in two classes keeps the first)")
    else:
        xx = np.arange(len(mean))
        for i, run in enumerate(("model", "circuit")):
            bars = ax2.bar(xx + (i - 0.5) * w, mean[run], w, yerr=mean[f"{run}_sem"].fillna(0), capsize=3,
                           color=RUN_COLORS[run], label=RUN_LABELS[run])
            _bar_labels(ax2, bars, mean[run].tolist(), mean[f"{run}_sem"].tolist())
        ax2.set_xticks(xx, [f"END → {r}" for r in mean.role])
        ax2.set_ylabel("mean attention")
        ax2.set_title(f"Head {head}, mean over {int(mean.n.iloc[0])} prompts")
        ax2.set_ylim(0, max(0.05, float(np.nanmax(mean[["model", "circuit"]].to_numpy()))) * 1.3)
    suptitle(fig, f"Fig 3 (Nainani et al. 2024): attention of the top S-inhibition head at END, "
                 f"{VARIANT_LABELS[variant]}")
    return fig


def confidence_ratio_data(art: Artifacts, n_samples: int = 50, variant: str = "double_io") -> pd.DataFrame:
    """Per head, over the first ``n_samples`` prompts: confidence ratio attn_correct/attn_incorrect (model and
    circuit) and functional faithfulness = circuit attn_correct / model attn_correct, mean ± SE."""
    cols = ["quantity", "run", "head", "layer", "head_index", "class", "mean", "sem", "n"]
    att = art.attention(variant)
    if att.empty:
        return pd.DataFrame(columns=cols)
    keep = sorted(att.prompt.unique())[: int(n_samples)]
    att = att[att.prompt.isin(keep)].copy()
    with np.errstate(divide="ignore", invalid="ignore"):
        att["ratio"] = (att.attn_correct / att.attn_incorrect).replace([np.inf, -np.inf], np.nan)
    piv = att.pivot_table(index=["prompt", "head"], columns="run", values="attn_correct").reset_index()
    with np.errstate(divide="ignore", invalid="ignore"):
        piv["ff"] = (piv.get("circuit") / piv.get("model")).replace([np.inf, -np.inf], np.nan)
    info = att.drop_duplicates("head").set_index("head")
    rows = []
    for head in _head_order(att):
        r = info.loc[head]
        base = {"head": head, "layer": r.layer, "head_index": r.head_index, "class": r["class"]}
        for run in ("model", "circuit"):
            v = att[(att["head"] == head) & (att.run == run)].ratio.dropna()
            rows.append({"quantity": "confidence_ratio", "run": run, **base, "mean": v.mean(), "sem": sem(v),
                         "n": len(v)})
        v = piv[piv["head"] == head].ff.dropna()
        rows.append({"quantity": "functional_faithfulness", "run": "circuit/model", **base, "mean": v.mean(),
                     "sem": sem(v), "n": len(v)})
    return pd.DataFrame(rows, columns=cols)


def _maybe_log(ax, values) -> None:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v) & (v > 0)]
    if len(v) and v.max() / v.min() > 50:
        ax.set_yscale("log")


def plot_confidence_ratio(data: pd.DataFrame, variant: str = "double_io"):
    heads = _head_order(data) if len(data) else []
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(7.5, 0.55 * len(heads) + 2), 7), constrained_layout=True,
                                   sharex=bool(heads))
    cr = data[data.quantity == "confidence_ratio"]
    ff = data[data.quantity == "functional_faithfulness"]
    ax1.set_title("Confidence ratio  Attn(correct) / Attn(incorrect)")
    ax2.set_title("Functional faithfulness  Attn_circuit(correct) / Attn_model(correct)")
    if cr.empty:
        no_data(ax1, f"no attention data for {VARIANT_LABELS[variant]}")
        no_data(ax2)
    else:
        _grouped_head_bars(ax1, cr.assign(sem=np.minimum(cr["sem"].fillna(0), cr["mean"].abs() * 0.999)),
                           "mean", "sem", heads)
        ax1.axhline(1, color="black", lw=0.8, ls="--")
        _maybe_log(ax1, cr["mean"])
        ax1.set_ylabel("ratio (mean ± SE)")
        _fig_legend(fig, ax1)
        x = np.arange(len(heads))
        d = ff.set_index("head").reindex(heads)
        ax2.bar(x, d["mean"], 0.6, yerr=np.minimum(d["sem"].fillna(0), d["mean"].abs() * 0.999), capsize=2,
                color="#8172b3", label="circuit / model", error_kw={"lw": 0.8})
        ax2.axhline(1, color="black", lw=0.8, ls="--")
        _maybe_log(ax2, d["mean"])
        ax2.set_ylabel("ratio (mean ± SE)")
        ax2.set_xticks(x, [_head_label(int(r.layer), int(r.head_index), r["class"]) for _, r in d.iterrows()],
                       fontsize=8 if len(heads) > 16 else 9)
        ax2.set_xlim(-0.6, len(heads) - 0.4)
    suptitle(fig, f"Fig 4 (Nainani et al. 2024): attention confidence and functional faithfulness per circuit head, "
                 f"{VARIANT_LABELS[variant]}")
    return fig


# --------------------------------------------------------------------------------------------
# Figure 5 + Table 2: restoring paths into the duplicate / induction / previous-token heads


def restored_data(art: Artifacts) -> pd.DataFrame:
    cols = ["table", "variant", "config", "ld", "faithfulness", "model_ld", "edges", "edge_overlap", "nodes"]
    rows = []
    restored = art.metrics.get("restored", {})
    for v in art.variants:
        if v not in restored:
            continue
        details = art.eval(v).get("restored", {})
        model_ld = art.metrics["variants"][v].get("model_ld")
        configs = [c for c in RESTORE_ORDER if c in restored[v]] + [c for c in restored[v] if c not in RESTORE_ORDER]
        for c in configs:
            d = details.get(c, {})
            rows.append({"table": "fig5", "variant": v, "config": c, "ld": restored[v][c],
                         "faithfulness": art.metrics.get("restored_faithfulness", {}).get(v, {}).get(c),
                         "model_ld": model_ld, "edges": d.get("edges"),
                         "edge_overlap": d.get("edge_overlap_with_base")})
    for v, r in art.metrics.get("table2", {}).items():
        rows.append({"table": "table2", "variant": v, "config": {"double_io": "s2_io2", "triple_io": "s2_io2_io3"}.get(
            v, "base_circuit"), "ld": r.get("circuit_ld"), "faithfulness": r.get("faithfulness"),
            "model_ld": r.get("model_ld"), "edges": r.get("edges"), "edge_overlap": r.get("edge_overlap"),
            "nodes": r.get("nodes")})
    frame = pd.DataFrame(rows, columns=cols)
    # one label per bar (the DVC plot of this CSV draws faithfulness by it)
    frame["setting"] = frame.table + " " + frame.variant + " " + frame.config
    return frame


def plot_restored(data: pd.DataFrame, variants=("double_io", "triple_io")):
    fig = plt.figure(figsize=(13, 7.2), constrained_layout=True)
    gs = fig.add_gridspec(2, 2, height_ratios=[3.2, 1.3])
    fig5 = data[data.table == "fig5"]
    for i, v in enumerate(variants):
        ax = fig.add_subplot(gs[0, i])
        ax.set_title(VARIANT_LABELS[v])
        d = fig5[fig5.variant == v]
        if d.empty:
            no_data(ax, f"no restored-path results for {VARIANT_LABELS[v]}")
            continue
        x = np.arange(len(d))
        colors = ["#e1812c" if c == "s2_only" else "#7aa6d6" if c != "all" else "#2d5f99" for c in d.config]
        bars = ax.bar(x, d.ld, 0.65, color=colors)
        model_ld = d.model_ld.iloc[0]
        hi = max(float(np.nanmax(np.r_[d.ld.abs(), abs(model_ld)])), 1e-9)
        for b, ld, f in zip(bars, d.ld, d.faithfulness):
            text = fmt_num(ld) + (f"\nF={f:.2f}" if f is not None and np.isfinite(f) else "")
            inside = abs(ld) > 0.25 * hi
            ax.annotate(text, (b.get_x() + b.get_width() / 2, ld if inside else max(ld, 0)),
                        xytext=(0, -3 if inside and ld > 0 else 3), textcoords="offset points", ha="center",
                        va="top" if inside and ld > 0 else "bottom", fontsize=8.5,
                        color="white" if inside else "black", fontweight="bold" if inside else "normal")
        ax.axhline(model_ld, color=RUN_COLORS["model"], ls="--", lw=1.3, label=f"full model LD = {fmt_num(model_ld)}")
        ax.axhline(0, color="black", lw=0.8)
        ax.margins(y=0.15)
        ax.set_xticks(x, [RESTORE_LABELS.get(c, c) for c in d.config], fontsize=9)
        ax.set_xlabel("tokens at which duplicate/induction (and previous-token) heads are kept")
        ax.set_ylabel("circuit logit difference")
        ax.legend(frameon=False, loc="upper right")
    ax = fig.add_subplot(gs[1, :])
    ax.axis("off")
    t2 = data[data.table == "table2"].set_index("variant")
    if t2.empty:
        no_data(ax, "no Table 2 rows in metrics.json")
    else:
        cols = [v for v in VARIANTS if v in t2.index] + [v for v in t2.index if v not in VARIANTS]

        def fmt(x, f):
            return "—" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f.format(x)

        cell = [[fmt(t2.loc[v, "nodes"], "{:.0f}") for v in cols], [fmt(t2.loc[v, "edges"], "{:.0f}") for v in cols],
                [fmt(100 * t2.loc[v, "edge_overlap"], "{:.2f}%") for v in cols],
                [fmt(t2.loc[v, "model_ld"], "{:.3f}") for v in cols], [fmt(t2.loc[v, "ld"], "{:.3f}") for v in cols],
                [fmt(t2.loc[v, "faithfulness"], "{:.3f}") for v in cols]]
        table = ax.table(cellText=cell, colLabels=[VARIANT_LABELS.get(v, v) for v in cols],
                         rowLabels=["nodes", "edges", "edge overlap with base", "model LD", "circuit LD",
                                    "faithfulness"], loc="center", cellLoc="center", colWidths=[0.16] * len(cols))
        table.auto_set_font_size(False)
        table.set_fontsize(9)
        table.scale(1, 1.25)
        ax.set_title("Table 2: circuit with the IO-duplicate paths added (DoubleIO: S2+IO2, TripleIO: S2+IO2+IO3)",
                     fontsize=10)
    suptitle(fig, "Fig 5 + Table 2 (Nainani et al. 2024): restoring the paths from the repeated IO tokens "
                 "into duplicate detection")
    return fig


RESTORED_NOTE = ("Bars: mean LD of the circuit when duplicate-token and induction heads are kept at the listed "
                 "tokens and previous-token heads at the matching +1 positions (S2↔S1+1, IO2/IO3↔IO1+1); "
                 "'all tokens' keeps them everywhere. F = circuit LD / full-model LD. Edges: sender head × kept "
                 "position × receiver head (count_edges in circuit.py).")


# --------------------------------------------------------------------------------------------
# Figure 6: paths into the S-inhibition values


def value_paths_data(art: Artifacts, groups=VALUE_PATH_GROUPS) -> pd.DataFrame:
    vp = art.value_paths()
    cols = ["variant", "source", "head", "layer", "head_index", "class", "effect_pct", "attribution_pct"]
    if vp.empty:
        return pd.DataFrame(columns=cols)
    vp = vp[vp.effect_pct.notna()].copy()
    vp = vp[[(v, s) in groups for v, s in zip(vp.variant, vp.source)]]
    vp["class"] = vp["class"].fillna("")
    vp = vp.rename(columns={"head": "head_index"})
    vp["head"] = vp.layer.astype(int).astype(str) + "." + vp.head_index.astype(int).astype(str)
    return vp[cols].reset_index(drop=True)


def value_paths_n(art: Artifacts) -> str:
    """N of Figure 6: the first value_paths.n_prompts prompts of each variant."""
    n_cfg, n_all = art.recorded_config("value_paths.csv", "value_paths.n_prompts"), art.metrics.get("n_prompts")
    n = min(n_cfg, n_all) if n_cfg is not None and n_all is not None else (n_cfg or n_all or "?")
    return f"{n} prompts per variant (the first value_paths.n_prompts of each variant's dataset)"


def plot_value_paths(data: pd.DataFrame, groups=VALUE_PATH_GROUPS):
    info = data.drop_duplicates("head")
    if len(info):
        ref = data[(data.variant == groups[0][0]) & (data.source == groups[0][1])].set_index("head").effect_pct
        info = info.assign(rank=info["class"].map(lambda c: _class_rank(c) if c else len(CLASSES)),
                           mag=-info["head"].map(ref).abs().fillna(0)).sort_values(["rank", "mag", "layer",
                                                                                     "head_index"])
    heads = info["head"].tolist()
    fig, ax = plt.subplots(figsize=(max(8, 0.6 * len(heads) + 2.5), 4.8), constrained_layout=True)
    if data.empty:
        no_data(ax, "no sender head has an exact path-patching effect\n"
                    "(no S-inhibition head, or value_paths.csv empty)")
    else:
        x = np.arange(len(heads))
        present = [g for g in groups if ((data.variant == g[0]) & (data.source == g[1])).any()]
        w = 0.8 / max(1, len(present))
        for i, (v, s) in enumerate(present):
            d = data[(data.variant == v) & (data.source == s)].set_index("head").reindex(heads)
            ax.bar(x + (i - (len(present) - 1) / 2) * w, d.effect_pct, w, color=VALUE_PATH_COLORS.get((v, s)),
                   label=f"{VARIANT_LABELS.get(v, v)}, from {s}")
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(x, [_head_label(int(r.layer), int(r.head_index), r["class"]) for _, r in info.iterrows()],
                      fontsize=8 if len(heads) > 16 else 9)
        ax.set_xlim(-0.6, len(heads) - 0.4)
        ax.set_ylabel("effect on LD (% of clean LD)")
        ax.set_xlabel("sender head (class in the base circuit)")
        ax.legend(frameon=False)
    suptitle(fig, "Fig 6 (Nainani et al. 2024): effect of each head's path into the S-inhibition heads' values")
    return fig


PATH_PATCHING_TEXT = {
    "wang": "path patching as Wang et al.: every other head frozen to its clean output, the MLPs in between "
            "recomputed, then the S-inhibition heads' value input at that position replaced by what that run gave it",
    "direct": "the direct path: the change added only to the value input of the S-inhibition heads at that position",
}


def value_paths_note(art: Artifacts) -> str:
    """Figure 6's caption note, naming the path patching used (``circuit.path_patching`` in the metrics)."""
    mode = art.metrics.get("circuit", {}).get("path_patching", "?")
    how = PATH_PATCHING_TEXT.get(mode, f"path patching '{mode}'")
    return ("Effect = 100 · (LD_patched − LD_clean) / LD_clean when the sender's output change (ABC − clean) at S2 "
            f"or IO2 is patched in ({how}). Senders shown: the attribution top-k plus the circuit's early heads; "
            "a missing bar means the head was not patched exactly in that setting.")


# --------------------------------------------------------------------------------------------
# Figure 8: logit difference by name order


def name_order_data(art: Artifacts) -> pd.DataFrame:
    cols = ["variant", "order", "order_label", "run", "ld", "sem", "n"]
    rows = []
    by_order = art.metrics.get("by_order", {})
    for v in art.variants:
        if v not in by_order:
            continue
        p = art.prompts(v)
        for o in ("ABBA", "BABA"):
            rec = by_order[v].get(o) or {}
            for run in ("model", "circuit"):
                vals = p[p.order == o][f"{run}_ld"] if len(p) else pd.Series(dtype=float)
                rows.append({"variant": v, "order": o, "order_label": ORDER_LABELS[o], "run": run,
                             "ld": rec.get(f"{run}_ld"), "sem": sem(vals), "n": rec.get("n")})
    return pd.DataFrame(rows, columns=cols)


def plot_name_order(data: pd.DataFrame):
    variants = [v for v in VARIANTS if v in set(data.variant)] + [v for v in dict.fromkeys(data.variant)
                                                                   if v not in VARIANTS]
    fig, axes = plt.subplots(1, max(1, len(variants)), figsize=(3.6 * max(1, len(variants)) + 1, 4.4),
                             constrained_layout=True, sharey=True, squeeze=False)
    if not variants:
        no_data(axes[0, 0], "metrics.json has no by-order results")
    for ax, v in zip(axes[0], variants):
        d = data[data.variant == v]
        x = np.arange(2)
        w = 0.38
        for i, run in enumerate(("model", "circuit")):
            r = d[d.run == run].set_index("order").reindex(["ABBA", "BABA"])
            bars = ax.bar(x + (i - 0.5) * w, r.ld.astype(float), w, yerr=r["sem"].fillna(0), capsize=3,
                          color=RUN_COLORS[run], label=RUN_LABELS[run])
            _bar_labels(ax, bars, r.ld.astype(float).tolist(), r["sem"].tolist())
        n = d.drop_duplicates("order").set_index("order").n
        ax.set_xticks(x, [f"{ORDER_LABELS[o]}\nn = {n.get(o, '?')}" for o in ("ABBA", "BABA")])
        ax.axhline(0, color="black", lw=0.8)
        ax.set_title(VARIANT_LABELS.get(v, v))
    axes[0, 0].set_ylabel("logit difference  logit(IO) − logit(S)")
    ax0 = axes[0, 0]
    ax0.margins(y=0.12)
    _fig_legend(fig, ax0)
    suptitle(fig, "Fig 8 (Nainani et al. 2024): logit difference by name order, full model vs circuit")
    return fig


# --------------------------------------------------------------------------------------------
# Engine: attribution patching vs exact activation patching of every head


def head_patching_data(art: Artifacts) -> pd.DataFrame:
    """Per head: exact and attribution effects (END only and all positions), relative LD change."""
    return art.csv("head_patching.csv", ["layer", "head", "exact_end", "attribution_end", "exact_all",
                                         "attribution_all"])


def head_patching_summary(art: Artifacts) -> dict:
    return art.json("head_patching.json", default={})


def plot_head_patching(data: pd.DataFrame, summary: dict):
    """Scatter of attribution vs exact effect per head, for END-only and all-position patches."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    for ax, (kind, title) in zip(axes, [("end", "patch at END only"), ("all", "patch at all positions")]):
        ex, at = f"exact_{kind}", f"attribution_{kind}"
        ok = data[[ex, at]].dropna() if len(data) else data
        if not len(ok):
            no_data(ax, "no head_patching.csv")
            continue
        ax.scatter(ok[ex], ok[at], s=14, alpha=0.7, color="#3b6fb6")
        lim = float(np.nanmax(np.abs(ok[[ex, at]].to_numpy()))) * 1.1 or 1.0
        ax.plot([-lim, lim], [-lim, lim], ls="--", color="0.5", lw=1)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        agree = summary.get("agreement_end" if kind == "end" else "agreement_all_positions", {})
        k = summary.get("top_k", 10)
        top = data.assign(mag=data[ex].abs()).nlargest(5, "mag")
        for _, r in top.iterrows():
            ax.annotate(f"{int(r.layer)}.{int(r['head'])}", (r[ex], r[at]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.set_title(f"{title}\nSpearman {agree.get('spearman', float('nan')):.2f}, "
                     f"top-{k} overlap {agree.get(f'top{k}_overlap', float('nan')):.0%}")
        ax.set_xlabel("exact patching effect (relative LD change)")
        ax.set_ylabel("attribution estimate")
    suptitle(fig, "Attribution patching vs exact activation patching of every head (clean run, ABC head output patched in)")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------
# Faithfulness-driven admission: faithfulness against circuit size


def curve_data(art: Artifacts) -> pd.DataFrame:
    """circuit_curve.csv: one row per tried node (the skeleton, then admission by effect)."""
    return art.csv("circuit_curve.csv", CURVE_COLUMNS)


def curve_note(art: Artifacts) -> str:
    adm = art.metrics.get("circuit", {}).get("admission") or {}
    if not adm:
        return "No admission: the circuit was not discovered (reference circuit)."
    status = ("reached" if adm.get("reached") else f"not reached: {adm.get('reason', '')}")
    return (f"Faithfulness = circuit LD / model LD on {adm.get('n_validation', '?')} held-out base prompts of the discovery "
            f"split (not evaluated elsewhere). Skeleton: the strongest candidate of each class; then candidates by "
            f"effect, admitted if they raise faithfulness by at least {adm.get('min_gain', '?')}. Target "
            f"{adm.get('target', '?')}: {status}")


def plot_curve(data: pd.DataFrame, art: Artifacts):
    fig, ax = plt.subplots(figsize=(8.5, 4.5), constrained_layout=True)
    adm = art.metrics.get("circuit", {}).get("admission") or {}
    if data.empty:
        no_data(ax, "no admission curve (reference circuit)")
        return fig
    ok = data[data.admitted.astype(str).str.lower() == "true"]
    rejected = data[data.admitted.astype(str).str.lower() != "true"]
    ax.plot(ok["size"], ok.faithfulness, "-o", color=RUN_COLORS["circuit"], label="admitted")
    ax.scatter(rejected["size"] + 1, rejected.faithfulness, marker="x", color="#7f7f7f", label="tried, rejected")
    if "target" in adm:
        ax.axhline(adm["target"], ls="--", color="black", lw=1, label=f"target {adm['target']}")
    ax.axhline(1.0, ls=":", color=RUN_COLORS["model"], lw=1, label="full model")
    for _, r in ok.iterrows():
        if isinstance(r["node"], str) and r["node"]:  # the empty circuit's row has no node (NaN from the CSV)
            ax.annotate(f"{r['node']}\n{CLASS_SHORT.get(r['class'], r['class'])}", (r["size"], r.faithfulness),
                        xytext=(0, 6), textcoords="offset points", ha="center", fontsize=6)
    ax.set_xlabel("circuit size (nodes: head at its kept positions)")
    ax.set_ylabel("base faithfulness (held-out)")
    ax.legend(loc="lower right", fontsize=8)
    suptitle(fig, "Faithfulness-driven admission: faithfulness against circuit size")
    return fig


# --------------------------------------------------------------------------------------------
# The mechanism test: S2 hacking in the full model


def mechanism_data(art: Artifacts) -> pd.DataFrame:
    """Per variant: the model LD, the LD with the circuit's duplicate/induction heads ablated at the IO
    mentions and its previous-token heads at IO1+1, the control draws, and the base LD."""
    runs = art.csv("mechanism_runs.csv", MECHANISM_RUN_COLUMNS)
    mech = art.json("mechanism.json", default={}).get("variants", {})
    rows = []
    for v, m in mech.items():
        for _, r in runs[runs.variant == v].iterrows():
            rows.append({"variant": v, "run": r.run, "draw": r.draw, "ld": r.ld, "change": r.ld - m["model_ld"],
                         "base_model_ld": m["base_model_ld"]})
    return pd.DataFrame(rows, columns=["variant", "run", "draw", "ld", "change", "base_model_ld"])


def plot_mechanism(data: pd.DataFrame):
    variants = [v for v in VARIANTS if v in set(data.variant)]
    fig, axes = plt.subplots(1, max(1, len(variants)), figsize=(4.6 * max(1, len(variants)), 4.2),
                             constrained_layout=True, squeeze=False)
    if not variants:
        no_data(axes[0, 0], "no DoubleIO / TripleIO variant configured")
        return fig
    for ax, v in zip(axes[0], variants):
        d = data[data.variant == v]
        model = d[d.run == "model"].ld.iloc[0]
        mech = d[d.run == "mechanism"].ld
        ctrl = d[d.run == "control"].ld
        base = d.base_model_ld.iloc[0]
        xs, labels = [0], ["full model"]
        bars = [model]
        if len(mech):
            xs.append(1)
            labels.append("IO paths\nablated")
            bars.append(mech.iloc[0])
        b = ax.bar(xs, bars, color=[RUN_COLORS["model"], "#c44e52"][: len(bars)])
        _bar_labels(ax, b, bars)
        if len(ctrl):
            ax.bar([2], [ctrl.mean()], yerr=[ctrl.std() if len(ctrl) > 1 else 0], color="#bbbbbb", capsize=4)
            ax.scatter(np.full(len(ctrl), 2.0), ctrl, s=10, color="black", zorder=3)
            labels.append(f"random heads\n({len(ctrl)} draws)")
            xs.append(2)
        ax.axhline(base, ls="--", color="black", lw=1, label=f"model LD on base ({base:.2f})")
        ax.set_xticks(xs)
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_ylabel("logit difference")
        ax.set_title(VARIANT_LABELS.get(v, v))
        ax.legend(loc="lower right", fontsize=7)
    suptitle(fig, "S2 hacking in the full model: ablating the IO mentions' duplicate-detection paths")
    return fig


def mechanism_note() -> str:
    return ("The circuit's duplicate-token and induction heads are mean-ablated at IO2 (and IO3) and its previous-token "
            "heads at IO1+1, everything else runs; the control ablates as many random other heads at the same positions. "
            "S2 hacking predicts the LD moves toward the base LD.")

