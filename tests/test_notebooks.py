"""The figure notebooks are the editable source of the figures: one per declared figure, all of
the same shape, and each reads only the inputs its figure declares.

Every notebook ``notebooks/<study>/<fig>.ipynb`` is stored without outputs or execution counts,
has one ``parameters`` cell defining exactly the parameters the ``figure`` rule passes (with
defaults that work when it is opened from its folder), imports only its own study's ``plotting``
module and calls the shared API: ``load(root, fig_name, inputs)``, a ``*_data`` / ``plot_*`` pair,
``caption`` and ``save``.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

from mechrepro.studies import SHARED_RULES, studies
from mechrepro.workflow.figures import Artifacts, UndeclaredInputError
from mechrepro.workflow.pipeline import figure_inputs

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
FIGURES = [(s.name, fig) for s in studies().values() for fig in s.figures]


def _notebook(study: str, fig: str) -> dict:
    return json.loads((NOTEBOOKS / study / f"{fig}.ipynb").read_text())


def _code(cell: dict) -> str:
    return "".join(cell["source"])


def _rule_parameters(study: str, fig: str) -> set[str]:
    """The notebook parameters the ``figure`` rule passes: its ``-p`` options and the ``-y`` mapping
    (the dpi, the figure's own parameters and ``inputs``)."""
    rule = (ROOT / "workflow" / "rules" / "figures.smk").read_text()
    passed = set(re.findall(r"-p (\w+) ", rule))
    assert passed, "the figure rule passes no -p parameters"
    assert SHARED_RULES["figure"] == ["figures.dpi"]
    return passed | {"dpi", "inputs"} | set(studies()[study].figures[fig].params.values())


def test_every_figure_has_a_notebook_and_every_notebook_a_figure():
    declared = {f"{study}/{fig}.ipynb" for study, fig in FIGURES}
    found = {p.relative_to(NOTEBOOKS).as_posix() for p in NOTEBOOKS.rglob("*.ipynb")
             if ".ipynb_checkpoints" not in p.parts}
    assert found - declared == set(), "notebooks of no declared figure"
    assert declared - found == set(), "declared figures without a notebook"
    assert not list(NOTEBOOKS.glob("*.py")), "the notebooks are the source: no generator scripts"


@pytest.mark.parametrize("study,fig", FIGURES, ids=[f"{s}/{f}" for s, f in FIGURES])
def test_notebook_parameters_cell(study, fig):
    cells = _notebook(study, fig)["cells"]
    tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{len(tagged)} cells tagged 'parameters'"
    tree = ast.parse(_code(tagged[0]))
    defaults = {t.id: ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                for t in node.targets}
    assert set(defaults) == _rule_parameters(study, fig)
    # defaults for a notebook opened from its folder, notebooks/<study>/
    assert defaults["root"] == "../.." and defaults["fig_name"] == fig and defaults["inputs"] is None


@pytest.mark.parametrize("study,fig", FIGURES, ids=[f"{s}/{f}" for s, f in FIGURES])
def test_notebook_stored_without_outputs(study, fig):
    for cell in _notebook(study, fig)["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None


@pytest.mark.parametrize("study,fig", FIGURES, ids=[f"{s}/{f}" for s, f in FIGURES])
def test_notebook_shape_and_imports(study, fig):
    cells = _notebook(study, fig)["cells"]
    assert cells[0]["cell_type"] == "markdown" and _code(cells[0]).startswith("# ")
    code = "\n".join(_code(c) for c in cells if c["cell_type"] == "code")
    ours = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            ours |= {a.name for a in node.names if a.name.startswith("mechrepro")}
        elif isinstance(node, ast.ImportFrom) and node.module.startswith("mechrepro"):
            ours |= {f"{node.module}.{a.name}" for a in node.names}
    assert ours == {f"mechrepro.studies.{study}.plotting"}
    assert "art = plotting.load(root, fig_name, inputs)" in code
    assert re.search(r"data = plotting\.\w+_data\(art", code)
    assert re.search(r"fig = plotting\.plot_\w+\(data", code)
    assert "plotting.add_caption(fig, plotting.caption(art" in code
    assert "plotting.save(fig, data, art.figures_dir, fig_name, dpi)" in code


# ------------------------------------------------------------------------------------------------
# Reading only the declared inputs


@pytest.fixture
def mcq_results(tmp_path) -> Path:
    """A workflow directory with the two tables Study C's patching figure reads."""
    res = tmp_path / "results" / "mcq_circuits"
    res.mkdir(parents=True)
    pd.DataFrame({"node": ["L0H0", "L0H1", "MLP0"], "direct_effect": [0.1, -0.2, 0.3],
                  "total_effect": [0.2, -0.4, 0.1], "indirect_flag": [False, True, False]}).to_csv(
        res / "patching.csv", index=False)
    pd.DataFrame({"node": ["L0H0", "L0H1"], "category": ["uniform", "correct-letter"]}).to_csv(
        res / "heads.csv", index=False)
    (res / "heads.csv.prov.json").write_text(json.dumps({"config": {"mcq": {"n_analysis": 8}}}))
    return tmp_path


def test_figure_reads_its_declared_inputs(mcq_results):
    from mechrepro.studies.mcq_circuits import plotting

    config = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
    declared = figure_inputs("mcq_circuits", "patching", config)
    data = plotting.patching_data(plotting.load(mcq_results, "patching", declared))
    assert list(data.category) == ["uniform", "correct-letter", "mlp"]
    # by hand (no inputs): nothing is checked
    assert plotting.patching_data(plotting.load(mcq_results, "patching")).equals(data)


def test_read_outside_the_inputs_fails_and_says_where_to_declare_it(mcq_results):
    from mechrepro.studies.mcq_circuits import plotting

    art = plotting.load(mcq_results, "patching", ["results/mcq_circuits/metrics.json",
                                                  "results/mcq_circuits/patching.csv"])
    with pytest.raises(UndeclaredInputError) as err:
        plotting.patching_data(art)
    message = str(err.value)
    for part in ("results/mcq_circuits/heads.csv", "'patching'", "src/mechrepro/studies/mcq_circuits/__init__.py",
                 "inputs"):
        assert part in message


def test_undeclared_file_fails_even_when_missing_and_sidecars_follow_their_artifact(mcq_results):
    art = Artifacts(mcq_results, "patching", ["results/mcq_circuits/heads.csv"], study="mcq_circuits")
    assert art.recorded_config("heads.csv", "mcq.n_analysis") == 8  # the sidecar of a declared input
    with pytest.raises(UndeclaredInputError, match="results/mcq_circuits/nothing.json"):
        art.json("nothing.json", default={})
    with pytest.raises(UndeclaredInputError, match="reference/published.yaml"):
        art.reference("study_c")
    with pytest.raises(UndeclaredInputError, match="metrics.json"):
        _ = art.metrics


def test_study_a_missing_per_variant_files_give_empty_tables(tmp_path):
    """Study A draws a 'no data' panel when a variant's files are missing: the tables are empty,
    not an error (the files are declared; they are just absent)."""
    from mechrepro.studies.ioi_generalization import plotting

    res = tmp_path / "results" / "ioi_generalization"
    res.mkdir(parents=True)
    metrics = {"variants": {"base": {"model_ld": 1.0, "circuit_ld": 0.5, "faithfulness": 0.5, "n": 4}},
               "n_prompts": 4}
    (res / "metrics.json").write_text(json.dumps(metrics))
    config = {"ioi": {"variants": ["base"]}}
    art = plotting.load(tmp_path, "table1_faithfulness", figure_inputs("ioi_generalization", "table1_faithfulness",
                                                                        config))
    table = plotting.table1_data(art)
    assert list(table.variant) == ["base"] and table.model_ld_sem.isna().all()
    fig2 = plotting.load(tmp_path, "fig2_attention_shift", figure_inputs("ioi_generalization", "fig2_attention_shift",
                                                                          config))
    assert plotting.attention_shift_data(fig2).empty  # eval/base_attention.csv missing; no other variant read


def test_notebook_params_of_the_figure_rule():
    """The ``-y`` mapping the rule passes: the dpi, the figure's own config values under their
    parameter names, and its declared inputs (so that a figure-only key reaches only its notebook)."""
    from mechrepro.workflow.config import load
    from mechrepro.workflow.pipeline import notebook_params

    config = load(ROOT / "config" / "smoke.yaml")
    fig4 = notebook_params("ioi_generalization", "fig4_confidence_ratio", config)
    assert fig4 == {"dpi": config["figures"]["dpi"], "n_samples": config["figures"]["n_attention_samples"],
                    "inputs": figure_inputs("ioi_generalization", "fig4_confidence_ratio", config)}
    table1 = notebook_params("ioi_generalization", "table1_faithfulness", config)
    assert set(table1) == {"dpi", "inputs"}
    assert "results/ioi_generalization/eval/triple_io_prompts.csv" in table1["inputs"]
