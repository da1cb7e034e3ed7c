"""Facts about the workflow shared by the Snakefile, the DVC generator and the audit.

``RULE_CONFIG`` lists, for each rule, the config keys it reads. Snakemake receives them as the
rule's ``params`` (a change reruns the rule and what depends on it) and ``dvc.yaml`` declares them
as the stage's ``params`` — the same list, so the two DAGs rerun the same stages.
"""

from __future__ import annotations

RESULTS = "results/ioi_generalization"
FIGURES = "figures/ioi_generalization"
SUBSPACE_RESULTS = "results/subspace_illusion"  # Study B
SUBSPACE_FIGURES = "figures/subspace_illusion"
MCQ_RESULTS = "results/mcq_circuits"
MCQ_FIGURES = "figures/mcq_circuits"
FACTS_RESULTS = "results/subspace_illusion"  # Study B's factual-recall part (facts.json, rome.json)
FACTS_FIGURES = "figures/subspace_illusion"
FACTS_FIGURE_NAMES = ["facts_flips", "facts_null_norm", "rome_rewrite"]

RULE_CONFIG: dict[str, list[str]] = {
    "prepare_model": ["seed", "model.name"],
    "ioi_dataset": ["seed", "ioi"],
    "ioi_inference": ["model", "ioi"],
    "ioi_circuit": ["seed", "model", "circuit"],
    "ioi_evaluate": ["model", "ablation", "ioi"],
    "ioi_value_paths": ["model", "circuit", "value_paths"],
    "ioi_head_patching": ["model", "circuit.max_rows", "head_patching"],
    "ioi_metrics": ["model.name"],
    "ioi_figure": ["figures.dpi"],
    "mcq_model": ["seed", "mcq.model", "mcq.organism"],
    "mcq_dataset": ["seed", "mcq.model", "mcq.n_items", "mcq.n_shots"],
    "mcq_accuracy": ["model.device", "model.dtype", "mcq.batch_size"],
    "mcq_dla": ["model.device", "model.dtype", "mcq.batch_size", "mcq.n_analysis", "mcq.top_k"],
    "mcq_patching": ["model.device", "model.dtype", "mcq.batch_size", "mcq.n_analysis", "mcq.max_rows"],
    "mcq_heads": ["model.device", "model.dtype", "mcq.batch_size", "mcq.n_analysis"],
    "mcq_low_rank": ["model.device", "model.dtype", "mcq.batch_size", "mcq.n_analysis", "mcq.low_rank"],
    "mcq_mutations": ["model.device", "model.dtype", "mcq.batch_size"],
    "mcq_metrics": ["mcq.model", "mcq.n_items", "mcq.top_k", "mcq.label_sets"],
    "mcq_figure": ["figures.dpi"],
    # Study B, factual recall and fact editing (workflow/rules/facts.smk)
    "facts_dataset": ["seed", "model", "facts.data_file", "facts.counterfact_file", "facts.require_correct",
                      "facts.n_pairs", "facts.min_pairs"],
    "facts_key_stats": ["model", "rome.corpus", "rome.corpus_tokens", "rome.chunk_tokens"],
    "facts_layer": ["seed", "model", "facts.steps", "facts.lrs"],
    "rome_layer": ["model", "rome.n_pairs", "rome.steps", "rome.lr", "rome.weight_decay", "rome.clamp",
                   "rome.ridge"],
    "facts_summary": ["model.name"],
    "rome_summary": ["model.name"],
    "facts_figure": ["figures.dpi"],
    "scorecard": ["model.name", "studies"],
    # Study B, toy and IOI parts (workflow/rules/subspace.smk)
    "subspace_toy": [],
    "subspace_ioi_dataset": ["seed", "ioi.data_file", "subspace_ioi.data_file", "subspace_ioi.n_train",
                             "subspace_ioi.n_test"],
    "subspace_ioi_das": ["seed", "model", "subspace.layer", "subspace_ioi.lr", "subspace_ioi.epochs",
                         "subspace_ioi.batch"],
    "subspace_ioi_eval": ["model", "subspace.layer"],
    "subspace_metrics": ["model.name"],
    "subspace_figure": ["figures.dpi"],
}

# Config keys read by only some jobs of a rule: rule -> (wildcard, {wildcard value: extra keys}).
# A figure-only parameter then reruns only the figure that draws with it.
JOB_CONFIG: dict[str, tuple[str, dict[str, list[str]]]] = {
    "ioi_figure": ("fig", {"fig4_confidence_ratio": ["figures.n_attention_samples"]}),
}

# Figure notebooks of Study A: name -> variants whose artifacts it needs (besides metrics.json).
IOI_FIGURES: dict[str, list[str]] = {
    "circuit_discovery": [],
    "table1_faithfulness": [],
    "fig2_attention_shift": ["double_io"],
    "fig3_sinh_attention": ["double_io"],
    "fig4_confidence_ratio": ["double_io"],
    "fig5_restored_paths": ["double_io"],
    "fig6_value_paths": [],
    "fig8_name_order": [],
    "head_patching_attribution": [],
}


# Study B's metrics.json merges these part files: every top-level key of each is copied in.
SUBSPACE_PARTS: list[str] = [f"{SUBSPACE_RESULTS}/toy.json", f"{SUBSPACE_RESULTS}/ioi.json",
                              f"{FACTS_RESULTS}/facts.json", f"{FACTS_RESULTS}/rome.json"]

# Figure notebooks of Study B's toy and IOI parts (notebooks/subspace_illusion/<name>.ipynb) and the
# files each reads.
SUBSPACE_FIGURE_INPUTS: dict[str, list[str]] = {
    "toy_example": [f"{SUBSPACE_RESULTS}/toy.json"],
    "ioi_table1": [f"{SUBSPACE_RESULTS}/metrics.json", f"{SUBSPACE_RESULTS}/ioi_pairs.csv", "reference/published.yaml"],
    "ioi_projections": [f"{SUBSPACE_RESULTS}/metrics.json", f"{SUBSPACE_RESULTS}/ioi_projections.csv"],
    "ioi_dormant_pathway": [f"{SUBSPACE_RESULTS}/metrics.json", f"{SUBSPACE_RESULTS}/ioi_dormant.csv"],
}
# Figure notebooks of Study C (notebooks/mcq_circuits/<name>.ipynb).
MCQ_FIGURES_LIST: list[str] = ["accuracy_table", "dla", "patching", "head_categories", "low_rank",
                               "fig11_mutations"]


def mcq_model_dir(name: str) -> str:
    """Directory of Study C's model: the trained organism, or a registry model prepared for it."""
    if name == "organism":
        return "resources/models/mcq-organism"
    return f"resources/mcq_models/{name.replace('/', '--').replace(':', '_')}"


def model_dir(name: str) -> str:
    """Directory of a prepared model (hub ids become file-system safe names)."""
    safe = name.replace("/", "--").replace(":", "_")
    return f"resources/models/{safe}"


# The studies, by their name in config ``studies``: the scorecard's keys for the study (entries of
# reference/published.yaml) and its metrics file. Each study adds its figures in ``study_outputs``.
STUDIES: dict[str, dict] = {
    "ioi_generalization": {"scorecard": ["study_a"], "metrics": f"{RESULTS}/metrics.json"},
    # Study B's IOI part (GPT-2 small) and its factual-recall part (GPT2-XL) compare with different models
    "subspace_illusion": {"scorecard": ["study_b", "study_b_facts"], "metrics": f"{SUBSPACE_RESULTS}/metrics.json"},
    "mcq_circuits": {"scorecard": ["study_c"], "metrics": f"{MCQ_RESULTS}/metrics.json"},
}


def study_outputs(study: str, config: dict) -> list[str]:
    """The figures and metrics file of one study."""
    if study == "ioi_generalization":
        figs = [f"{FIGURES}/{fig}.png" for fig in figures_for(config["ioi"]["variants"])]
        return figs + [STUDIES[study]["metrics"]]
    if study == "subspace_illusion":
        figs = [f"{SUBSPACE_FIGURES}/{fig}.png" for fig in [*SUBSPACE_FIGURE_INPUTS, *FACTS_FIGURE_NAMES]]
        return figs + [STUDIES[study]["metrics"]]
    if study == "mcq_circuits":
        return [f"{MCQ_FIGURES}/{fig}.png" for fig in MCQ_FIGURES_LIST] + [STUDIES[study]["metrics"]]
    raise KeyError(f"unknown study {study!r}")


def study_metrics(config: dict) -> dict[str, str]:
    """``{scorecard key: metrics.json path}`` of the configured studies (the scorecard's inputs)."""
    return {key: STUDIES[s]["metrics"] for s in config["studies"] for key in STUDIES[s]["scorecard"]}


def all_outputs(config: dict) -> list[str]:
    """Targets of ``rule all``: every configured study's figures and metrics, and the scorecard."""
    outs = [out for study in config["studies"] for out in study_outputs(study, config)]
    return outs + ["results/scorecard.md"]


def record_in_dvc(config_settings) -> None:
    """After a successful ``snakemake`` run: record the artifacts' hashes in ``dvc.lock``.

    Skipped when ``--config`` or ``--configfile`` overrides make config/config.yaml untrue (DVC
    reads its params from that file), or where DVC is not set up.
    """
    import os
    import shutil
    import subprocess

    if not os.path.isdir(".dvc") or shutil.which("dvc") is None:
        return
    extra_files = [f for f in (config_settings.configfiles or []) if not str(f).endswith("config/config.yaml")]
    if config_settings.config or extra_files:
        print("dvc.lock not updated: this run used config overrides (DVC reads config/config.yaml)")
        return
    # 'dvc commit' checks the outputs out of its cache again, which gives them new modification
    # times in no particular order; Snakemake would then see inputs newer than their outputs and
    # rerun jobs. The times are put back.
    times = _artifact_times()
    done = subprocess.run(["dvc", "commit", "--force", "--quiet"], capture_output=True, text=True,
                          env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    _restore_times(times)
    if done.returncode == 0:
        print("dvc.lock updated with the hashes of the artifacts")
    else:
        print("dvc.lock not updated (run 'dvc commit' after a complete run):", done.stderr.strip()[-300:])


def _artifact_times(dvc_yaml: str = "dvc.yaml") -> dict[str, tuple[int, int, int]]:
    """(size, atime, mtime) in ns of every file under the ``outs`` of ``dvc_yaml``'s stages."""
    import os

    import yaml

    with open(dvc_yaml) as fh:
        stages = (yaml.safe_load(fh) or {}).get("stages", {})
    outs = {next(iter(o)) if isinstance(o, dict) else o for st in stages.values() for o in st.get("outs", [])}
    times = {}
    for out in outs:
        paths = [out] if os.path.isfile(out) else [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs]
        for path in paths:
            st = os.stat(path)
            times[path] = (st.st_size, st.st_atime_ns, st.st_mtime_ns)
    return times


def _restore_times(times: dict[str, tuple[int, int, int]]) -> None:
    """Put back the times recorded by :func:`_artifact_times` on files of unchanged size."""
    import os

    for path, (size, atime, mtime) in times.items():
        try:
            if os.stat(path).st_size == size:
                os.utime(path, ns=(atime, mtime))
        except OSError:  # removed meanwhile: nothing to restore
            pass


def get_key(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def config_keys(rule: str, wildcards=None) -> list[str]:
    """The config keys a job of ``rule`` reads (``wildcards``: a dict or Snakemake's wildcards)."""
    keys = list(RULE_CONFIG[rule])
    if rule in JOB_CONFIG and wildcards is not None:
        name, extra = JOB_CONFIG[rule]
        value = dict(wildcards.items()).get(name)
        keys += extra.get(value, [])
    return keys


def rule_config(rule: str, config: dict, wildcards=None) -> dict:
    """The config values a job of ``rule`` reads, as a flat ``{dotted key: value}`` dict."""
    return {key: get_key(config, key) for key in config_keys(rule, wildcards)}


def figures_for(variants: list[str]) -> list[str]:
    """Study A figures that the configured variants allow."""
    return [f for f, need in IOI_FIGURES.items() if all(v in variants for v in need)]
