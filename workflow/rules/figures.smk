# One papermill notebook per figure. Notebooks only read artifacts and draw; the rule then writes
# a provenance sidecar for each output (the notebook does not know the rule's inputs).
import json

# Notebook parameter of each figure config key (a job passes only the keys it reads).
NB_PARAM = {"figures.dpi": "dpi", "figures.n_attention_samples": "n_samples"}


rule ioi_figure:
    input:
        notebook="notebooks/ioi_generalization/{fig}.ipynb",
        plotting="src/mechrepro/plotting.py",
        metrics=f"{RESULTS}/metrics.json",
        circuit=f"{RESULTS}/circuit.json",
        scores=f"{RESULTS}/circuit_scores.csv",
        value_paths=f"{RESULTS}/value_paths.csv",
        head_patching=f"{RESULTS}/head_patching.csv",
        head_patching_summary=f"{RESULTS}/head_patching.json",
        evals=expand(f"{RESULTS}/eval/{{variant}}.json", variant=VARIANTS),
        attention=expand(f"{RESULTS}/eval/{{variant}}_attention.csv", variant=VARIANTS),
        prompts=expand(f"{RESULTS}/eval/{{variant}}_prompts.csv", variant=VARIANTS),
    output:
        png=report(
            f"{FIGURES}/{{fig}}.png",
            caption="../report/figure.rst",
            category="Study A: IOI circuit generalization",
        ),
        csv=f"{FIGURES}/{{fig}}.csv",
        notebook="results/notebooks/{fig}.ipynb",
    params:
        cfg=cfg("ioi_figure"),
        cfg_json=lambda w: json.dumps(rule_config("ioi_figure", config, w)),
        results=lambda w: RESULTS,
        figures=lambda w: FIGURES,
        nb=lambda w: json.dumps({NB_PARAM[k]: v for k, v in rule_config("ioi_figure", config, w).items()}),
    log:
        "logs/ioi_figure/{fig}.log",
    benchmark:
        "results/benchmarks/ioi_figure/{fig}.tsv"
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
        '-p results_dir "$PWD/{params.results}" -p figures_dir "$PWD/{params.figures}" -p fig_name {wildcards.fig} '
        "-y {params.nb:q} > {log} 2>&1 && "
        "python -m mechrepro record ioi_figure --config {params.cfg_json:q} --inputs {input:q} "
        "--outputs {output.png:q} {output.csv:q} {output.notebook:q} >> {log} 2>&1"
