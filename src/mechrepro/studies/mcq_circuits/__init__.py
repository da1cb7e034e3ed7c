"""Study C: multiple-choice "correct letter" circuits and whether circuit analysis scales
(Lieberum et al. 2023), on open models.

Modules: ``data`` (synthetic and MMLU questions, label mutations, tokenization), ``organism``
(the small model trained here when ``mcq.model`` is ``organism``), ``analysis`` (DLA, patching,
head categories, low-rank q/k/v), ``verify`` (the checks of a genuine correct-letter head),
``metrics`` (tables, summaries, ``metrics.json``), ``stages`` (one function per rule of
``workflow/rules/mcq_circuits.smk``), ``plotting`` (the figures of ``notebooks/mcq_circuits/``).
"""

from __future__ import annotations

from mechrepro.studies import Figure, Plot, Study

C = "results/mcq_circuits"


def _files(*names: str, per_label_set: str | None = None):
    def inputs(config: dict) -> list[str]:
        files = [f"{C}/{n}" for n in names]
        if per_label_set:
            files += [f"{C}/{per_label_set.format(s=s)}" for s in config["mcq"]["label_sets"]]
        return files
    return inputs


FIGURES = {
    "accuracy_table": Figure("Analysis 1, accuracy per label set",
                             _files("metrics.json", "organism.json", per_label_set="accuracy/{s}.json")),
    "dla": Figure("Analysis 2, direct logit attribution", _files("metrics.json", "dla.csv", "dla.json")),
    # patching: the points are coloured by head category (heads.csv)
    "patching": Figure("Analysis 3, activation patching",
                       _files("metrics.json", "patching.csv", "patching.json", "heads.csv")),
    "head_categories": Figure("Analysis 4, head categories", _files("metrics.json", "heads.csv", "heads.json")),
    "low_rank": Figure("Analysis 5, low-rank q/k/v", _files("metrics.json", "low_rank.json", "low_rank_keys.csv"),
                       dvc_plot=Plot("rank_num", "loss", "scatter",
                                     "Study C: loss by rank of the low-rank head (q, k, v and all three)")),
    "fig11_mutations": Figure("Figure 11, label mutations",
                              _files("metrics.json", "organism.json", per_label_set="mutations/{s}.json")),
}


def caption(config: dict, fig: str) -> str:
    """The report caption of one figure (reStructuredText): model, N and the label sets."""
    m = config["mcq"]
    model = ("the model organism trained by this workflow (not the paper's Chinchilla 70B, which is closed)"
             if m["model"] == "organism" else f"``{m['model']}``")
    sets = ", ".join(f"``{s}``" for s in m["label_sets"])
    analysis = f"at most {m['n_analysis']} of the normal-label (ABCD) questions the model answers correctly"
    n = {"accuracy_table": f"N = {m['n_items']} questions per label set ({sets}).",
         "low_rank": f"N = {analysis}, half to fit the projections and half to test them.",
         "fig11_mutations": f"N = the questions of each label set ({sets}) whose normal-label version the model "
                            f"answers correctly (of {m['n_items']})."}.get(fig, f"N = {analysis}.")
    return "\n".join([f"Study C figure ``{fig}`` (Lieberum et al. 2023, {FIGURES[fig].paper}). Model: {model}.", n,
                      "The plotted numbers are in the CSV beside the PNG."])


STUDY = Study(
    name="mcq_circuits",
    letter="C",
    title="multiple-choice circuits",
    paper="Lieberum et al. 2023, Does Circuit Analysis Interpretability Scale?",
    rules={
        "mcq_model": ["seed", "mcq.model", "mcq.organism"],
        "mcq_dataset": ["seed", "mcq.model", "mcq.n_items", "mcq.n_shots"],
        "mcq_accuracy": ["model.device", "model.dtype", "mcq.batch_size"],
        "mcq_dla": ["model.device", "model.dtype", "mcq.batch_size", "mcq.n_analysis", "mcq.top_k"],
        "mcq_patching": ["model.device", "model.dtype", "mcq.batch_size", "mcq.n_analysis", "mcq.max_rows"],
        "mcq_heads": ["model.device", "model.dtype", "mcq.batch_size", "mcq.n_analysis"],
        "mcq_verify": ["seed", "model.device", "model.dtype", "mcq.batch_size", "mcq.verify"],
        "mcq_low_rank": ["model.device", "model.dtype", "mcq.batch_size", "mcq.n_analysis", "mcq.low_rank"],
        "mcq_mutations": ["model.device", "model.dtype", "mcq.batch_size"],
        "mcq_metrics": ["mcq.model", "mcq.n_items", "mcq.top_k", "mcq.label_sets", "mcq.min_competence", "mcq.min_head_effect"],
    },
    figures=FIGURES,
    scorecard=["study_c"],
    caption=caption,
    check_config=lambda config, root: _check(config, root),
)


def _check(config: dict, root: str) -> None:
    """Before any job runs: the model name, the organism's shape and the counts
    (:mod:`mechrepro.studies.mcq_circuits.checks`)."""
    from mechrepro.studies.mcq_circuits.checks import check_config

    check_config(config, root)


def model_dir(name: str) -> str:
    """Directory of Study C's model: the trained organism, or a registry model prepared for it."""
    if name == "organism":
        return "resources/models/mcq-organism"
    return f"resources/mcq_models/{name.replace('/', '--').replace(':', '_')}"
