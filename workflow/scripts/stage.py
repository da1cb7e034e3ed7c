"""Run the library stage named after the Snakemake rule (see mechrepro.workflow.stage.dispatch)."""
from mechrepro.workflow.stage import dispatch

dispatch(snakemake)  # noqa: F821 (snakemake is injected by script:)
