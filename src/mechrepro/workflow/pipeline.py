"""Facts about the workflow shared by the Snakefile, the DVC generator, the stages and the audit.

Everything here is derived from the study registry (:mod:`mechrepro.studies`): the config keys
each rule reads (Snakemake receives them as the rule's ``params``, so a change reruns the rule and
what depends on it, and ``dvc.yaml`` declares them as the stage's ``params``: the same list, so the
two DAGs rerun the same stages), the targets of ``rule all`` and the inputs of each figure.
"""

from __future__ import annotations


def model_dir(name: str) -> str:
    """Directory of a prepared model (hub ids become file-system safe names)."""
    safe = name.replace("/", "--").replace(":", "_")
    return f"resources/models/{safe}"


def model_weights(name: str, folder: str) -> list[str]:
    """The weights file of a model prepared into ``folder``: an output of the rule that prepares it,
    so that DVC tracks it (``dvc status`` sees a damaged file). ``[]`` for a hub model, whose
    weights stay in the Hugging Face cache; ``organism`` is Study C's trained model."""
    from mechrepro.core.registry import LOCAL

    return [f"{folder}/model.safetensors"] if name in LOCAL or name == "organism" else []


def figure_outputs(study: str, config: dict) -> list[str]:
    """The figures (PNG) of one study that the configuration draws."""
    from mechrepro.studies import study as get

    s = get(study)
    return [f"{s.figures_dir}/{fig}.png" for fig in s.figure_names(config)]


def figure_inputs(study: str, fig: str, config: dict) -> list[str]:
    """Every file the notebook of one figure reads (the figure rule's artifact inputs)."""
    from mechrepro.studies import study as get

    s = get(study)
    if fig not in s.figures:
        raise KeyError(f"study {study} has no figure {fig!r}; its figures: {', '.join(s.figures)}")
    return s.figures[fig].inputs(config)


def notebook_params(study: str, fig: str, config: dict) -> dict:
    """The papermill parameters of one figure's notebook besides ``root`` and ``fig_name``: ``dpi``,
    the figure's own config values under their parameter names (:attr:`mechrepro.studies.Figure.params`)
    and ``inputs``, the files it may read (relative to the workflow directory: the same in a copy)."""
    from mechrepro.studies import study as get

    names = {"figures.dpi": "dpi", **get(study).figures[fig].params}
    values = rule_config("figure", config, {"study": study, "fig": fig})
    return {**{names[k]: v for k, v in values.items()}, "inputs": figure_inputs(study, fig, config)}


def study_outputs(study: str, config: dict) -> list[str]:
    """The figures and metrics file of one study."""
    from mechrepro.studies import study as get

    return figure_outputs(study, config) + [get(study).metrics]


def study_metrics(config: dict) -> dict[str, str]:
    """``{scorecard key: metrics.json path}`` of the configured studies (the scorecard's inputs)."""
    from mechrepro.studies import study as get

    return {key: get(s).metrics for s in config["studies"] for key in get(s).scorecard}


def all_outputs(config: dict) -> list[str]:
    """Targets of ``rule all``: every configured study's figures and metrics, the scorecard and the
    replication report."""
    outs = [out for study in config["studies"] for out in study_outputs(study, config)]
    return outs + ["results/scorecard.md", REPLICATION]


REPLICATION = "results/replication.md"
REPORT_FRONT = "results/replication.rst"  # the scorecard rule's reStructuredText version of the report
REPORT_PLACEHOLDER = "workflow/report/workflow.rst"


def report_front(root: str) -> str:
    """The front page of ``snakemake --report`` (the Snakefile's ``report:``): the replication report
    once the scorecard rule has written it, a note saying how to make it before."""
    import os

    return REPORT_FRONT if os.path.isfile(os.path.join(root, REPORT_FRONT)) else REPORT_PLACEHOLDER


def every_output(targets: list[str], rules) -> list[str]:
    """Every file made by the jobs that ``targets`` need, the targets included (``rule all``'s inputs).

    Snakemake rebuilds a missing file only when it is a target or when a job that must run anyway
    needs it: a deleted intermediate (or the outputs of a failed job) whose consumers are up to date
    would stay missing for good. Listing every job's outputs as targets makes ``snakemake all``
    rebuild any missing file; what depends on it reruns only if the rebuilt file differs (Snakemake
    compares the checksums of small inputs) or is large.

    ``rules`` are Snakemake's rules (``workflow.rules``): the files are found by walking back from
    the targets through the rules' outputs and inputs, as Snakemake's own DAG does, so nothing is
    listed twice and a configuration's unused rules contribute nothing.
    """
    return sorted(producers(targets, rules))


def producers(targets: list[str], rules) -> dict[str, str]:
    """``{file: name of the rule that makes it}`` for every file of :func:`every_output`."""
    rules = [r for r in rules if r.name != "all"]
    todo, seen, made = list(targets), set(), {}
    while todo:
        path = str(todo.pop())
        if path in seen:
            continue
        seen.add(path)
        rule = next((r for r in rules if any(o.match(path) for o in r.output)), None)
        if rule is None:  # a source file: config, data file, notebook, code
            continue
        wildcards = rule.get_wildcards(path)
        outputs = [str(o) for o in rule.expand_output(wildcards)[0]]
        made.update({o: rule.name for o in outputs})
        seen.update(outputs)
        todo += [str(f) for f in rule.expand_input(wildcards)[0]]
    return made


def record_in_dvc(config_settings) -> None:
    """After a successful ``snakemake`` run: record the artifacts' hashes in ``dvc.lock``.

    Skipped when ``--config`` or ``--configfile`` overrides make config/config.yaml untrue (DVC
    reads its params from that file), or where DVC is not set up. Refused (exit status 1, nothing
    recorded) when an artifact differs from its provenance record or a model file from its
    manifest: ``dvc.lock`` must never call a damaged file up to date
    (:mod:`mechrepro.workflow.integrity`).
    """
    import os
    import shutil
    import subprocess
    import sys

    from mechrepro.workflow.integrity import check_files, refusal

    if not os.path.isdir(".dvc") or shutil.which("dvc") is None:
        return
    extra_files = [f for f in (config_settings.configfiles or []) if not str(f).endswith("config/config.yaml")]
    if config_settings.config or extra_files:
        print("dvc.lock not updated: this run used config overrides (DVC reads config/config.yaml)")
        return
    problems = check_files(_dvc_files())
    if problems:
        print(refusal(problems, "dvc.lock not updated"), file=sys.stderr)
        raise SystemExit(1)
    # 'dvc commit' checks the outputs out of its cache again, which gives them new modification
    # times in no particular order; Snakemake would then see inputs newer than their outputs and
    # rerun jobs. The times are put back.
    times = _artifact_times()
    done = subprocess.run(["dvc", "commit", "--force"], capture_output=True, text=True,
                          env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    _restore_times(times)
    if done.returncode == 0:
        print("dvc.lock updated with the hashes of the artifacts")
    else:
        why = (done.stderr.strip() or done.stdout.strip())[-300:] or f"dvc commit exited with status {done.returncode}"
        print("dvc.lock not updated (run 'dvc commit' after a complete run):", why)


def _dvc_files(dvc_yaml: str = "dvc.yaml", kinds: tuple[str, ...] = ("outs", "metrics")) -> list[str]:
    """Every existing file under the ``outs`` (and metrics) of ``dvc_yaml``'s stages."""
    import os

    import yaml

    with open(dvc_yaml) as fh:
        stages = (yaml.safe_load(fh) or {}).get("stages", {})
    outs = sorted({next(iter(o)) if isinstance(o, dict) else o for st in stages.values() for kind in kinds
                   for o in st.get(kind, [])})
    files = []
    for out in outs:
        files += [out] if os.path.isfile(out) else sorted(os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs)
    return files


def _artifact_times(dvc_yaml: str = "dvc.yaml") -> dict[str, tuple[int, int, int]]:
    """(size, atime, mtime) in ns of every file under the ``outs`` of ``dvc_yaml``'s stages."""
    import os

    times = {}
    for path in _dvc_files(dvc_yaml, ("outs",)):
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
    """The config keys a job of ``rule`` reads (``wildcards``: a dict or Snakemake's wildcards).

    A figure job also reads its figure's own keys (:attr:`mechrepro.studies.Figure.params`), so
    that a figure-only parameter reruns only the figure that draws with it.
    """
    from mechrepro.studies import rule_config as rules
    from mechrepro.studies import study

    keys = list(rules()[rule])
    if rule == "figure" and wildcards is not None:
        w = dict(wildcards.items())
        if "study" in w and "fig" in w:
            keys += list(study(w["study"]).figures[w["fig"]].params)
    return keys


def rule_config(rule: str, config: dict, wildcards=None) -> dict:
    """The config values a job of ``rule`` reads, as a flat ``{dotted key: value}`` dict."""
    return {key: get_key(config, key) for key in config_keys(rule, wildcards)}
