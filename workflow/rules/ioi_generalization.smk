# Study A: IOI circuit generalization (datasets -> inference -> circuit -> evaluation -> metrics).
# Stage functions: mechrepro.studies.ioi_generalization.stages; figures: the generic figure rule.
IOI_RESULTS = STUDIES["ioi_generalization"].results
VARIANTS = config["ioi"]["variants"]
MECHANISM_VARIANTS = [v for v in VARIANTS if v in ("double_io", "triple_io")]


wildcard_constraints:
    variant="base|double_io|triple_io",


rule ioi_dataset:
    input:
        manifest=MANIFEST,
        data=config["ioi"]["data_file"],
    output:
        f"{IOI_RESULTS}/data/{{variant}}.json",
    log:
        "logs/ioi_generalization/ioi_dataset/{variant}.log",
    benchmark:
        "results/benchmarks/ioi_generalization/ioi_dataset/{variant}.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        cfg=cfg("ioi_dataset"),
    script:
        "../scripts/stage.py"


rule ioi_split:
    input:
        manifest=MANIFEST,
        data=config["ioi"]["data_file"],
        eval=f"{IOI_RESULTS}/data/base.json",
    output:
        f"{IOI_RESULTS}/data/discovery.json",
    log:
        "logs/ioi_generalization/ioi_split.log",
    benchmark:
        "results/benchmarks/ioi_generalization/ioi_split.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        cfg=cfg("ioi_split"),
    script:
        "../scripts/stage.py"


rule ioi_means:
    input:
        manifest=MANIFEST,
        data=config["ioi"]["data_file"],
    output:
        f"{IOI_RESULTS}/means/{{variant}}.safetensors",
    log:
        "logs/ioi_generalization/ioi_means/{variant}.log",
    benchmark:
        "results/benchmarks/ioi_generalization/ioi_means/{variant}.tsv"
    conda:
        ENV
    threads: 2
    resources:
        mem_mb=4000,
        runtime=20,
        gpu=GPU,
    params:
        cfg=cfg("ioi_means"),
    script:
        "../scripts/stage.py"


rule ioi_inference:
    input:
        manifest=MANIFEST,
        data=f"{IOI_RESULTS}/data/{{variant}}.json",
    output:
        csv=f"{IOI_RESULTS}/inference/{{variant}}.csv",
        json=f"{IOI_RESULTS}/inference/{{variant}}.json",
    log:
        "logs/ioi_generalization/ioi_inference/{variant}.log",
    benchmark:
        "results/benchmarks/ioi_generalization/ioi_inference/{variant}.tsv"
    conda:
        ENV
    threads: 2
    resources:
        mem_mb=4000,
        runtime=20,
        gpu=GPU,
    params:
        cfg=cfg("ioi_inference"),
    script:
        "../scripts/stage.py"


rule ioi_circuit:
    input:
        manifest=MANIFEST,
        data=f"{IOI_RESULTS}/data/discovery.json",
        means=f"{IOI_RESULTS}/means/base.safetensors",
        reference="reference/published.yaml",
    output:
        circuit=f"{IOI_RESULTS}/circuit.json",
        scores=f"{IOI_RESULTS}/circuit_scores.csv",
        curve=f"{IOI_RESULTS}/circuit_curve.csv",
    log:
        "logs/ioi_generalization/ioi_circuit.log",
    benchmark:
        "results/benchmarks/ioi_generalization/ioi_circuit.tsv"
    conda:
        ENV
    threads: 2
    resources:
        mem_mb=6000,
        runtime=60,
        gpu=GPU,
    params:
        cfg=cfg("ioi_circuit"),
    script:
        "../scripts/stage.py"


rule ioi_evaluate:
    input:
        manifest=MANIFEST,
        data=f"{IOI_RESULTS}/data/{{variant}}.json",
        means=f"{IOI_RESULTS}/means/{{variant}}.safetensors",
        circuit=f"{IOI_RESULTS}/circuit.json",
    output:
        summary=f"{IOI_RESULTS}/eval/{{variant}}.json",
        prompts=f"{IOI_RESULTS}/eval/{{variant}}_prompts.csv",
        attention=f"{IOI_RESULTS}/eval/{{variant}}_attention.csv",
    log:
        "logs/ioi_generalization/ioi_evaluate/{variant}.log",
    benchmark:
        "results/benchmarks/ioi_generalization/ioi_evaluate/{variant}.tsv"
    conda:
        ENV
    threads: 2
    resources:
        mem_mb=6000,
        runtime=60,
        gpu=GPU,
    params:
        cfg=cfg("ioi_evaluate"),
    script:
        "../scripts/stage.py"


rule ioi_value_paths:
    input:
        manifest=MANIFEST,
        circuit=f"{IOI_RESULTS}/circuit.json",
        data=[f"{IOI_RESULTS}/data/{v}.json" for v in VARIANTS if v in ("base", "double_io")],
    output:
        f"{IOI_RESULTS}/value_paths.csv",
    log:
        "logs/ioi_generalization/ioi_value_paths.log",
    benchmark:
        "results/benchmarks/ioi_generalization/ioi_value_paths.tsv"
    conda:
        ENV
    threads: 2
    resources:
        mem_mb=6000,
        runtime=60,
        gpu=GPU,
    params:
        cfg=cfg("ioi_value_paths"),
    script:
        "../scripts/stage.py"


rule ioi_head_patching:
    input:
        manifest=MANIFEST,
        data=f"{IOI_RESULTS}/data/base.json",
    output:
        csv=f"{IOI_RESULTS}/head_patching.csv",
        json=f"{IOI_RESULTS}/head_patching.json",
    log:
        "logs/ioi_generalization/ioi_head_patching.log",
    benchmark:
        "results/benchmarks/ioi_generalization/ioi_head_patching.tsv"
    conda:
        ENV
    threads: 2
    resources:
        mem_mb=6000,
        runtime=30,
        gpu=GPU,
    params:
        cfg=cfg("ioi_head_patching"),
    script:
        "../scripts/stage.py"


rule ioi_mechanism:
    input:
        manifest=MANIFEST,
        circuit=f"{IOI_RESULTS}/circuit.json",
        base_inference=f"{IOI_RESULTS}/inference/base.json",
        data=[f"{IOI_RESULTS}/data/{v}.json" for v in MECHANISM_VARIANTS],
        means=[f"{IOI_RESULTS}/means/{v}.safetensors" for v in MECHANISM_VARIANTS],
    output:
        summary=f"{IOI_RESULTS}/mechanism.json",
        runs=f"{IOI_RESULTS}/mechanism_runs.csv",
    log:
        "logs/ioi_generalization/ioi_mechanism.log",
    benchmark:
        "results/benchmarks/ioi_generalization/ioi_mechanism.tsv"
    conda:
        ENV
    threads: 2
    resources:
        mem_mb=6000,
        runtime=60,
        gpu=GPU,
    params:
        cfg=cfg("ioi_mechanism"),
    script:
        "../scripts/stage.py"


rule ioi_metrics:
    input:
        manifest=MANIFEST,
        circuit=f"{IOI_RESULTS}/circuit.json",
        mechanism=f"{IOI_RESULTS}/mechanism.json",
        evals=expand(f"{IOI_RESULTS}/eval/{{variant}}.json", variant=VARIANTS),
        inference=expand(f"{IOI_RESULTS}/inference/{{variant}}.json", variant=VARIANTS),
    output:
        f"{IOI_RESULTS}/metrics.json",
    log:
        "logs/ioi_generalization/ioi_metrics.log",
    benchmark:
        "results/benchmarks/ioi_generalization/ioi_metrics.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        cfg=cfg("ioi_metrics"),
    script:
        "../scripts/stage.py"
