"""Run the library stage named after the Snakemake rule (see mechrepro.stages)."""
from mechrepro import stages

getattr(stages, snakemake.rule)(snakemake)  # noqa: F821 (snakemake is injected by script:)
