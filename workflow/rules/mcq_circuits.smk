# Study C: multiple-choice "correct letter" circuits (model -> datasets -> accuracy -> DLA, patching,
# head categories -> correct-letter checks -> low rank -> mutations -> metrics). Stage functions: mechrepro.studies.mcq_circuits.stages.
from mechrepro.studies.mcq_circuits import model_dir as _mcq_model_dir

MCQ_RESULTS = STUDIES["mcq_circuits"].results
MCQ_MANIFEST = f"{_mcq_model_dir(config['mcq']['model'])}/manifest.json"
MCQ_LABEL_SETS = config["mcq"]["label_sets"]
MCQ_KEY_SETS = [s for s in ("abcd", "random_letters") if s in MCQ_LABEL_SETS]  # keys scatter of the low-rank figure
# the correct-letter checks need random letters (without them no head can pass)
MCQ_RANDOM_LETTERS = [f"{MCQ_RESULTS}/data/random_letters.json" for s in MCQ_KEY_SETS if s == "random_letters"]


wildcard_constraints:
    labels="|".join(MCQ_LABEL_SETS),


rule mcq_model:
    output:
        manifest=MCQ_MANIFEST,
        weights=model_weights(config["mcq"]["model"], _mcq_model_dir(config["mcq"]["model"])),
        training=f"{MCQ_RESULTS}/organism.json",
    log:
        "logs/mcq_circuits/mcq_model.log",
    benchmark:
        "results/benchmarks/mcq_circuits/mcq_model.tsv"
    conda:
        ENV
    threads: 2  # d_model 256, 4 layers: the training step's matrices use both cores
    resources:
        mem_mb=3000,
        runtime=60,
        gpu=GPU,
    params:
        cfg=cfg("mcq_model"),
    script:
        "../scripts/stage.py"


rule mcq_dataset:
    input:
        manifest=MCQ_MANIFEST,
    output:
        f"{MCQ_RESULTS}/data/{{labels}}.json",
    log:
        "logs/mcq_circuits/mcq_dataset/{labels}.log",
    benchmark:
        "results/benchmarks/mcq_circuits/mcq_dataset/{labels}.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        cfg=cfg("mcq_dataset"),
    script:
        "../scripts/stage.py"


rule mcq_accuracy:
    input:
        manifest=MCQ_MANIFEST,
        data=f"{MCQ_RESULTS}/data/{{labels}}.json",
    output:
        csv=f"{MCQ_RESULTS}/accuracy/{{labels}}.csv",
        json=f"{MCQ_RESULTS}/accuracy/{{labels}}.json",
    log:
        "logs/mcq_circuits/mcq_accuracy/{labels}.log",
    benchmark:
        "results/benchmarks/mcq_circuits/mcq_accuracy/{labels}.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=3000,
        runtime=20,
        gpu=GPU,
    params:
        cfg=cfg("mcq_accuracy"),
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
    log:
        "logs/mcq_circuits/mcq_dla.log",
    benchmark:
        "results/benchmarks/mcq_circuits/mcq_dla.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=3000,
        runtime=20,
        gpu=GPU,
    params:
        cfg=cfg("mcq_dla"),
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
    log:
        "logs/mcq_circuits/mcq_patching.log",
    benchmark:
        "results/benchmarks/mcq_circuits/mcq_patching.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=GPU,
    params:
        cfg=cfg("mcq_patching"),
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
    log:
        "logs/mcq_circuits/mcq_heads.log",
    benchmark:
        "results/benchmarks/mcq_circuits/mcq_heads.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=3000,
        runtime=20,
        gpu=GPU,
    params:
        cfg=cfg("mcq_heads"),
    script:
        "../scripts/stage.py"


rule mcq_verify:
    input:
        manifest=MCQ_MANIFEST,
        data=f"{MCQ_RESULTS}/data/abcd.json",
        accuracy=f"{MCQ_RESULTS}/accuracy/abcd.csv",
        random_letters=MCQ_RANDOM_LETTERS,
        patching=f"{MCQ_RESULTS}/patching.csv",
        patching_json=f"{MCQ_RESULTS}/patching.json",
    output:
        csv=f"{MCQ_RESULTS}/verify.csv",
        json=f"{MCQ_RESULTS}/verify.json",
    log:
        "logs/mcq_circuits/mcq_verify.log",
    benchmark:
        "results/benchmarks/mcq_circuits/mcq_verify.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=3000,
        runtime=20,
        gpu=GPU,
    params:
        cfg=cfg("mcq_verify"),
    script:
        "../scripts/stage.py"


rule mcq_low_rank:
    input:
        manifest=MCQ_MANIFEST,
        data=f"{MCQ_RESULTS}/data/abcd.json",
        accuracy=f"{MCQ_RESULTS}/accuracy/abcd.csv",
        heads=f"{MCQ_RESULTS}/heads.csv",
        verify=f"{MCQ_RESULTS}/verify.csv",
        keys_data=[f"{MCQ_RESULTS}/data/{s}.json" for s in MCQ_KEY_SETS],
    output:
        json=f"{MCQ_RESULTS}/low_rank.json",
        key_scatter=f"{MCQ_RESULTS}/low_rank_keys.csv",
        basis=f"{MCQ_RESULTS}/low_rank_basis.safetensors",
    log:
        "logs/mcq_circuits/mcq_low_rank.log",
    benchmark:
        "results/benchmarks/mcq_circuits/mcq_low_rank.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=3000,
        runtime=30,
        gpu=GPU,
    params:
        cfg=cfg("mcq_low_rank"),
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
    log:
        "logs/mcq_circuits/mcq_mutations/{labels}.log",
    benchmark:
        "results/benchmarks/mcq_circuits/mcq_mutations/{labels}.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=3000,
        runtime=20,
        gpu=GPU,
    params:
        cfg=cfg("mcq_mutations"),
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
        verify=f"{MCQ_RESULTS}/verify.csv",
        verify_json=f"{MCQ_RESULTS}/verify.json",
    output:
        f"{MCQ_RESULTS}/metrics.json",
    log:
        "logs/mcq_circuits/mcq_metrics.log",
    benchmark:
        "results/benchmarks/mcq_circuits/mcq_metrics.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        cfg=cfg("mcq_metrics"),
    script:
        "../scripts/stage.py"
