# Study B: the subspace-patching illusion. Toy and IOI parts (toy -> pairs -> DAS per site ->
# evaluation); factual recall and fact editing (facts the model knows -> key statistics -> one job per
# layer for the 1-D patch sweep and for ROME -> summaries); all parts merge into metrics.json.
# The IOI part reads Study A's circuit for the site layer (config subspace.layer: auto) and the name
# movers. Stage functions: mechrepro.studies.subspace_illusion.stages.
from mechrepro.studies.subspace_illusion.checks import corpus_file

B = STUDIES["subspace_illusion"].results
CIRCUIT = f"{STUDIES['ioi_generalization'].results}/circuit.json"
FACT_LAYERS = config["facts"]["layers"]
ROME_LAYERS = config["rome"]["layers"]  # a subset of FACT_LAYERS (checked)
# metrics.json merges these part files: every top-level key of each is copied in.
SUBSPACE_PARTS = [f"{B}/toy.json", f"{B}/ioi.json", f"{B}/facts.json", f"{B}/rome.json"]


wildcard_constraints:
    site="mlp|resid",


rule subspace_toy:
    output:
        f"{B}/toy.json",
    log:
        "logs/subspace_illusion/subspace_toy.log",
    benchmark:
        "results/benchmarks/subspace_illusion/subspace_toy.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        cfg=cfg("subspace_toy"),
    script:
        "../scripts/stage.py"


rule subspace_ioi_dataset:
    input:
        manifest=MANIFEST,
        templates=config["subspace_ioi"]["data_file"],
        names=config["ioi"]["data_file"],
    output:
        f"{B}/ioi_data.json",
    log:
        "logs/subspace_illusion/subspace_ioi_dataset.log",
    benchmark:
        "results/benchmarks/subspace_illusion/subspace_ioi_dataset.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        cfg=cfg("subspace_ioi_dataset"),
    script:
        "../scripts/stage.py"


# One job per site; DAS runs on one thread (its gradient sums then do not depend on the core
# count), so the two sites train side by side.
rule subspace_ioi_das:
    input:
        manifest=MANIFEST,
        data=f"{B}/ioi_data.json",
        circuit=CIRCUIT,
    output:
        direction=f"{B}/das/{{site}}.safetensors",
        json=f"{B}/das/{{site}}.json",
    log:
        "logs/subspace_illusion/subspace_ioi_das/{site}.log",
    benchmark:
        "results/benchmarks/subspace_illusion/subspace_ioi_das/{site}.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=GPU,
    params:
        cfg=cfg("subspace_ioi_das"),
    script:
        "../scripts/stage.py"


rule subspace_ioi_eval:
    input:
        manifest=MANIFEST,
        data=f"{B}/ioi_data.json",
        circuit=CIRCUIT,
        das=expand(f"{B}/das/{{site}}.safetensors", site=["mlp", "resid"]),
    output:
        ioi=f"{B}/ioi.json",
        directions=f"{B}/directions.safetensors",
        pairs=f"{B}/ioi_pairs.csv",
        projections=f"{B}/ioi_projections.csv",
        dormant=f"{B}/ioi_dormant.csv",
    log:
        "logs/subspace_illusion/subspace_ioi_eval.log",
    benchmark:
        "results/benchmarks/subspace_illusion/subspace_ioi_eval.tsv"
    conda:
        ENV
    threads: 2
    resources:
        mem_mb=6000,
        runtime=60,
        gpu=GPU,
    params:
        cfg=cfg("subspace_ioi_eval"),
    script:
        "../scripts/stage.py"


rule subspace_metrics:
    input:
        manifest=MANIFEST,
        parts=SUBSPACE_PARTS,
    output:
        f"{B}/metrics.json",
    log:
        "logs/subspace_illusion/subspace_metrics.log",
    benchmark:
        "results/benchmarks/subspace_illusion/subspace_metrics.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        cfg=cfg("subspace_metrics"),
    script:
        "../scripts/stage.py"


wildcard_constraints:
    layer=r"\d+",


rule facts_dataset:
    input:
        manifest=MANIFEST,
        facts_data=config["facts"]["data_file"],
        counterfact=config["facts"]["counterfact_file"] or [],  # optional: "" = none
    output:
        f"{B}/facts/data.json",
    log:
        "logs/subspace_illusion/facts_dataset.log",
    benchmark:
        "results/benchmarks/subspace_illusion/facts_dataset.tsv"
    conda:
        ENV
    threads: 2
    resources:
        mem_mb=3000,
        runtime=15,
        gpu=GPU,
    params:
        cfg=cfg("facts_dataset"),
    script:
        "../scripts/stage.py"


rule facts_key_stats:
    input:
        manifest=MANIFEST,
        corpus=corpus_file(config),  # the corpus file (none for stdlib_docs)
    output:
        expand(f"{B}/rome/key_stats/layer{{layer}}.safetensors", layer=FACT_LAYERS),
    log:
        "logs/subspace_illusion/facts_key_stats.log",
    benchmark:
        "results/benchmarks/subspace_illusion/facts_key_stats.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
        gpu=GPU,
    params:
        cfg=cfg("facts_key_stats"),
    script:
        "../scripts/stage.py"


rule facts_layer:
    input:
        manifest=MANIFEST,
        data=f"{B}/facts/data.json",
        sigma=f"{B}/rome/key_stats/layer{{layer}}.safetensors",
    output:
        json=f"{B}/facts/layer{{layer}}.json",
        csv=f"{B}/facts/layer{{layer}}.csv",
        directions=f"{B}/facts/layer{{layer}}_directions.safetensors",
    log:
        "logs/subspace_illusion/facts_layer/{layer}.log",
    benchmark:
        "results/benchmarks/subspace_illusion/facts_layer/{layer}.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
        gpu=GPU,
    params:
        cfg=cfg("facts_layer"),
    script:
        "../scripts/stage.py"


rule rome_layer:
    input:
        manifest=MANIFEST,
        data=f"{B}/facts/data.json",
        sigma=f"{B}/rome/key_stats/layer{{layer}}.safetensors",
    output:
        json=f"{B}/rome/layer{{layer}}.json",
        csv=f"{B}/rome/layer{{layer}}.csv",
    log:
        "logs/subspace_illusion/rome_layer/{layer}.log",
    benchmark:
        "results/benchmarks/subspace_illusion/rome_layer/{layer}.tsv"
    # The longest jobs of the study (ROME's value step: about 25-40 CPU-s per edit), so they start
    # first and the facts sweep's shorter jobs fill the other core.
    priority: 10
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
        gpu=GPU,
    params:
        cfg=cfg("rome_layer"),
    script:
        "../scripts/stage.py"


rule facts_summary:
    input:
        manifest=MANIFEST,
        data=f"{B}/facts/data.json",
        layers=expand(f"{B}/facts/layer{{layer}}.json", layer=FACT_LAYERS),
    output:
        f"{B}/facts.json",
    log:
        "logs/subspace_illusion/facts_summary.log",
    benchmark:
        "results/benchmarks/subspace_illusion/facts_summary.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        cfg=cfg("facts_summary"),
    script:
        "../scripts/stage.py"


rule rome_summary:
    input:
        manifest=MANIFEST,
        layers=expand(f"{B}/rome/layer{{layer}}.json", layer=ROME_LAYERS),
    output:
        f"{B}/rome.json",
    log:
        "logs/subspace_illusion/rome_summary.log",
    benchmark:
        "results/benchmarks/subspace_illusion/rome_summary.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        cfg=cfg("rome_summary"),
    script:
        "../scripts/stage.py"
