"""The study registry: every study declares itself once, and the workflow reads the declaration.

A study is a subpackage ``mechrepro.studies.<name>`` whose ``__init__`` defines ``STUDY``, a
:class:`Study`: its rules and the config keys each reads, its figures with their exact inputs,
its scorecard entries and its report caption. The subpackage also holds the study's science
(data, analysis), its ``stages`` module (one function per rule) and its ``plotting`` module
(one ``*_data`` / ``plot_*`` pair per figure). Around it, by convention:

* ``workflow/rules/<name>.smk``: the study's Snakemake rules (the Snakefile includes every
  study's file; figures share the generic ``figure`` rule of ``workflow/rules/figures.smk``);
* ``workflow/schemas/<name>.schema.yaml``: the config sections the study owns;
* ``notebooks/<name>/<figure>.ipynb``: one notebook per figure, the figure's editable source
  (stored without outputs; see :mod:`mechrepro.workflow.figures` for its shape);
* ``results/<name>/``, ``figures/<name>/``: its artifacts and figures, ``results/<name>/metrics.json``
  its metrics;
* its entries in ``reference/published.yaml`` and its section of ``config/smoke.yaml``.

The Snakefile, the config validation, the DVC generator, the audit, the stage dispatch and
``benchmarks/run_summary.py`` read this registry; none of them lists studies of its own.
Studies are discovered by importing the subpackages of this package, so adding a study edits
no file outside its own.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from functools import cache
from collections.abc import Callable

# Rules every study shares (their stage functions are in mechrepro.workflow.stage) and the config
# keys each reads. The ``figure`` rule reads ``figures.dpi`` plus each figure's own keys.
SHARED_RULES: dict[str, list[str]] = {
    "prepare_model": ["seed", "model.name"],
    "figure": ["figures.dpi"],
    "scorecard": ["model.name", "studies"],
}
SHARED_STAGES = "mechrepro.workflow.stage"


@dataclass(frozen=True)
class Plot:
    """A DVC plot of a figure's CSV (``figures/<study>/<name>.csv``, the plotted numbers): ``dvc plots
    show`` draws it and ``dvc plots diff`` compares it between two runs. ``x`` and ``y`` are columns
    (``y`` may list several); ``template`` is DVC's (``linear``, ``scatter``, ``bar_horizontal``, …)."""

    x: str
    y: str | tuple[str, ...]
    template: str = "linear"
    title: str = ""


@dataclass(frozen=True)
class Figure:
    """One figure notebook of a study: ``notebooks/<study>/<name>.ipynb`` → ``figures/<study>/<name>.png``.

    ``inputs(config)`` lists, relative to the workflow directory, every file the notebook reads
    (the figure rule's inputs: a change to any of them, and to nothing else, redraws it). The rule
    passes the list to the notebook, whose :class:`mechrepro.workflow.figures.Artifacts` refuse to
    read any other file. ``params`` maps config keys the figure reads to notebook
    parameter names. ``enabled(config)`` is False when the configuration cannot draw the figure
    (e.g. Study A's attention figures need the DoubleIO variant). ``dvc_plot`` declares the figure's
    CSV a DVC plot (the headline figures; ``dvc.yaml``'s top-level ``plots``).
    """

    paper: str
    inputs: Callable[[dict], list[str]]
    params: dict[str, str] = field(default_factory=dict)
    enabled: Callable[[dict], bool] = lambda config: True
    dvc_plot: Plot | None = None


@dataclass(frozen=True)
class Study:
    """One paper's replication, as the workflow sees it."""

    name: str
    letter: str
    title: str
    paper: str
    rules: dict[str, list[str]]
    figures: dict[str, Figure]
    scorecard: list[str]
    caption: Callable[[dict, str], str]
    check_config: Callable[[dict, str], None] | None = None

    @property
    def results(self) -> str:
        return f"results/{self.name}"

    @property
    def figures_dir(self) -> str:
        return f"figures/{self.name}"

    @property
    def metrics(self) -> str:
        return f"{self.results}/metrics.json"

    @property
    def stages(self) -> str:
        return f"mechrepro.studies.{self.name}.stages"

    @property
    def plotting(self) -> str:
        return f"mechrepro.studies.{self.name}.plotting"

    @property
    def plotting_file(self) -> str:
        return f"src/mechrepro/studies/{self.name}/plotting.py"

    @property
    def category(self) -> str:
        return f"Study {self.letter}: {self.title}"

    def figure_names(self, config: dict) -> list[str]:
        """The figures this configuration draws."""
        return [name for name, fig in self.figures.items() if fig.enabled(config)]


@cache
def studies() -> dict[str, Study]:
    """Every study of this package, by name, in the order of their letters."""
    found = []
    for info in pkgutil.iter_modules(__path__):
        if info.ispkg:
            module = importlib.import_module(f"{__name__}.{info.name}")
            study = getattr(module, "STUDY", None)
            if not isinstance(study, Study) or study.name != info.name:
                raise ImportError(f"{module.__name__} must define STUDY = Study(name={info.name!r}, ...)")
            found.append(study)
    return {s.name: s for s in sorted(found, key=lambda s: s.letter)}


def study(name: str) -> Study:
    try:
        return studies()[name]
    except KeyError:
        raise KeyError(f"unknown study {name!r}; known: {', '.join(studies())}") from None


def rule_config() -> dict[str, list[str]]:
    """Every rule of the workflow → the config keys it reads (shared rules first)."""
    out = dict(SHARED_RULES)
    for s in studies().values():
        clash = set(out) & set(s.rules)
        if clash:
            raise ValueError(f"study {s.name} declares rules that already exist: {sorted(clash)}")
        out.update(s.rules)
    return out


def study_of_rule(rule: str) -> Study | None:
    """The study declaring ``rule``; None for a shared rule."""
    for s in studies().values():
        if rule in s.rules:
            return s
    if rule in SHARED_RULES:
        return None
    raise LookupError(f"no study declares the rule '{rule}'")


def stage_module(rule: str) -> str:
    """The module holding the stage function of ``rule``."""
    s = study_of_rule(rule)
    return SHARED_STAGES if s is None else s.stages
