"""mechrepro: reproducible replications of mechanistic-interpretability papers.

Modules: ``model`` (hookable transformer), ``registry`` (model names and loading),
``artifacts`` (atomic I/O and provenance), ``config`` (schema validation), ``ioi`` (IOI
datasets), ``patching`` (activation / path patching and ablation), ``circuit`` (IOI circuit
discovery), ``ioi_analysis`` (Study A analyses), ``scorecard`` (paper vs ours).
"""

__version__ = "0.1.0"
