"""Adding a study touches only the study's own files (docs/architecture.md, "Adding a study").

In a copy of the repository, a fourth study ``toy_count`` is added exactly as the docs say: its
package (declaration, stages, plotting), its rules file, its schema, its notebook, its config
section; no other file is edited. ``snakemake all`` with ``studies: [toy_count]`` then validates
its config, runs its rule through the stage dispatch, draws its figure through the generic figure
rule (with its own caption) and the audit passes; a typo in its config section is refused before
any job runs.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from smoke_utils import BIN, copy_repo, run

pytestmark = pytest.mark.workflow

INIT = '''
"""Study D: a toy study (test only)."""
from mechrepro.studies import Figure, Study

STUDY = Study(
    name="toy_count", letter="D", title="toy counting", paper="none",
    rules={"toy_count_table": ["seed", "toy_count.n"]},
    figures={"counts": Figure("Fig. 1", lambda config: ["results/toy_count/metrics.json"])},
    scorecard=[],
    caption=lambda config, fig: f"Study D figure ``{fig}``: the first {config['toy_count']['n']} squares.",
)
'''
STAGES = '''
"""Stage functions of the toy study."""
from mechrepro.workflow import artifacts as art
from mechrepro.workflow import stage


def toy_count_table(snk) -> None:
    stage.setup(snk)
    n = snk.config["toy_count"]["n"]
    art.save_json(snk.output[0], {"model": "none", "squares": [i * i for i in range(n)]}, stage.prov(snk))
'''
PLOTTING = '''
"""Figures of the toy study."""
import matplotlib.pyplot as plt
import pandas as pd

from mechrepro.workflow import figures
from mechrepro.workflow.figures import add_caption, save  # noqa: F401


class Artifacts(figures.Artifacts):
    study = "toy_count"


def load(root=".", fig_name=None, inputs=None):
    return Artifacts(root, fig_name, inputs)


def caption(art, n=None, note=""):
    return f"N = {n}. {note}"


def counts_data(art):
    squares = art.metrics["squares"]
    return pd.DataFrame({"i": range(len(squares)), "square": squares})


def plot_counts(data):
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot(data.i, data.square, marker="o")
    return fig
'''
RULES = '''
rule toy_count_table:
    output:
        "results/toy_count/metrics.json",
    log:
        "logs/toy_count/toy_count_table.log",
    benchmark:
        "results/benchmarks/toy_count/toy_count_table.tsv"
    threads: 1
    params:
        cfg=cfg("toy_count_table"),
    script:
        "../scripts/stage.py"
'''
SCHEMA = {"required": ["toy_count"],
          "properties": {"toy_count": {"type": "object", "additionalProperties": False, "required": ["n"],
                                       "properties": {"n": {"type": "integer", "minimum": 1}}}}}
CELLS = [
    ("markdown", "# Toy study: squares"),
    ("code", 'root = "../.."\nfig_name = "counts"\ndpi = 150\ninputs = None'),
    ("code", "from mechrepro.studies.toy_count import plotting\n\nart = plotting.load(root, fig_name, inputs)"),
    ("code", "data = plotting.counts_data(art)\nfig = plotting.plot_counts(data)\n"
             "plotting.add_caption(fig, plotting.caption(art, n=len(data)))"),
    ("code", "plotting.save(fig, data, art.figures_dir, fig_name, dpi)"),
]


def _notebook() -> dict:
    cells = []
    for i, (kind, src) in enumerate(CELLS):
        cell = {"cell_type": kind, "metadata": {"tags": ["parameters"]} if i == 1 else {}, "source": src}
        if kind == "code":
            cell.update(execution_count=None, outputs=[])
        cells.append(cell)
    return {"cells": cells, "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                        "language": "python"}}, "nbformat": 4, "nbformat_minor": 5}


def add_study(work: Path) -> list[str]:
    """Add the toy study to the copy ``work``; return the files written (relative)."""
    files = {
        "src/mechrepro/studies/toy_count/__init__.py": INIT,
        "src/mechrepro/studies/toy_count/stages.py": STAGES,
        "src/mechrepro/studies/toy_count/plotting.py": PLOTTING,
        "workflow/rules/toy_count.smk": RULES,
        "workflow/schemas/toy_count.schema.yaml": yaml.safe_dump(SCHEMA),
        "notebooks/toy_count/counts.ipynb": json.dumps(_notebook(), indent=1),
    }
    for rel, text in files.items():
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_text(textwrap.dedent(text).lstrip())
    return sorted(files)


def _config(work: Path, section: dict) -> None:
    path = work / "config" / "config.yaml"
    config = yaml.safe_load(path.read_text())
    config.update(studies=["toy_count"], toy_count=section)
    path.write_text(yaml.safe_dump(config, sort_keys=False))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("add_study")
    copy_repo(work)
    (work / "config" / "config.yaml").write_text((work / "config" / "smoke.yaml").read_text())
    add_study(work)
    return work


def test_a_new_study_runs_end_to_end(work):
    _config(work, {"n": 4})
    done = run([BIN / "snakemake", "all", "--cores", "1"], work, check=False, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert json.loads((work / "results/toy_count/metrics.json").read_text())["squares"] == [0, 1, 4, 9]
    assert (work / "figures/toy_count/counts.png").read_bytes()[:4] == b"\x89PNG"
    assert list(json.loads((work / "figures/toy_count/counts.png.prov.json").read_text())["inputs"]) == [
        "notebooks/toy_count/counts.ipynb", "src/mechrepro/studies/toy_count/plotting.py",
        "src/mechrepro/workflow/figures.py", "results/toy_count/metrics.json"]
    audit = run([sys.executable, "-m", "mechrepro", "audit", "figures/toy_count/counts.png"], work, check=False)
    assert audit.returncode == 0, audit.stdout[-2000:]
    rules = run([BIN / "snakemake", "all", "--cores", "1", "--dry-run", "--forceall"], work).stdout
    assert "rule toy_count_table:" in rules and "study=toy_count, fig=counts" in rules


def test_a_new_study_config_typo_is_refused_before_any_job(work):
    _config(work, {"n": 4, "nn": 5})
    done = run([BIN / "snakemake", "all", "--cores", "1"], work, check=False, timeout=300)
    assert done.returncode != 0
    assert "unknown config key 'toy_count.nn'" in done.stdout + done.stderr
