# The configured model, prepared once for every study that runs on it.


rule prepare_model:
    output:
        manifest=MANIFEST,
        weights=model_weights(config["model"]["name"], model_dir(config["model"]["name"])),
    log:
        "logs/shared/prepare_model.log",
    benchmark:
        "results/benchmarks/shared/prepare_model.tsv"
    conda:
        ENV
    threads: 2
    resources:
        mem_mb=4000,
        runtime=20,
    params:
        cfg=cfg("prepare_model"),
    script:
        "../scripts/stage.py"
