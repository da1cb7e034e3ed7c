# One rule draws every figure of every study: papermill runs notebooks/{study}/{fig}.ipynb, which
# reads only the figure's declared inputs (mechrepro.studies: Figure.inputs; passed to the notebook
# as `inputs`, its Artifacts refuse any other file) and draws; then the rule writes a provenance
# sidecar for each output.
import json

from mechrepro.workflow.figures import FIGURE_LIB


wildcard_constraints:
    study="|".join(STUDIES),
    fig="|".join(sorted({f for s in STUDIES.values() for f in s.figures})),


def _notebook_params(w):
    """Notebook parameters: the dpi, the figure's own config keys (by their parameter names) and its
    declared inputs (relative to the workflow directory: the same in a copy of it)."""
    keys = rule_config("figure", config, w)
    names = {"figures.dpi": "dpi", **STUDIES[w.study].figures[w.fig].params}
    return json.dumps({**{names[k]: v for k, v in keys.items()}, "inputs": figure_inputs(w.study, w.fig, config)})


rule figure:
    input:
        notebook="notebooks/{study}/{fig}.ipynb",
        plotting=lambda w: STUDIES[w.study].plotting_file,
        figure_lib=FIGURE_LIB,
        artifacts=lambda w: figure_inputs(w.study, w.fig, config),
    output:
        png=report(
            "figures/{study}/{fig}.png",
            caption="../report/figure.rst",
            category=lambda w: STUDIES[w.study].category,
        ),
        csv="figures/{study}/{fig}.csv",
        notebook="results/notebooks/{study}/{fig}.ipynb",
    params:
        cfg=cfg("figure"),
        cfg_json=lambda w: json.dumps(rule_config("figure", config, w)),
        nb=_notebook_params,
        caption=lambda w: STUDIES[w.study].caption(config, w.fig),
    log:
        "logs/{study}/figure/{fig}.log",
    benchmark:
        "results/benchmarks/{study}/figure/{fig}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        ENV
    shell:
        # the workflow directory made absolute by the shell: as a param it would differ in a copy of
        # the workflow directory and rerun the figures
        "python -m mechrepro notebook {input.notebook} {output.notebook} --kernel python3 --no-progress-bar "
        '-p root "$PWD" -p fig_name {wildcards.fig} -y {params.nb:q} > {log} 2>&1 && '
        "python -m mechrepro record figure --config {params.cfg_json:q} --inputs {input:q} "
        "--outputs {output.png:q} {output.csv:q} {output.notebook:q} >> {log} 2>&1"
