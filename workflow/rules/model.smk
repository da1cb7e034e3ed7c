rule prepare_model:
    output:
        manifest=MANIFEST,
    params:
        cfg=cfg("prepare_model"),
    log:
        "logs/prepare_model.log",
    benchmark:
        "results/benchmarks/prepare_model.tsv"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=20,
    conda:
        ENV
    script:
        "../scripts/stage.py"
