# One rule draws every figure of every study: papermill runs notebooks/{study}/{fig}.ipynb, which
# only reads the figure's declared inputs (mechrepro.studies: Figure.inputs) and draws; then the
# rule writes a provenance sidecar for each output (the notebook does not know the rule's inputs).
import json

from mechrepro.workflow.figures import FIGURE_LIB


wildcard_constraints:
    study="|".join(STUDIES),
    fig="|".join(sorted({f for s in STUDIES.values() for f in s.figures})),


def _notebook_params(w):
    """Notebook parameters: the dpi and the figure's own config keys (by their parameter names)."""
    keys = rule_config("figure", config, w)
    names = {"figures.dpi": "dpi", **STUDIES[w.study].figures[w.fig].params}
    return json.dumps({names[k]: v for k, v in keys.items()})


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
        # absolute paths made by the shell: as params they would differ in a copy of the workflow
        # directory and rerun the figures
        "python -m mechrepro notebook {input.notebook} {output.notebook} --kernel python3 --no-progress-bar "
        '-p results_dir "$PWD/results/{wildcards.study}" -p figures_dir "$PWD/figures/{wildcards.study}" '
        '-p fig_name {wildcards.fig} -p reference_file "$PWD/reference/published.yaml" '
        "-y {params.nb:q} > {log} 2>&1 && "
        "python -m mechrepro record figure --config {params.cfg_json:q} --inputs {input:q} "
        "--outputs {output.png:q} {output.csv:q} {output.notebook:q} >> {log} 2>&1"
