rule scorecard:
    input:
        unpack(lambda w: study_metrics(config)),
        reference="reference/published.yaml",
    output:
        json="results/scorecard.json",
        md="results/scorecard.md",
    params:
        cfg=cfg("scorecard"),
    log:
        "logs/scorecard.log",
    benchmark:
        "results/benchmarks/scorecard.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    conda:
        ENV
    script:
        "../scripts/stage.py"
