"""What every figure notebook shares: its inputs, the plotting style, captions, "no data" panels and saving.

Every figure notebook (``notebooks/<study>/<figure>.ipynb``) has the same shape: a ``parameters``
cell (``root``, ``fig_name``, ``dpi``, ``inputs`` and the figure's own parameters), then

    art = plotting.load(root, fig_name, inputs)      # the study's Artifacts: nothing read yet
    data = plotting.<x>_data(art)                    # the table of plotted numbers (the CSV)
    fig = plotting.plot_<x>(data, ...)
    plotting.add_caption(fig, plotting.caption(art, n=..., note=...))
    plotting.save(fig, data, art.figures_dir, fig_name, dpi)

where ``plotting`` is the study's module ``mechrepro.studies.<study>.plotting``.

**Declared inputs.** A figure job reruns only when one of its declared inputs changes (the
registry's ``Figure.inputs``, the ``figure`` rule's inputs). :class:`Artifacts` reads files lazily,
and when it is given that list (the rule passes it as the notebook parameter ``inputs``) it refuses
to read any other file, with an error naming the file, the figure and where to declare it; so a
figure cannot silently depend on a file that does not rerun it. A provenance sidecar
(``X.prov.json``) counts as part of its artifact ``X``. Run by hand (``inputs = None``), a notebook
may read anything.
"""

from __future__ import annotations

import math
import os
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from mechrepro.workflow.artifacts import atomic_path, read_json, write_csv  # noqa: E402

# This file is an input of every figure job (a change redraws every figure).
FIGURE_LIB = "src/mechrepro/workflow/figures.py"
# The published numbers every study compares with (entries by study), relative to the workflow root.
REFERENCE = "reference/published.yaml"
_MISSING = object()

plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 9,
                     "xtick.labelsize": 9, "ytick.labelsize": 9, "figure.facecolor": "white"})


class UndeclaredInputError(RuntimeError):
    """A figure read a file that is not among its declared inputs."""


def _rel(path: str | os.PathLike) -> str:
    return Path(os.path.normpath(path)).as_posix()


class Artifacts:
    """Lazy access to the files one figure of one study reads, checked against its declared inputs.

    ``root`` is the workflow directory; ``inputs`` the figure's declared inputs relative to it
    (``None``: not checked). Names given to :meth:`json`, :meth:`csv` and :meth:`exists` are
    relative to the study's results directory ``results/<study>``; :meth:`path` takes a path
    relative to the root. Each study's ``plotting`` module subclasses this (setting :attr:`study`)
    where it needs study-specific accessors.
    """

    study: str = ""

    def __init__(self, root: str | os.PathLike = ".", figure: str | None = None,
                 inputs: list[str] | None = None, study: str | None = None):
        self.root = Path(root)
        self.study = study or self.study
        self.figure = figure
        self.inputs = None if inputs is None else {_rel(p) for p in inputs}
        self._metrics: dict | None = None
        self._reference: dict | None = None

    @property
    def results(self) -> Path:
        """The study's results directory."""
        return self.root / "results" / self.study

    @property
    def figures_dir(self) -> Path:
        """Where the study's figures go (``figures/<study>``)."""
        return self.root / "figures" / self.study

    def path(self, rel: str | os.PathLike) -> Path:
        """The file ``rel`` (relative to the root), once checked to be a declared input."""
        rel = _rel(rel)
        if self.inputs is not None and rel not in self.inputs and not (
                rel.endswith(".prov.json") and rel.removesuffix(".prov.json") in self.inputs):
            fig = f"'{self.figure}'" if self.figure else "this figure"
            raise UndeclaredInputError(
                f"figure {fig} of study {self.study} read {rel}, which is not among its declared inputs: add it to "
                f"the figure's `inputs` in src/mechrepro/studies/{self.study}/__init__.py (a change to an undeclared "
                "file would not redraw the figure)")
        return self.root / rel

    def result(self, name: str) -> Path:
        """The artifact ``name`` of the study's results directory (checked like :meth:`path`)."""
        return self.path(f"results/{self.study}/{name}")

    def exists(self, name: str) -> bool:
        return self.result(name).exists()

    def json(self, name: str, default=_MISSING):
        """A JSON artifact; ``default`` (when given) if it does not exist."""
        path = self.result(name)
        if default is not _MISSING and not path.exists():
            return default
        return read_json(path)

    def csv(self, name: str, columns: list[str] | None = None) -> pd.DataFrame:
        """A CSV artifact. With ``columns``, a missing file gives an empty frame with those columns
        and a file lacking some of them gets them as NaN columns."""
        path = self.result(name)
        if columns is None:
            return pd.read_csv(path)
        if not path.exists():
            return pd.DataFrame(columns=columns)
        frame = pd.read_csv(path)
        for c in columns:
            if c not in frame.columns:
                frame[c] = float("nan")
        return frame

    @property
    def metrics(self) -> dict:
        """The study's ``metrics.json`` (read once)."""
        if self._metrics is None:
            self._metrics = self.json("metrics.json")
        return self._metrics

    def recorded_config(self, artifact: str, key: str, default=None):
        """A config value recorded in the provenance sidecar of ``artifact`` (e.g. ``'value_paths.csv'``,
        ``key`` dotted: ``'value_paths.n_prompts'``); ``default`` when absent."""
        path = self.result(f"{artifact}.prov.json")
        if not path.exists():
            return default
        node = read_json(path).get("config", {})
        if key in node:
            return node[key]
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    def reference(self, entry: str) -> dict:
        """One study's entry of ``reference/published.yaml`` (empty when the file does not exist)."""
        if self._reference is None:
            path = self.path(REFERENCE)
            self._reference = (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}
        return self._reference.get(entry, {})

    def manifest(self, model: str, default=_MISSING) -> dict:
        """The manifest of a prepared model (``resources/models/<model>/manifest.json``); ``default``
        (when given) if it does not exist."""
        from mechrepro.workflow.pipeline import model_dir

        path = self.path(f"{model_dir(model)}/manifest.json")
        if default is not _MISSING and not path.exists():
            return default
        return read_json(path)


def add_caption(fig, text: str, fontsize: float = 8.5) -> None:
    """Put ``text`` under the axes, wrapped to the figure width (saved with ``bbox_inches='tight'``)."""
    width_in = fig.get_size_inches()[0]
    chars = max(40, int(width_in * 72 / (fontsize * 0.52)))
    wrapped = "\n".join(textwrap.fill(p, chars) for p in text.split("\n"))
    fig.text(0.01, -0.01, wrapped, ha="left", va="top", fontsize=fontsize, wrap=False)


def suptitle(fig, text: str, fontsize: float = 12) -> None:
    """Figure title, wrapped to the figure width (leaving room for a legend at the right)."""
    chars = max(40, int(fig.get_size_inches()[0] * 72 / (fontsize * 0.58)) - 14)
    fig.suptitle(textwrap.fill(text, chars), fontsize=fontsize)


def no_data(ax, reason: str = "") -> None:
    """Mark ``ax`` as an empty panel with a 'no data' note."""
    ax.set_xticks([])
    ax.set_yticks([])
    reason = "\n".join(textwrap.fill(line, 34) for line in reason.split("\n")) if reason else ""
    t = ax.text(0.5, 0.5, "no data" + (f"\n{reason}" if reason else ""), ha="center", va="center",
                transform=ax.transAxes, fontsize=9, color="0.35")
    t.set_in_layout(False)


def save(fig, frame: pd.DataFrame, figures_dir: str | Path, fig_name: str, dpi: int = 150) -> dict[str, Path]:
    """Write ``{fig_name}.png`` and ``{fig_name}.csv`` (the plotted numbers) atomically."""
    out = Path(figures_dir)
    png, csv = out / f"{fig_name}.png", out / f"{fig_name}.csv"
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=int(dpi), bbox_inches="tight", pad_inches=0.15)
    write_csv(csv, frame)
    plt.close(fig)
    return {"png": png, "csv": csv}


def sem(x) -> float:
    """Standard error of the mean (NaN below two values)."""
    x = pd.Series(x, dtype=float).dropna()
    return float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")


def fmt_num(x: float) -> str:
    """Two decimals, or two significant digits for small numbers (the smoke model's LDs are ~0.01)."""
    return f"{x:.2f}" if abs(x) >= 0.1 or x == 0 else f"{x:.2g}"
