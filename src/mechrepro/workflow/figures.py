"""What every figure notebook shares: the plotting style, captions, "no data" panels and saving.

Each study's ``plotting`` module (``mechrepro.studies.<study>.plotting``) builds its figures'
tables and plots with these helpers; a notebook then calls :func:`save`, which writes the PNG and
the CSV of the plotted numbers atomically.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from mechrepro.workflow.artifacts import atomic_path, write_csv  # noqa: E402

# This file is an input of every figure job (a change redraws every figure).
FIGURE_LIB = "src/mechrepro/workflow/figures.py"

plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 9,
                     "xtick.labelsize": 9, "ytick.labelsize": 9, "figure.facecolor": "white"})


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
