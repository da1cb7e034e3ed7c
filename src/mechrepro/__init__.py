"""mechrepro: reproducible replications of mechanistic-interpretability papers.

Subpackages:

* ``core``: the shared machinery: the hookable transformer (``model``), model names and loading
  (``registry``), the patching engine with its cached-prefix/resume runs (``engine``), activation
  and path patching (``patching``), subspace patching and DAS (``subspace``), padding (``tokens``).
* ``workflow``: the plumbing: config validation, artifacts and provenance, the rule facts
  derived from the study registry (``pipeline``), stage-function support (``stage``), the figure
  API (``figures``), audit, scorecard, the DVC generator and the command line.
* ``studies``: the study registry and one subpackage per paper (``ioi_generalization``,
  ``subspace_illusion``, ``mcq_circuits``), each with its data, analysis, stages and plotting.
"""

__version__ = "0.1.0"
