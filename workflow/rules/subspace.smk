# Study B: the subspace-patching illusion, toy and IOI parts
# (toy -> pairs -> DAS per site -> evaluation -> metrics -> figures).
# The IOI part reads Study A's circuit (results/ioi_generalization/circuit.json) for the site layer
# (config subspace.layer: auto) and the name movers.
import json

from mechrepro.pipeline import SUBSPACE_FIGURE_INPUTS, SUBSPACE_FIGURES, SUBSPACE_PARTS, SUBSPACE_RESULTS

B = SUBSPACE_RESULTS

# The template file is checked before any job runs (a missing file or a bad template stops here).
try:
    from mechrepro.subspace_ioi import load_data as _load_subspace_data

    _load_subspace_data(config["subspace_ioi"]["data_file"])
except ValueError as _err:
    sys.exit(f"Configuration error: {_err}")


wildcard_constraints:
    site="mlp|resid",
    sfig="|".join(SUBSPACE_FIGURE_INPUTS),


rule subspace_toy:
    output:
        f"{B}/toy.json",
    params:
        cfg=cfg("subspace_toy"),
    log:
        "logs/subspace_toy.log",
    benchmark:
        "results/benchmarks/subspace_toy.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    conda:
        ENV
    script:
        "../scripts/stage.py"


rule subspace_ioi_dataset:
    input:
        manifest=MANIFEST,
        templates=config["subspace_ioi"]["data_file"],
        names=config["ioi"]["data_file"],
    output:
        f"{B}/ioi_data.json",
    params:
        cfg=cfg("subspace_ioi_dataset"),
    log:
        "logs/subspace_ioi_dataset.log",
    benchmark:
        "results/benchmarks/subspace_ioi_dataset.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        ENV
    script:
        "../scripts/stage.py"


# One job per site; DAS runs on one thread (its gradient sums then do not depend on the core
# count), so the two sites train side by side.
rule subspace_ioi_das:
    input:
        manifest=MANIFEST,
        data=f"{B}/ioi_data.json",
        circuit=f"{RESULTS}/circuit.json",
    output:
        direction=f"{B}/das/{{site}}.safetensors",
        json=f"{B}/das/{{site}}.json",
    params:
        cfg=cfg("subspace_ioi_das"),
    log:
        "logs/subspace_ioi_das/{site}.log",
    benchmark:
        "results/benchmarks/subspace_ioi_das/{site}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=GPU,
    conda:
        ENV
    script:
        "../scripts/stage.py"


rule subspace_ioi_eval:
    input:
        manifest=MANIFEST,
        data=f"{B}/ioi_data.json",
        circuit=f"{RESULTS}/circuit.json",
        das=expand(f"{B}/das/{{site}}.safetensors", site=["mlp", "resid"]),
    output:
        ioi=f"{B}/ioi.json",
        directions=f"{B}/directions.safetensors",
        pairs=f"{B}/ioi_pairs.csv",
        projections=f"{B}/ioi_projections.csv",
        dormant=f"{B}/ioi_dormant.csv",
    params:
        cfg=cfg("subspace_ioi_eval"),
    log:
        "logs/subspace_ioi_eval.log",
    benchmark:
        "results/benchmarks/subspace_ioi_eval.tsv"
    threads: 2
    resources:
        mem_mb=6000,
        runtime=60,
        gpu=GPU,
    conda:
        ENV
    script:
        "../scripts/stage.py"


rule subspace_metrics:
    input:
        manifest=MANIFEST,
        parts=SUBSPACE_PARTS,
    output:
        f"{B}/metrics.json",
    params:
        cfg=cfg("subspace_metrics"),
    log:
        "logs/subspace_metrics.log",
    benchmark:
        "results/benchmarks/subspace_metrics.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    conda:
        ENV
    script:
        "../scripts/stage.py"


# One papermill notebook per figure (notebooks/subspace_illusion/, built by
# notebooks/build_subspace_notebooks.py); then the provenance sidecars of its outputs.
rule subspace_figure:
    input:
        notebook="notebooks/subspace_illusion/{sfig}.ipynb",
        plotting="src/mechrepro/plotting_subspace.py",
        artifacts=lambda w: SUBSPACE_FIGURE_INPUTS[w.sfig],
    output:
        png=report(
            f"{SUBSPACE_FIGURES}/{{sfig}}.png",
            caption="../report/subspace_figure.rst",
            category="Study B: subspace-patching illusion",
        ),
        csv=f"{SUBSPACE_FIGURES}/{{sfig}}.csv",
        notebook="results/notebooks/subspace_illusion/{sfig}.ipynb",
    params:
        cfg=cfg("subspace_figure"),
        cfg_json=lambda w: json.dumps(rule_config("subspace_figure", config, w)),
        results=lambda w: B,
        figures=lambda w, output: os.path.dirname(output.png),
        reference=lambda w: "reference/published.yaml",
        dpi=config["figures"]["dpi"],
    log:
        "logs/subspace_figure/{sfig}.log",
    benchmark:
        "results/benchmarks/subspace_figure/{sfig}.tsv"
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
        '-p results_dir "$PWD/{params.results}" -p figures_dir "$PWD/{params.figures}" -p fig_name {wildcards.sfig} '
        '-p reference_file "$PWD/{params.reference}" -p dpi {params.dpi} > {log} 2>&1 && '
        "python -m mechrepro record subspace_figure --config {params.cfg_json:q} --inputs {input:q} "
        "--outputs {output.png:q} {output.csv:q} {output.notebook:q} >> {log} 2>&1"
