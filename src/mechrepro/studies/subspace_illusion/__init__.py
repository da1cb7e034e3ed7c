"""Study B: the subspace activation-patching illusion (Makelov, Lange & Nanda 2023).

Three parts, one study: the Section 3 toy network (``toy``), the IOI part (``ioi``: ABB ↔ BAB
pairs, DAS at the MLP and the residual stream, Table 1 and its histograms; it reads Study A's
circuit for the site layer and the name movers), and factual recall with fact editing (``facts``,
``rome``: 1-D patches per layer, ROME and its equivalent subspace intervention). ``metrics``
merges the per-layer summaries and the parts of ``metrics.json``; ``stages`` holds one function
per rule of ``workflow/rules/subspace_illusion.smk``; ``plotting`` the figures of
``notebooks/subspace_illusion/``.
"""

from __future__ import annotations

from mechrepro.studies import Figure, Plot, Study
from mechrepro.studies.ioi_generalization import SMOLLM2_NOTE

B = "results/subspace_illusion"
REFERENCE = "reference/published.yaml"
FACTS_FIGURES = ("facts_flips", "facts_null_norm", "rome_rewrite")


def _files(*names: str):
    return lambda config: [f"{B}/{n}" for n in names]


def _manifest(config: dict) -> str:
    from mechrepro.workflow.pipeline import model_dir

    return f"{model_dir(config['model']['name'])}/manifest.json"


def _facts_inputs(summary: str, per_layer: str | None, reference: bool):
    """The facts figures: the dataset (model, filtering), one summary, optionally the per-layer CSVs
    (of ``facts.layers``, or ``rome.layers`` for ROME's), the model's manifest (its description and
    number of layers) and the paper's curves."""
    def inputs(config: dict) -> list[str]:
        files = [f"{B}/facts/data.json", f"{B}/{summary}", _manifest(config)]
        if per_layer:
            layers = config["rome" if per_layer == "rome" else "facts"]["layers"]
            files += [f"{B}/{per_layer}/layer{layer}.csv" for layer in layers]
        return files + ([REFERENCE] if reference else [])
    return inputs


FIGURES = {
    "toy_example": Figure("Section 3, the toy network", _files("toy.json")),
    "ioi_table1": Figure("Table 1", lambda config: [f"{B}/metrics.json", f"{B}/ioi_pairs.csv", REFERENCE],
                         dvc_plot=Plot("fldd", "label", "bar_horizontal", "Study B, Table 1: FLDD (%) per patch")),
    "ioi_projections": Figure("IOI part, projections on the directions", _files("metrics.json", "ioi_projections.csv")),
    "ioi_dormant_pathway": Figure("IOI part, the dormant pathway", _files("metrics.json", "ioi_dormant.csv")),
    "facts_flips": Figure("Section 6, fact flips per layer", _facts_inputs("facts.json", None, True),
                          dvc_plot=Plot("layer", ("flip_frac_1d", "flip_frac_full_mlp", "flip_frac_row",
                                                  "flip_frac_rank1_edit"), "linear",
                                        "Study B, Section 6: fraction of facts flipped per layer")),
    "facts_null_norm": Figure("Section 6, null-space norms", _facts_inputs("facts.json", "facts", False)),
    "rome_rewrite": Figure("Section 6, ROME vs its subspace intervention", _facts_inputs("rome.json", "rome", True),
                           dvc_plot=Plot("layer", ("rome", "derived_subspace", "row_only"), "linear",
                                         "Study B, Section 6: mean rewrite score per layer")),
}


def caption(config: dict, fig: str) -> str:
    """The report caption of one figure (reStructuredText): the part of the study it belongs to, the
    model and the settings of that part."""
    name = config["model"]["name"]
    model = f"Model: ``{name}``" + (f" {SMOLLM2_NOTE}" if name == "smollm2-135m" else "") + "."
    head = f"Study B figure ``{fig}`` (Makelov, Lange & Nanda 2023, {FIGURES[fig].paper})."
    if fig == "toy_example":
        lines = [head, "The Section 3 toy network (3 hidden units, linear); no language model is involved."]
    elif fig in FACTS_FIGURES:
        f, r = config["facts"], config["rome"]
        known = ", both answered correctly by the model" if f["require_correct"] else ""
        lines = [head, model, f"Up to {f['n_pairs']} fact pairs (same relation, different objects{known}); layers "
                              f"{', '.join(map(str, f['layers']))}."]
        if fig == "rome_rewrite":
            lines.append(f"{r['n_pairs']} ROME edits per layer, on layers {', '.join(map(str, r['layers']))}.")
        if fig != "facts_null_norm":
            lines.append(f"Key statistic (the MLP keys' second moment) from {r['corpus_tokens']} tokens of "
                         f"``{r['corpus']}``.")
    else:
        s, layer = config["subspace_ioi"], config["subspace"]["layer"]
        site = ("chosen automatically (the last S-inhibition layer of Study A's circuit, below the first name-mover "
                "layer)" if layer == "auto" else f"``{layer}`` (set in the configuration)")
        lines = [head, model, f"Site: layer {site}, END position.",
                 f"{s['n_train']} training pairs (templates T0-T1), {s['n_test']} held-out test pairs (template T2; "
                 "names, places and objects disjoint from training)."]
    return "\n".join(lines + ["The plotted numbers are in the CSV beside the PNG."])


def check_config(config: dict, root: str) -> None:
    """Before any job runs: the data files, the layers against the model's shape and the counts
    (:mod:`mechrepro.studies.subspace_illusion.checks`)."""
    from mechrepro.studies.subspace_illusion.checks import check_config as check

    check(config, root)


STUDY = Study(
    name="subspace_illusion",
    letter="B",
    title="subspace-patching illusion",
    paper="Makelov, Lange & Nanda 2023, Is This the Subspace You Are Looking for?",
    rules={
        "subspace_toy": [],
        "subspace_ioi_dataset": ["seed", "ioi.data_file", "subspace_ioi.data_file", "subspace_ioi.n_train",
                                 "subspace_ioi.n_test"],
        "subspace_ioi_das": ["seed", "model", "subspace.layer", "subspace_ioi.lr", "subspace_ioi.epochs",
                             "subspace_ioi.batch"],
        "subspace_ioi_eval": ["model", "subspace.layer"],
        "facts_dataset": ["seed", "model", "facts.data_file", "facts.counterfact_file", "facts.require_correct",
                          "facts.n_pairs", "facts.min_pairs"],
        "facts_key_stats": ["model", "rome.corpus", "rome.corpus_tokens", "rome.chunk_tokens"],
        "facts_layer": ["seed", "model", "facts.optimizer", "facts.steps", "facts.lrs", "facts.trials",
                        "facts.lr_end_factor"],
        "rome_layer": ["seed", "model", "rome.n_pairs", "rome.method", "rome.steps", "rome.lr", "rome.weight_decay",
                       "rome.clamp", "rome.kl_factor", "rome.early_stop", "rome.contexts", "rome.context_lengths",
                       "rome.ridge"],
        "facts_summary": ["model.name"],
        "rome_summary": ["model.name", "rome.layers"],
        "subspace_metrics": ["model.name"],
    },
    figures=FIGURES,
    # the IOI part compares with GPT-2 small, the factual-recall part with GPT2-XL
    scorecard=["study_b", "study_b_facts"],
    caption=caption,
    check_config=check_config,
)
