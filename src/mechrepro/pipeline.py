"""Facts about the workflow shared by the Snakefile, the DVC generator and the audit.

``RULE_CONFIG`` lists, for each rule, the config keys it reads. Snakemake receives them as the
rule's ``params`` (a change reruns the rule and what depends on it) and ``dvc.yaml`` declares them
as the stage's ``params`` — the same list, so the two DAGs rerun the same stages.
"""

from __future__ import annotations

RESULTS = "results/ioi_generalization"
FIGURES = "figures/ioi_generalization"
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
    "ioi_figure": ["figures"],
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


def model_dir(name: str) -> str:
    """Directory of a prepared model (hub ids become file-system safe names)."""
    safe = name.replace("/", "--").replace(":", "_")
    return f"resources/models/{safe}"


# The studies, by their name in config ``studies``: the scorecard's key for the study (an entry of
# reference/published.yaml) and its metrics file. Each study adds its figures in ``study_outputs``.
STUDIES: dict[str, dict[str, str]] = {
    "ioi_generalization": {"scorecard": "study_a", "metrics": f"{RESULTS}/metrics.json"},
    # Study B's factual-recall part on its own until it joins the subspace_illusion study.
    "subspace_facts": {"scorecard": "study_b_facts", "metrics": f"{FACTS_RESULTS}/facts.json"},
}


def study_outputs(study: str, config: dict) -> list[str]:
    """The figures and metrics file of one study."""
    if study == "ioi_generalization":
        figs = [f"{FIGURES}/{fig}.png" for fig in figures_for(config["ioi"]["variants"])]
        return figs + [STUDIES[study]["metrics"]]
    if study == "subspace_facts":
        figs = [f"{FACTS_FIGURES}/{fig}.png" for fig in FACTS_FIGURE_NAMES]
        return figs + [f"{FACTS_RESULTS}/facts.json", f"{FACTS_RESULTS}/rome.json"]
    raise KeyError(f"unknown study {study!r}")


def study_metrics(config: dict) -> dict[str, str]:
    """``{scorecard key: metrics.json path}`` of the configured studies (the scorecard's inputs)."""
    return {STUDIES[s]["scorecard"]: STUDIES[s]["metrics"] for s in config["studies"]}


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
    done = subprocess.run(["dvc", "commit", "--force", "--quiet"], capture_output=True, text=True,
                          env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    if done.returncode == 0:
        print("dvc.lock updated with the hashes of the artifacts")
    else:
        print("dvc.lock not updated (run 'dvc commit' after a complete run):", done.stderr.strip()[-300:])


def get_key(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def rule_config(rule: str, config: dict) -> dict:
    """The config values ``rule`` reads, as a flat ``{dotted key: value}`` dict."""
    return {key: get_key(config, key) for key in RULE_CONFIG[rule]}


def figures_for(variants: list[str]) -> list[str]:
    """Study A figures that the configured variants allow."""
    return [f for f, need in IOI_FIGURES.items() if all(v in variants for v in need)]
