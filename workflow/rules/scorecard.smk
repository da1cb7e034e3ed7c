# Published numbers and claims of every configured study beside ours: the scorecard and the
# replication report (results/replication.md; results/replication.rst is the front page of
# `snakemake --report`).


rule scorecard:
    input:
        unpack(lambda w: study_metrics(config)),
        reference="reference/published.yaml",
    output:
        json="results/scorecard.json",
        md="results/scorecard.md",
        replication="results/replication.md",
        front="results/replication.rst",
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
