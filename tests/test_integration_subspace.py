"""Integration: Study B's toy and IOI rules in the shared smoke run (config/smoke.yaml, tiny-gpt2).

The run is the one of test_integration.py (smoke_utils.shared_run "cores2"); these tests check the
Study B artifacts, figures and scorecard rows, that a Study B parameter reruns only its dependents,
and that the site-layer rule stops with a message naming the config key when the circuit does not fit.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from smoke_utils import BIN
from smoke_utils import run as _run

from mechrepro.studies import study
from mechrepro.studies.subspace_illusion import FACTS_FIGURES
from mechrepro.studies.subspace_illusion.ioi import TABLE1_ROWS

B = study("subspace_illusion")
SUBSPACE_RESULTS, SUBSPACE_FIGURES = B.results, B.figures_dir
SUBSPACE_FIGURE_INPUTS = [f for f in B.figures if f not in FACTS_FIGURES]  # the toy and IOI figures

pytestmark = pytest.mark.integration


def test_metrics_contract(smoke):
    m = json.loads((smoke / SUBSPACE_RESULTS / "metrics.json").read_text())
    assert m["model"] == "tiny-gpt2" and "randomly initialised" in m["model_description"]
    toy = m["toy"]
    for key in ("e3", "v", "v_null", "v_row"):
        assert isinstance(toy[key], float)
    assert toy["v"] == pytest.approx(toy["e3"]) and toy["e3"] != 0
    assert abs(toy["v_null"]) < 1e-9 and abs(toy["v_row"]) < 1e-9
    assert set(m["ioi_table1"]) == set(TABLE1_ROWS)
    for row in m["ioi_table1"].values():
        assert isinstance(row["fldd"], float) and 0.0 <= row["interchange_acc"] <= 1.0
    ioi = m["ioi"]
    assert ioi["layer"] == 0 and ioi["layer_rule"].startswith("config")  # smoke.yaml: subspace.layer 0
    assert ioi["name_movers"] and all(layer > 0 for layer, _ in ioi["name_movers"])
    assert ioi["n_train"] == 16 and ioi["n_test"] == 16


def test_ioi_artifacts(smoke):
    root = smoke / SUBSPACE_RESULTS
    data = json.loads((root / "ioi_data.json").read_text())
    assert not set(data["train"]["names"]) & set(data["test"]["names"])
    assert {p["template"] for p in data["test"]["pairs"]} == {"T2"}
    pairs = pd.read_csv(root / "ioi_pairs.csv")
    assert len(pairs) == 16 and set(pairs.order) == {"ABB", "BAB"}
    assert (pairs.ld_v_mlp_null - pairs.clean_ld).abs().max() < 1e-4  # the null part changes nothing
    assert (pairs.ld_full_resid - pairs.clean_ld).abs().max() > 1e-6  # the full patch does
    from safetensors.torch import load_file

    dirs = load_file(str(root / "directions.safetensors"))
    assert set(dirs) == {k for _, k in TABLE1_ROWS.values() if k}
    for k, v in dirs.items():
        assert v.shape == ((256,) if k.startswith("v_mlp") else (64,)), k  # tiny-gpt2: d_mlp 256, d_model 64
        assert float(v.norm()) == pytest.approx(1.0, abs=1e-5)
    for site in ("mlp", "resid"):
        das = json.loads((root / "das" / f"{site}.json").read_text())
        assert das["steps"] == len(das["loss"]) == 4  # 2 epochs x 16 pairs / batch 8
        assert torch.equal(load_file(str(root / "das" / f"{site}.safetensors"))["v"], dirs[f"v_{site}"])
    proj = pd.read_csv(root / "ioi_projections.csv")
    assert len(proj) == 16 * len(dirs)
    dorm = pd.read_csv(root / "ioi_dormant.csv")
    assert set(dorm.condition) == {"clean", "full_mlp", "v_mlp", "v_mlp_row", "v_mlp_null"}
    for path in [*root.rglob("*.json"), *root.rglob("*.csv"), *root.rglob("*.safetensors")]:
        if not path.name.endswith(".prov.json"):
            prov = json.loads(Path(str(path) + ".prov.json").read_text())
            assert prov["rule"].startswith(("subspace_", "facts_", "rome_")) and len(prov["sha256"]) == 64, path


def test_figures_and_scorecard(smoke):
    for fig in SUBSPACE_FIGURE_INPUTS:
        png = smoke / SUBSPACE_FIGURES / f"{fig}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000, fig
        assert len(pd.read_csv(smoke / SUBSPACE_FIGURES / f"{fig}.csv")) > 0, fig
        assert (smoke / "results" / "notebooks" / "subspace_illusion" / f"{fig}.ipynb").is_file()
    table = pd.read_csv(smoke / SUBSPACE_FIGURES / "ioi_table1.csv")
    assert list(table.row) == list(TABLE1_ROWS) and table.published_fldd.notna().sum() == 10
    card = (smoke / "results" / "scorecard.md").read_text()
    assert card.count("| study_b |") == 23
    assert "ioi_table1.v_mlp.fldd" in card


def _planned(smoke, *config) -> set[str]:
    done = _run([BIN / "snakemake", "all", "--cores", "1", "--dry-run", "--config", *config], smoke)
    lines = done.stdout.splitlines()
    start = lines.index("Job stats:") + 3
    rules = set()
    for line in lines[start:]:
        parts = line.split()
        if not parts or parts[0] == "total":
            break
        rules.add(parts[0])
    return rules


def test_parameter_change_reruns_only_dependents(smoke):
    assert _planned(smoke, "subspace_ioi={epochs: 3}") == {"subspace_ioi_das", "subspace_ioi_eval", "subspace_metrics",
                                                           "figure", "scorecard", "all"}
    assert _planned(smoke, "subspace={layer: 1}") == {"subspace_ioi_das", "subspace_ioi_eval", "subspace_metrics",
                                                      "figure", "scorecard", "all"}


def test_auto_layer_on_an_unfit_circuit_names_the_config_key(smoke, tmp_path):
    """The smoke circuit's S-inhibition and name-mover heads share layer 0: 'auto' has no answer."""
    circuit = json.loads((smoke / "results" / "ioi_generalization" / "circuit.json").read_text())
    sinh = [l for l, _ in circuit["classes"]["s_inhibition"]]
    nms = [l for l, _ in circuit["classes"]["name_mover"]]
    if sinh and nms and max(sinh) < min(nms):  # pragma: no cover - the circuit fits after all
        pytest.skip("the smoke circuit fits the auto rule")
    work = tmp_path / "run"
    shutil.copytree(smoke, work, symlinks=True)
    done = _run([BIN / "snakemake", f"{SUBSPACE_RESULTS}/das/mlp.json", "--cores", "1", "--config",
                 "subspace={layer: auto}"], work, check=False, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode != 0
    assert "subspace.layer" in out and re.search(r"no S-inhibition heads|inconsistent", out), out[-3000:]
    assert not (work / SUBSPACE_RESULTS / "das" / "mlp.json").exists()
