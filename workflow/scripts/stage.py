"""Run the library stage named after the Snakemake rule (see mechrepro.stages.dispatch)."""
from mechrepro.stages import dispatch

dispatch(snakemake)  # noqa: F821 (snakemake is injected by script:)
