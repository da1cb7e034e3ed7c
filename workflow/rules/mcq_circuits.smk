# Study C: multiple-choice "correct letter" circuits (model -> datasets -> accuracy -> DLA, patching,
# head categories -> low rank -> mutations -> metrics). Stage functions: mechrepro.studies.mcq_circuits.stages.
from mechrepro.studies.mcq_circuits import model_dir as _mcq_model_dir

MCQ_RESULTS = STUDIES["mcq_circuits"].results
MCQ_MANIFEST = f"{_mcq_model_dir(config['mcq']['model'])}/manifest.json"
MCQ_LABEL_SETS = config["mcq"]["label_sets"]
MCQ_KEY_SETS = [s for s in ("abcd", "random_letters") if s in MCQ_LABEL_SETS]  # keys scatter of the low-rank figure


wildcard_constraints:
    labels="|".join(MCQ_LABEL_SETS),


rule mcq_model:
    output:
        manifest=MCQ_MANIFEST,
        training=f"{MCQ_RESULTS}/organism.json",
    params:
        cfg=cfg("mcq_model"),
    log:
        "logs/mcq_circuits/mcq_model.log",
    benchmark:
        "results/benchmarks/mcq_circuits/mcq_model.tsv"
    threads: 1  # small matrices: one thread is faster than two, and much faster on a shared machine
    resources:
        mem_mb=3000,
        runtime=60,
        gpu=GPU,
    conda:
        ENV
    script:
        "../scripts/stage.py"


rule mcq_dataset:
    input:
        manifest=MCQ_MANIFEST,
    output:
        f"{MCQ_RESULTS}/data/{{labels}}.json",
    params:
        cfg=cfg("mcq_dataset"),
    log:
        "logs/mcq_circuits/mcq_dataset/{labels}.log",
    benchmark:
        "results/benchmarks/mcq_circuits/mcq_dataset/{labels}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        ENV
    script:
        "../scripts/stage.py"


rule mcq_accuracy:
    input:
        manifest=MCQ_MANIFEST,
        data=f"{MCQ_RESULTS}/data/{{labels}}.json",
    output:
        csv=f"{MCQ_RESULTS}/accuracy/{{labels}}.csv",
        json=f"{MCQ_RESULTS}/accuracy/{{labels}}.json",
    params:
        cfg=cfg("mcq_accuracy"),
    log:
        "logs/mcq_circuits/mcq_accuracy/{labels}.log",
    benchmark:
        "results/benchmarks/mcq_circuits/mcq_accuracy/{labels}.tsv"
    threads: 1
    resources:
        mem_mb=3000,
        runtime=20,
        gpu=GPU,
    conda:
        ENV
    script:
        "../scripts/stage.py"


rule mcq_dla:
    input:
        manifest=MCQ_MANIFEST,
        data=f"{MCQ_RESULTS}/data/abcd.json",
        accuracy=f"{MCQ_RESULTS}/accuracy/abcd.csv",
    output:
        csv=f"{MCQ_RESULTS}/dla.csv",
        json=f"{MCQ_RESULTS}/dla.json",
    params:
        cfg=cfg("mcq_dla"),
    log:
        "logs/mcq_circuits/mcq_dla.log",
    benchmark:
        "results/benchmarks/mcq_circuits/mcq_dla.tsv"
    threads: 1
    resources:
        mem_mb=3000,
        runtime=20,
        gpu=GPU,
    conda:
        ENV
    script:
        "../scripts/stage.py"


rule mcq_patching:
    input:
        manifest=MCQ_MANIFEST,
        data=f"{MCQ_RESULTS}/data/abcd.json",
        accuracy=f"{MCQ_RESULTS}/accuracy/abcd.csv",
    output:
        csv=f"{MCQ_RESULTS}/patching.csv",
        json=f"{MCQ_RESULTS}/patching.json",
    params:
        cfg=cfg("mcq_patching"),
    log:
        "logs/mcq_circuits/mcq_patching.log",
    benchmark:
        "results/benchmarks/mcq_circuits/mcq_patching.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=GPU,
    conda:
        ENV
    script:
        "../scripts/stage.py"


rule mcq_heads:
    input:
        manifest=MCQ_MANIFEST,
        data=f"{MCQ_RESULTS}/data/abcd.json",
        accuracy=f"{MCQ_RESULTS}/accuracy/abcd.csv",
        dla=f"{MCQ_RESULTS}/dla.csv",
    output:
        csv=f"{MCQ_RESULTS}/heads.csv",
        json=f"{MCQ_RESULTS}/heads.json",
    params:
        cfg=cfg("mcq_heads"),
    log:
        "logs/mcq_circuits/mcq_heads.log",
    benchmark:
        "results/benchmarks/mcq_circuits/mcq_heads.tsv"
    threads: 1
    resources:
        mem_mb=3000,
        runtime=20,
        gpu=GPU,
    conda:
        ENV
    script:
        "../scripts/stage.py"


rule mcq_low_rank:
    input:
        manifest=MCQ_MANIFEST,
        data=f"{MCQ_RESULTS}/data/abcd.json",
        accuracy=f"{MCQ_RESULTS}/accuracy/abcd.csv",
        heads=f"{MCQ_RESULTS}/heads.csv",
        keys_data=[f"{MCQ_RESULTS}/data/{s}.json" for s in MCQ_KEY_SETS],
    output:
        json=f"{MCQ_RESULTS}/low_rank.json",
        key_scatter=f"{MCQ_RESULTS}/low_rank_keys.csv",
        basis=f"{MCQ_RESULTS}/low_rank_basis.safetensors",
    params:
        cfg=cfg("mcq_low_rank"),
    log:
        "logs/mcq_circuits/mcq_low_rank.log",
    benchmark:
        "results/benchmarks/mcq_circuits/mcq_low_rank.tsv"
    threads: 1
    resources:
        mem_mb=3000,
        runtime=30,
        gpu=GPU,
    conda:
        ENV
    script:
        "../scripts/stage.py"


rule mcq_mutations:
    input:
        manifest=MCQ_MANIFEST,
        data=f"{MCQ_RESULTS}/data/{{labels}}.json",
        accuracy=f"{MCQ_RESULTS}/accuracy/abcd.csv",
        low_rank=f"{MCQ_RESULTS}/low_rank.json",
        basis=f"{MCQ_RESULTS}/low_rank_basis.safetensors",
    output:
        f"{MCQ_RESULTS}/mutations/{{labels}}.json",
    params:
        cfg=cfg("mcq_mutations"),
    log:
        "logs/mcq_circuits/mcq_mutations/{labels}.log",
    benchmark:
        "results/benchmarks/mcq_circuits/mcq_mutations/{labels}.tsv"
    threads: 1
    resources:
        mem_mb=3000,
        runtime=20,
        gpu=GPU,
    conda:
        ENV
    script:
        "../scripts/stage.py"


rule mcq_metrics:
    input:
        manifest=MCQ_MANIFEST,
        training=f"{MCQ_RESULTS}/organism.json",
        accuracy=expand(f"{MCQ_RESULTS}/accuracy/{{labels}}.json", labels=MCQ_LABEL_SETS),
        mutations=expand(f"{MCQ_RESULTS}/mutations/{{labels}}.json", labels=MCQ_LABEL_SETS),
        dla=f"{MCQ_RESULTS}/dla.csv",
        dla_json=f"{MCQ_RESULTS}/dla.json",
        patching=f"{MCQ_RESULTS}/patching.csv",
        heads=f"{MCQ_RESULTS}/heads.csv",
        low_rank=f"{MCQ_RESULTS}/low_rank.json",
    output:
        f"{MCQ_RESULTS}/metrics.json",
    params:
        cfg=cfg("mcq_metrics"),
    log:
        "logs/mcq_circuits/mcq_metrics.log",
    benchmark:
        "results/benchmarks/mcq_circuits/mcq_metrics.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    conda:
        ENV
    script:
        "../scripts/stage.py"
