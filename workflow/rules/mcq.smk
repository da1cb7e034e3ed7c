# Study C: multiple-choice "correct letter" circuits (model -> datasets -> accuracy -> DLA, patching,
# head categories -> low rank -> mutations -> metrics -> figures). R = results/mcq_circuits.


wildcard_constraints:
    labels="|".join(MCQ_LABEL_SETS),
    mcqfig="|".join(MCQ_FIGURES_LIST),


rule mcq_model:
    output:
        manifest=MCQ_MANIFEST,
        training=f"{MCQ_RESULTS}/organism.json",
    params:
        cfg=cfg("mcq_model"),
    log:
        "logs/mcq_model.log",
    benchmark:
        "results/benchmarks/mcq_model.tsv"
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
        "logs/mcq_dataset/{labels}.log",
    benchmark:
        "results/benchmarks/mcq_dataset/{labels}.tsv"
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
        "logs/mcq_accuracy/{labels}.log",
    benchmark:
        "results/benchmarks/mcq_accuracy/{labels}.tsv"
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
        "logs/mcq_dla.log",
    benchmark:
        "results/benchmarks/mcq_dla.tsv"
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
        "logs/mcq_patching.log",
    benchmark:
        "results/benchmarks/mcq_patching.tsv"
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
        "logs/mcq_heads.log",
    benchmark:
        "results/benchmarks/mcq_heads.tsv"
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
        "logs/mcq_low_rank.log",
    benchmark:
        "results/benchmarks/mcq_low_rank.tsv"
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
        "logs/mcq_mutations/{labels}.log",
    benchmark:
        "results/benchmarks/mcq_mutations/{labels}.tsv"
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
        "logs/mcq_metrics.log",
    benchmark:
        "results/benchmarks/mcq_metrics.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    conda:
        ENV
    script:
        "../scripts/stage.py"


rule mcq_figure:
    input:
        notebook="notebooks/mcq_circuits/{mcqfig}.ipynb",
        plotting="src/mechrepro/plotting_mcq.py",
        metrics=f"{MCQ_RESULTS}/metrics.json",
        training=f"{MCQ_RESULTS}/organism.json",
        accuracy=expand(f"{MCQ_RESULTS}/accuracy/{{labels}}.json", labels=MCQ_LABEL_SETS),
        mutations=expand(f"{MCQ_RESULTS}/mutations/{{labels}}.json", labels=MCQ_LABEL_SETS),
        dla=f"{MCQ_RESULTS}/dla.csv",
        dla_json=f"{MCQ_RESULTS}/dla.json",
        patching=f"{MCQ_RESULTS}/patching.csv",
        patching_json=f"{MCQ_RESULTS}/patching.json",
        heads=f"{MCQ_RESULTS}/heads.csv",
        low_rank=f"{MCQ_RESULTS}/low_rank.json",
        key_scatter=f"{MCQ_RESULTS}/low_rank_keys.csv",
    output:
        png=report(
            f"{MCQ_FIGURES}/{{mcqfig}}.png",
            caption="../report/figure.rst",
            category="Study C: multiple-choice circuits",
        ),
        csv=f"{MCQ_FIGURES}/{{mcqfig}}.csv",
        notebook="results/notebooks/mcq_circuits/{mcqfig}.ipynb",
    params:
        cfg=cfg("mcq_figure"),
        cfg_json=lambda w: json.dumps(rule_config("mcq_figure", config, w)),
        results=lambda w: MCQ_RESULTS,
        figures=lambda w: MCQ_FIGURES,
        dpi=config["figures"]["dpi"],
    log:
        "logs/mcq_figure/{mcqfig}.log",
    benchmark:
        "results/benchmarks/mcq_figure/{mcqfig}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        ENV
    shell:
        "python -m mechrepro notebook {input.notebook} {output.notebook} --kernel python3 --no-progress-bar "
        '-p results_dir "$PWD/{params.results}" -p figures_dir "$PWD/{params.figures}" -p fig_name {wildcards.mcqfig} '
        "-p dpi {params.dpi} > {log} 2>&1 && "
        "python -m mechrepro record mcq_figure --config {params.cfg_json:q} --inputs {input:q} "
        "--outputs {output.png:q} {output.csv:q} {output.notebook:q} >> {log} 2>&1"
