"""Study B's summaries: the per-layer facts / ROME tables and ``metrics.json`` merged from its parts.

Each facts or ROME job writes one layer's summary (``facts/layer{l}.json``, ``rome/layer{l}.json``);
:func:`per_layer` keeps the fields of :data:`FACTS_KEYS` / :data:`ROME_KEYS` of each, by layer
(``facts.json``, ``rome.json``); :func:`dataset_summary` adds to ``facts.json`` what the facts
are (known to the model or not). :func:`merge_parts` copies the top-level keys of every part
(toy, IOI, facts, ROME) into ``metrics.json`` after the model; a key given by two parts, or a part
made with another model, is an error rather than a silent overwrite.
"""

from __future__ import annotations

from mechrepro.workflow.artifacts import ArtifactError

FACTS_KEYS = ("n_pairs", "flip_frac_1d", "flip_frac_full_mlp", "flip_frac_row", "flip_frac_null",
              "flip_frac_rank1_edit", "rank1_agrees_1d", "rank1_key_max_err", "ld_clean", "ld_rel_1d",
              "ld_rel_full_mlp", "ld_rel_row", "ld_rel_null", "ld_rel_rank1_edit", "null_norm", "random_null_norm")
ROME_KEYS = ("n_pairs", "rome", "derived_subspace", "row_only", "pearson", "exact_frac", "rome_delta_only",
             "clamp_frac", "delta_rel", "mean_steps", "alpha_min_rel", "gain_rel", "row_frac")


def per_layer(summaries: list[tuple[str, dict]], fields: tuple[str, ...]) -> dict[str, dict]:
    """``{layer: {field: value}}`` from ``(path, summary)`` pairs, sorted by layer; a summary missing
    a field raises :class:`ValueError` naming its file."""
    out = {}
    for path, s in summaries:
        missing = [k for k in fields if k not in s]
        if missing:
            raise ValueError(f"{path}: missing {missing}; rebuild it: rm {path} && snakemake all")
        out[str(s["layer"])] = {k: s[k] for k in fields}
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def dataset_summary(data: dict) -> dict:
    """``facts.json``'s ``facts_dataset``: whether the facts were filtered by the model's answers, how
    many facts it knows and how many pairs were made (``data``: ``facts/data.json``). The claims about
    facts are testable only on facts the model knows."""
    return {"require_correct": bool(data["require_correct"]), "n_facts": int(data["n_facts"]),
            "n_correct": int(data["n_correct"]), "n_pairs": len(data["pairs"])}


def merge_parts(manifest: dict, parts: list[tuple[str, object]]) -> dict:
    """The model (``manifest``: name, description and, when it has them, its number of layers as
    ``model_spec.n_layers``: the relative depth of the facts layers), then the top-level keys of every
    ``(path, part)``.

    A part that is not a JSON object, or whose ``ioi.model`` is not the manifest's model, raises
    :class:`~mechrepro.workflow.artifacts.ArtifactError`; a key given twice raises :class:`ValueError`.
    """
    metrics: dict = {"model": manifest["name"], "model_description": manifest["description"]}
    if "spec" in manifest:
        metrics["model_spec"] = {"n_layers": manifest["spec"]["n_layers"]}
    origin: dict[str, str] = {}
    for path, part in parts:
        if not isinstance(part, dict):
            raise ArtifactError(f"{path}: a metrics part must be a JSON object; rebuild it: rm {path} && snakemake all")
        for key, value in part.items():
            if key in metrics:
                raise ValueError(f"metrics part {path} has the key '{key}', which "
                                 f"{origin.get(key, 'the model description')} already gives; rename one of them")
            metrics[key] = value
            origin[key] = str(path)
        model = part.get("ioi", {}).get("model") if isinstance(part.get("ioi"), dict) else None
        if model is not None and model != manifest["name"]:
            raise ArtifactError(f"{path} was made with model {model!r}, not {manifest['name']!r}; rebuild it: rm {path} && snakemake all")
    return metrics
