# Study B, factual recall and fact editing: facts the model knows -> key statistics -> one job per
# layer for the 1-D patch sweep and for ROME -> summary parts facts.json / rome.json -> figures.
FACTS_R = "results/subspace_illusion"
FACTS_FIG = "figures/subspace_illusion"
FACT_LAYERS = config["facts"]["layers"]
FACT_FIGURES = ["facts_flips", "facts_null_norm", "rome_rewrite"]


wildcard_constraints:
    layer=r"\d+",
    facts_fig="|".join(FACT_FIGURES),


rule facts_dataset:
    input:
        manifest=MANIFEST,
        facts_data=config["facts"]["data_file"],
    output:
        f"{FACTS_R}/facts/data.json",
    params:
        cfg=cfg("facts_dataset"),
    log:
        "logs/facts_dataset.log",
    benchmark:
        "results/benchmarks/facts_dataset.tsv"
    threads: 2
    resources:
        mem_mb=3000,
        runtime=15,
        gpu=GPU,
    conda:
        ENV
    script:
        "../scripts/stage.py"


rule facts_key_stats:
    input:
        manifest=MANIFEST,
    output:
        expand(f"{FACTS_R}/rome/key_stats/layer{{layer}}.safetensors", layer=FACT_LAYERS),
    params:
        cfg=cfg("facts_key_stats"),
    log:
        "logs/facts_key_stats.log",
    benchmark:
        "results/benchmarks/facts_key_stats.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
        gpu=GPU,
    conda:
        ENV
    script:
        "../scripts/stage.py"


rule facts_layer:
    input:
        manifest=MANIFEST,
        data=f"{FACTS_R}/facts/data.json",
        sigma=f"{FACTS_R}/rome/key_stats/layer{{layer}}.safetensors",
    output:
        json=f"{FACTS_R}/facts/layer{{layer}}.json",
        csv=f"{FACTS_R}/facts/layer{{layer}}.csv",
        directions=f"{FACTS_R}/facts/layer{{layer}}_directions.safetensors",
    params:
        cfg=cfg("facts_layer"),
    log:
        "logs/facts_layer/{layer}.log",
    benchmark:
        "results/benchmarks/facts_layer/{layer}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
        gpu=GPU,
    conda:
        ENV
    script:
        "../scripts/stage.py"


rule rome_layer:
    input:
        manifest=MANIFEST,
        data=f"{FACTS_R}/facts/data.json",
        sigma=f"{FACTS_R}/rome/key_stats/layer{{layer}}.safetensors",
    output:
        json=f"{FACTS_R}/rome/layer{{layer}}.json",
        csv=f"{FACTS_R}/rome/layer{{layer}}.csv",
    params:
        cfg=cfg("rome_layer"),
    log:
        "logs/rome_layer/{layer}.log",
    benchmark:
        "results/benchmarks/rome_layer/{layer}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
        gpu=GPU,
    conda:
        ENV
    script:
        "../scripts/stage.py"


rule facts_summary:
    input:
        manifest=MANIFEST,
        layers=expand(f"{FACTS_R}/facts/layer{{layer}}.json", layer=FACT_LAYERS),
    output:
        f"{FACTS_R}/facts.json",
    params:
        cfg=cfg("facts_summary"),
    log:
        "logs/facts_summary.log",
    benchmark:
        "results/benchmarks/facts_summary.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    conda:
        ENV
    script:
        "../scripts/stage.py"


rule rome_summary:
    input:
        manifest=MANIFEST,
        layers=expand(f"{FACTS_R}/rome/layer{{layer}}.json", layer=FACT_LAYERS),
    output:
        f"{FACTS_R}/rome.json",
    params:
        cfg=cfg("rome_summary"),
    log:
        "logs/rome_summary.log",
    benchmark:
        "results/benchmarks/rome_summary.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    conda:
        ENV
    script:
        "../scripts/stage.py"


rule facts_figure:
    input:
        notebook="notebooks/subspace_illusion/{facts_fig}.ipynb",
        plotting="src/mechrepro/plotting_facts.py",
        reference="reference/published.yaml",
        manifest=MANIFEST,
        data=f"{FACTS_R}/facts/data.json",
        facts=f"{FACTS_R}/facts.json",
        rome=f"{FACTS_R}/rome.json",
        facts_layers=expand(f"{FACTS_R}/facts/layer{{layer}}.csv", layer=FACT_LAYERS),
        rome_layers=expand(f"{FACTS_R}/rome/layer{{layer}}.csv", layer=FACT_LAYERS),
    output:
        png=report(
            f"{FACTS_FIG}/{{facts_fig}}.png",
            caption="../report/facts_figure.rst",
            category="Study B: subspace patching illusion",
        ),
        csv=f"{FACTS_FIG}/{{facts_fig}}.csv",
        notebook="results/notebooks/subspace_illusion/{facts_fig}.ipynb",
    params:
        cfg=cfg("facts_figure"),
        cfg_json=lambda w: json.dumps(rule_config("facts_figure", config, w)),
        results=lambda w: FACTS_R,
        figures=lambda w: FACTS_FIG,
        dpi=config["figures"]["dpi"],
    log:
        "logs/facts_figure/{facts_fig}.log",
    benchmark:
        "results/benchmarks/facts_figure/{facts_fig}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        ENV
    shell:
        "python -m mechrepro notebook {input.notebook} {output.notebook} --kernel python3 --no-progress-bar "
        # absolute paths made by the shell: as params they would differ in a copy of the workflow
        # directory and rerun the figures
        '-p results_dir "$PWD/{params.results}" -p figures_dir "$PWD/{params.figures}" -p fig_name {wildcards.facts_fig} '
        "-p dpi {params.dpi} > {log} 2>&1 && "
        "python -m mechrepro record facts_figure --config {params.cfg_json:q} --inputs {input:q} "
        "--outputs {output.png:q} {output.csv:q} {output.notebook:q} >> {log} 2>&1"
