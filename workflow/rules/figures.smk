# One rule draws every figure of every study: papermill runs notebooks/{study}/{fig}.ipynb, which
# reads only the figure's declared inputs (mechrepro.studies: Figure.inputs; passed to the notebook
# as `inputs`, its Artifacts refuse any other file) and draws; then the rule writes a provenance
# sidecar for each output. Before papermill, `python -m mechrepro preflight` refuses damaged inputs
# and removes the outputs' old sidecars (a failed notebook leaves neither figure nor sidecar).
import json

from mechrepro.workflow.figures import FIGURE_LIB
from mechrepro.workflow.pipeline import notebook_params


wildcard_constraints:
    study="|".join(STUDIES),
    fig="|".join(sorted({f for s in STUDIES.values() for f in s.figures})),


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
    log:
        "logs/{study}/figure/{fig}.log",
    benchmark:
        "results/benchmarks/{study}/figure/{fig}.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        cfg=cfg("figure"),
        cfg_json=lambda w: json.dumps(rule_config("figure", config, w)),
        nb=lambda w: json.dumps(notebook_params(w.study, w.fig, config)),
        caption=lambda w: STUDIES[w.study].caption(config, w.fig),
    shell:
        # the workflow directory made absolute by the shell: as a param it would differ in a copy of
        # the workflow directory and rerun the figures
        "python -m mechrepro preflight --inputs {input:q} --outputs {output:q} && "
        "python -m mechrepro notebook {input.notebook} {output.notebook} --kernel python3 --no-progress-bar "
        '-p root "$PWD" -p fig_name {wildcards.fig} -y {params.nb:q} > {log} 2>&1 && '
        "python -m mechrepro record figure --config {params.cfg_json:q} --inputs {input:q} "
        "--outputs {output.png:q} {output.csv:q} {output.notebook:q} >> {log} 2>&1"
