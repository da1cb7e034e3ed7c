"""Study A: IOI circuit generalization and "S2 hacking" (Nainani et al. 2024).

Modules: ``data`` (IOI prompts and variants), ``checks`` (the prompt material's early checks),
``circuit`` (Wang et al.'s discovery procedure), ``analysis`` (model vs circuit per variant,
restored paths, attention, value paths, head patching), ``stages`` (one function per rule of
``workflow/rules/ioi_generalization.smk``), ``plotting`` (the figures of ``notebooks/ioi_generalization/``).
"""

from __future__ import annotations

from mechrepro.studies import Figure, Plot, Study

R = "results/ioi_generalization"
SMOLLM2_NOTE = ("(SmolLM2-135M-Instruct, a Q4_1-quantized GGUF copy dequantized to fp32: its weights differ from "
                "the original checkpoint)")


def _variants(config: dict) -> list[str]:
    return config["ioi"]["variants"]


def _per_variant(*patterns: str):
    """Inputs: ``metrics.json`` and each pattern (``{v}`` = variant) for every configured variant."""
    return lambda config: [f"{R}/metrics.json"] + [f"{R}/{p.format(v=v)}" for p in patterns for v in _variants(config)]


def _files(*names: str):
    return lambda config: [f"{R}/{n}" for n in names]


def _with_double_io(config: dict) -> bool:
    return "double_io" in _variants(config)


FIGURES = {
    "circuit_discovery": Figure("Wang-style discovery", _files("metrics.json", "circuit.json", "circuit_scores.csv")),
    "table1_faithfulness": Figure("Table 1", _per_variant("eval/{v}_prompts.csv"),
                                  dvc_plot=Plot("faithfulness", "variant", "bar_horizontal",
                                                "Study A, Table 1: faithfulness of the base circuit per variant")),
    "fig2_attention_shift": Figure("Fig. 2", _per_variant("eval/{v}_attention.csv"), enabled=_with_double_io),
    "fig3_sinh_attention": Figure("Fig. 3", _files("metrics.json", "eval/double_io.json", "eval/double_io_attention.csv"),
                                  enabled=_with_double_io),
    "fig4_confidence_ratio": Figure("Fig. 4", _files("metrics.json", "eval/double_io_attention.csv"),
                                    params={"figures.n_attention_samples": "n_samples"}, enabled=_with_double_io),
    "fig5_restored_paths": Figure("Fig. 5, Table 2", _per_variant("eval/{v}.json"), enabled=_with_double_io,
                                  dvc_plot=Plot("faithfulness", "setting", "bar_horizontal",
                                                "Study A, Figure 5 / Table 2: faithfulness with paths restored")),
    "fig6_value_paths": Figure("Fig. 6", _files("metrics.json", "value_paths.csv")),
    "fig8_name_order": Figure("Fig. 8", _per_variant("eval/{v}_prompts.csv")),
    "head_patching_attribution": Figure("attribution vs exact patching",
                                        _files("metrics.json", "head_patching.csv", "head_patching.json")),
    "circuit_faithfulness_curve": Figure("faithfulness-driven admission (issue: a faithful circuit)",
                                         _files("metrics.json", "circuit_curve.csv")),
    "mechanism_test": Figure("S2 hacking tested in the full model", _files("metrics.json", "mechanism.json",
                                                                         "mechanism_runs.csv"),
                             enabled=lambda config: any(v in _variants(config) for v in ("double_io", "triple_io"))),
}


# Figures that evaluate the circuit with everything else ablated (the others patch paths or heads).
ABLATION_FIGURES = ("table1_faithfulness", "fig2_attention_shift", "fig3_sinh_attention", "fig4_confidence_ratio",
                    "fig5_restored_paths", "fig8_name_order")


def _circuit_text(config: dict) -> str:
    c = config["circuit"]
    source = c["source"]
    if source == "auto":
        source = "reference" if config["model"]["name"] == "gpt2" else "discover"
    if source == "reference":
        return "Circuit: Wang et al.'s published GPT-2 small circuit (no discovery)."
    how = (f"(head, position) nodes ranked by attribution patching, the top {c['confirm_top_k']} per step confirmed "
           "exactly" if c["method"] == "attribution" else "every node patched exactly")
    pp = ("Wang et al.'s path patching (other heads frozen, MLPs recomputed)" if c["path_patching"] == "wang"
          else "direct-path patching (MLPs frozen too)")
    return (f"Circuit: discovered by {pp} on {c['n_prompts']} base prompts of the discovery split ({how}); nodes "
            f"admitted until the faithfulness on {c['n_validation']} held-out prompts reaches "
            f"{c['target_faithfulness']}.")


def _n_text(config: dict, fig: str) -> str:
    n = config["ioi"]["n_prompts"]
    if fig == "circuit_discovery":
        return f"N = {config['circuit']['n_prompts']} base prompts for discovery."
    if fig == "fig4_confidence_ratio":
        return f"N = the first {config['figures']['n_attention_samples']} DoubleIO prompts."
    if fig == "fig6_value_paths":
        return f"N = the first {min(n, config['value_paths']['n_prompts'])} prompts of each variant."
    if fig == "head_patching_attribution":
        return f"N = {config['head_patching']['n_prompts']} base prompts."
    if fig == "circuit_faithfulness_curve":
        return f"N = {config['circuit']['n_validation']} held-out base prompts of the discovery split."
    if fig == "mechanism_test":
        return (f"N = the first {min(n, config['mechanism']['n_prompts'])} prompts of each variant; "
                f"{config['mechanism']['n_controls']} random control draws.")
    return f"N = {n} prompts per variant (ABBA/BABA balanced)."


def caption(config: dict, fig: str) -> str:
    """The report caption of one figure (reStructuredText): model, N and the circuit and ablation
    settings the figure depends on."""
    name = config["model"]["name"]
    model = f"Model: ``{name}``" + (f" {SMOLLM2_NOTE}" if name == "smollm2-135m" else "") + "."
    lines = [f"Study A figure ``{fig}`` (Nainani et al. 2024, {FIGURES[fig].paper}). {model}", _n_text(config, fig)]
    if fig != "head_patching_attribution":
        lines.append(_circuit_text(config))
    if fig == "mechanism_test":
        lines.append(f"Ablation: mean ablation of the circuit's duplicate-token and induction heads at IO2/IO3 and its "
                     f"previous-token heads at IO1+1 only, means over {config['ablation']['n_prompts']} ABC prompts "
                     "of the variant per template.")
    if fig in ABLATION_FIGURES:
        lines.append(f"Ablation: {config['ablation']['kind']} ablation of every head and position outside the circuit, "
                     f"means over {config['ablation']['n_prompts']} ABC prompts of the variant per template.")
    return "\n".join(lines + ["The plotted numbers are in the CSV beside the PNG."])


def check_config(config: dict, root: str) -> None:
    """Before any job runs: the IOI prompt material parses and has enough single-token names; every
    count is within its bound (head counts within the model's heads)."""
    from pathlib import Path

    from mechrepro.studies.ioi_generalization.checks import check_counts, check_single_token_names, load_ioi_data

    from mechrepro.workflow.config import ConfigError

    data_path = Path(root) / config["ioi"]["data_file"]
    data = load_ioi_data(data_path)
    check_single_token_names(data, data_path, config, root)
    check_counts(config, root)
    need = 2 * len(data["templates"])
    if config["ablation"]["n_prompts"] < need:
        raise ConfigError(f"ablation.n_prompts is {config['ablation']['n_prompts']}: the means are taken per template, "
                          f"and {data_path} has {len(data['templates'])} templates (prompt i uses template i // 2), so "
                          f"at least {need} ABC prompts are needed for every template to have a mean; set "
                          f"ablation.n_prompts to {need} or more")


STUDY = Study(
    name="ioi_generalization",
    letter="A",
    title="IOI circuit generalization",
    paper="Nainani et al. 2024, Adaptive Circuit Behavior and Generalization in Mechanistic Interpretability",
    rules={
        "ioi_dataset": ["seed", "ioi"],
        "ioi_split": ["seed", "ioi", "circuit.n_prompts", "circuit.n_validation"],
        "ioi_means": ["seed", "model", "ioi.data_file", "ioi.min_single_token_names", "ablation.n_prompts"],
        "ioi_inference": ["model", "ioi"],
        "ioi_circuit": ["seed", "model", "circuit"],
        "ioi_evaluate": ["model", "ablation", "ioi"],
        "ioi_mechanism": ["seed", "model", "mechanism", "ioi"],
        "ioi_value_paths": ["model", "circuit", "value_paths"],
        "ioi_head_patching": ["model", "circuit.max_rows", "head_patching"],
        "ioi_metrics": ["model.name"],
    },
    figures=FIGURES,
    scorecard=["study_a"],
    caption=caption,
    check_config=check_config,
)
