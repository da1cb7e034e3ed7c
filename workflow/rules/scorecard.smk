# Published numbers of every configured study beside ours.


rule scorecard:
    input:
        unpack(lambda w: study_metrics(config)),
        reference="reference/published.yaml",
    output:
        json="results/scorecard.json",
        md="results/scorecard.md",
    log:
        "logs/shared/scorecard.log",
    benchmark:
        "results/benchmarks/shared/scorecard.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        cfg=cfg("scorecard"),
    script:
        "../scripts/stage.py"
