# Study A: IOI circuit generalization (datasets -> inference -> circuit -> evaluation -> metrics).


wildcard_constraints:
    variant="base|double_io|triple_io",


rule ioi_dataset:
    input:
        manifest=MANIFEST,
        data=config["ioi"]["data_file"],
    output:
        f"{RESULTS}/data/{{variant}}.json",
    params:
        cfg=cfg("ioi_dataset"),
    log:
        "logs/ioi_dataset/{variant}.log",
    benchmark:
        "results/benchmarks/ioi_dataset/{variant}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        ENV
    script:
        "../scripts/stage.py"


rule ioi_inference:
    input:
        manifest=MANIFEST,
        data=f"{RESULTS}/data/{{variant}}.json",
    output:
        csv=f"{RESULTS}/inference/{{variant}}.csv",
        json=f"{RESULTS}/inference/{{variant}}.json",
    params:
        cfg=cfg("ioi_inference"),
    log:
        "logs/ioi_inference/{variant}.log",
    benchmark:
        "results/benchmarks/ioi_inference/{variant}.tsv"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=20,
        gpu=GPU,
    conda:
        ENV
    script:
        "../scripts/stage.py"


rule ioi_circuit:
    input:
        manifest=MANIFEST,
        data=f"{RESULTS}/data/base.json",
        reference="reference/published.yaml",
    output:
        circuit=f"{RESULTS}/circuit.json",
        scores=f"{RESULTS}/circuit_scores.csv",
    params:
        cfg=cfg("ioi_circuit"),
    log:
        "logs/ioi_circuit.log",
    benchmark:
        "results/benchmarks/ioi_circuit.tsv"
    threads: 2
    resources:
        mem_mb=6000,
        runtime=60,
        gpu=GPU,
    conda:
        ENV
    script:
        "../scripts/stage.py"


rule ioi_evaluate:
    input:
        manifest=MANIFEST,
        data=f"{RESULTS}/data/{{variant}}.json",
        circuit=f"{RESULTS}/circuit.json",
    output:
        summary=f"{RESULTS}/eval/{{variant}}.json",
        prompts=f"{RESULTS}/eval/{{variant}}_prompts.csv",
        attention=f"{RESULTS}/eval/{{variant}}_attention.csv",
    params:
        cfg=cfg("ioi_evaluate"),
    log:
        "logs/ioi_evaluate/{variant}.log",
    benchmark:
        "results/benchmarks/ioi_evaluate/{variant}.tsv"
    threads: 2
    resources:
        mem_mb=6000,
        runtime=60,
        gpu=GPU,
    conda:
        ENV
    script:
        "../scripts/stage.py"


rule ioi_value_paths:
    input:
        manifest=MANIFEST,
        circuit=f"{RESULTS}/circuit.json",
        data=[f"{RESULTS}/data/{v}.json" for v in VARIANTS if v in ("base", "double_io")],
    output:
        f"{RESULTS}/value_paths.csv",
    params:
        cfg=cfg("ioi_value_paths"),
    log:
        "logs/ioi_value_paths.log",
    benchmark:
        "results/benchmarks/ioi_value_paths.tsv"
    threads: 2
    resources:
        mem_mb=6000,
        runtime=60,
        gpu=GPU,
    conda:
        ENV
    script:
        "../scripts/stage.py"


rule ioi_head_patching:
    input:
        manifest=MANIFEST,
        data=f"{RESULTS}/data/base.json",
    output:
        csv=f"{RESULTS}/head_patching.csv",
        json=f"{RESULTS}/head_patching.json",
    params:
        cfg=cfg("ioi_head_patching"),
    log:
        "logs/ioi_head_patching.log",
    benchmark:
        "results/benchmarks/ioi_head_patching.tsv"
    threads: 2
    resources:
        mem_mb=6000,
        runtime=30,
        gpu=GPU,
    conda:
        ENV
    script:
        "../scripts/stage.py"


rule ioi_metrics:
    input:
        manifest=MANIFEST,
        circuit=f"{RESULTS}/circuit.json",
        evals=expand(f"{RESULTS}/eval/{{variant}}.json", variant=VARIANTS),
        inference=expand(f"{RESULTS}/inference/{{variant}}.json", variant=VARIANTS),
    output:
        f"{RESULTS}/metrics.json",
    params:
        cfg=cfg("ioi_metrics"),
    log:
        "logs/ioi_metrics.log",
    benchmark:
        "results/benchmarks/ioi_metrics.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    conda:
        ENV
    script:
        "../scripts/stage.py"
