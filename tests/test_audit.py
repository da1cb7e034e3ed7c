"""`python -m mechrepro audit`: provenance chains of a smoke run and every kind of mismatch it finds.

Read-only checks use the shared ``cores2`` smoke run; checks that damage files use a scratch
copy of it (a few MB).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
from smoke_utils import output_files, run, sha256

from mechrepro.workflow import artifacts as A
from mechrepro.workflow.audit import audit
from mechrepro.studies import study

STUDY_A = study("ioi_generalization")
RESULTS, FIGURES = STUDY_A.results, STUDY_A.figures_dir

pytestmark = pytest.mark.integration


@pytest.fixture
def scratch(smoke, tmp_path):
    """A copy of the finished smoke run that a test may damage."""
    work = tmp_path / "run"
    shutil.copytree(smoke, work, symlinks=True, ignore=shutil.ignore_patterns(".snakemake", ".dvc"))
    return work


def _cli(work, *paths, check=False):
    return run([sys.executable, "-m", "mechrepro", "audit", *map(str, paths)], work, check=check)


def _audit(work, *paths):
    lines: list[str] = []
    res = audit(paths, root=work, out=lines.append)
    return res, "\n".join(lines)


def test_figure_chain(smoke):
    done = _cli(smoke, f"{FIGURES}/fig6_value_paths.png")
    out = done.stdout
    assert done.returncode == 0, out
    manifest = json.loads((smoke / "resources/models/tiny-gpt2/manifest.json").read_text())
    side = json.loads((smoke / f"{FIGURES}/fig6_value_paths.png.prov.json").read_text())
    first = out.splitlines()[0]
    assert first.startswith(f"{FIGURES}/fig6_value_paths.png  sha256 {sha256(smoke / FIGURES / 'fig6_value_paths.png')}")
    assert "rule:   figure" in out and "figures.dpi = 60" in out
    # model and weight hash, code version
    assert f"model:  tiny-gpt2, weights sha256 {manifest['weight_sha256']}" in out
    assert f"source sha256 {side['code']['source_sha256']}" in out
    # inputs with their hashes, recursively down to the model and the source files
    for rel in (f"{RESULTS}/value_paths.csv", f"{RESULTS}/circuit.json", f"{RESULTS}/data/base.json",
                "resources/models/tiny-gpt2/manifest.json", "config/ioi_data.yaml",
                "notebooks/ioi_generalization/fig6_value_paths.ipynb", "src/mechrepro/studies/ioi_generalization/plotting.py"):
        assert f"{rel}  sha256 {sha256(smoke / rel)}" in out, rel
    for rule in ("ioi_value_paths", "ioi_circuit", "ioi_dataset", "prepare_model", "ioi_metrics"):
        assert f"rule:   {rule}" in out, rule
    assert "model files: 4/4 match resources/models/tiny-gpt2/manifest.json" in out
    assert "audit OK" in out.splitlines()[-1]


def test_every_figure_and_its_csv_has_a_sidecar(smoke):
    for fig in STUDY_A.figure_names({"ioi": {"variants": ["base", "double_io", "triple_io"]}}):
        for ext in ("png", "csv"):
            side = json.loads((smoke / FIGURES / f"{fig}.{ext}{A.PROV_SUFFIX}").read_text())
            assert side["rule"] == "figure" and side["artifact"] == f"{FIGURES}/{fig}.{ext}"
            assert side["model"]["name"] == "tiny-gpt2"
            assert f"notebooks/ioi_generalization/{fig}.ipynb" in side["inputs"]
            assert f"{RESULTS}/metrics.json" in side["inputs"]


def test_scorecard_rows_link_to_their_artifact(smoke):
    md = (smoke / "results/scorecard.md").read_text()
    study_a = [line for line in md.splitlines() if line.startswith("| study_a |")]
    assert study_a and all(re.search(r"\| `results/ioi_generalization/metrics.json` : `[\w.]+` \|$", r)
                           for r in study_a)
    rows = [line for line in md.splitlines() if line.startswith("| study_")]  # every configured study
    for target in ("results/scorecard.md", "results/scorecard.json"):
        done = _cli(smoke, target)
        assert done.returncode == 0, done.stdout
        line = next(x for x in done.stdout.splitlines() if "rows:" in x)
        assert f"rows:   {len(rows)}/{len(rows)} numbers equal the value at their key in " in line, line
        assert f"{RESULTS}/metrics.json" in line


def test_whole_run_audits_clean(smoke):
    res, out = _audit(smoke, "results", "figures", "resources")
    assert res.ok, res.problems
    sidecars = [r for r in output_files(smoke) if r.endswith(A.PROV_SUFFIX)]
    assert res.checked >= len(sidecars)
    # the sidecar path is accepted too
    assert _audit(smoke, f"{RESULTS}/metrics.json{A.PROV_SUFFIX}")[0].ok


def test_tampered_artifact_names_the_file(scratch):
    rel = f"{RESULTS}/metrics.json"
    path = scratch / rel
    path.write_text(path.read_text().replace('"n": 16', '"n": 17', 1))
    done = _cli(scratch, "results/scorecard.md")
    assert done.returncode == 1
    assert f"{rel} differs from its provenance record {rel}.prov.json" in done.stdout
    assert f"{rel} differs from the hash recorded by results/scorecard.md" in done.stdout
    assert "audit FAILED" in done.stdout


def test_truncated_model_weights(scratch):
    rel = "resources/models/tiny-gpt2/model.safetensors"
    data = (scratch / rel).read_bytes()
    (scratch / rel).write_bytes(data[: len(data) // 2])
    res, out = _audit(scratch, f"{FIGURES}/table1_faithfulness.png")
    assert not res.ok
    fix = "rm resources/models/tiny-gpt2/manifest.json && snakemake all"
    assert any(p.startswith(f"model file {rel} differs") and fix in p for p in res.problems), res.problems
    res, _ = _audit(scratch, rel)  # the weights file itself: checked against the manifest
    assert not res.ok


def test_missing_and_unreadable_sidecars(scratch):
    rel = f"{RESULTS}/value_paths.csv"
    (scratch / (rel + A.PROV_SUFFIX)).unlink()
    res, _ = _audit(scratch, rel)
    assert not res.ok and any("has no provenance sidecar" in p and rel in p for p in res.problems)
    (scratch / f"{RESULTS}/circuit.json.prov.json").write_text('{"rule": "ioi_ci')
    res, _ = _audit(scratch, f"{RESULTS}/metrics.json")
    assert any(f"{RESULTS}/circuit.json.prov.json is unreadable" in p for p in res.problems), res.problems
    res, _ = _audit(scratch, f"{RESULTS}/no_such.json")
    assert not res.ok and "does not exist" in res.problems[0]


def _rebuild(work: Path, rel: str, obj) -> None:
    """Rewrite a JSON artifact and the hash in its sidecar, as a rebuild with other results would."""
    A.write_json(work / rel, obj)
    side = json.loads((work / (rel + A.PROV_SUFFIX)).read_text())
    side["sha256"] = sha256(work / rel)
    A.write_json(work / (rel + A.PROV_SUFFIX), side)


def test_stale_consumer_and_missing_input(scratch):
    """An input rebuilt after its consumer was made: the consumer is stale (made from other data)."""
    rel = f"{RESULTS}/circuit.json"
    circuit = json.loads((scratch / rel).read_text())
    _rebuild(scratch, rel, dict(circuit, n_heads=circuit["n_heads"] + 1))
    res, _ = _audit(scratch, f"{RESULTS}/metrics.json")
    assert any(p.startswith(f"{rel} differs from the hash recorded by") for p in res.problems), res.problems
    assert not [p for p in res.problems if "differs from its provenance record" in p]
    (scratch / f"{RESULTS}/eval/base.json").unlink()
    res, _ = _audit(scratch, f"{RESULTS}/metrics.json")
    assert any(f"{RESULTS}/eval/base.json (an input of {RESULTS}/metrics.json) does not exist" in p
               for p in res.problems), res.problems


def test_scorecard_number_not_from_its_artifact(scratch):
    """A scorecard row whose number is not the value at its key is reported even when the scorecard's
    own hash is consistent (as if the scorecard builder had a bug)."""
    rel = "results/scorecard.json"
    card = json.loads((scratch / rel).read_text())
    row = card["rows"][0]
    metrics = json.loads((scratch / RESULTS / "metrics.json").read_text())
    value = metrics
    for part in row["key"].split("."):
        value = value[part]
    row["ours"] = 123.0
    _rebuild(scratch, rel, card)
    res, _ = _audit(scratch, rel)
    assert res.problems == [f"{rel}: row '{row['id']}' shows 123.0 but {RESULTS}/metrics.json : {row['key']} "
                            f"is {value!r}; rebuild it: rm {rel} && snakemake all"]


def test_notebook_retries_only_a_kernel_that_died_while_starting(monkeypatch, capsys):
    import subprocess
    from types import SimpleNamespace

    from mechrepro import __main__ as cli

    calls = []

    def fake_run(args, **kw):
        calls.append(args)
        if len(calls) == 1:
            return SimpleNamespace(returncode=1, stdout="", stderr=f"RuntimeError: {cli.KERNEL_START_FAILURE}\n")
        return SimpleNamespace(returncode=0, stdout="ok\n", stderr="")

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setattr("time.sleep", lambda s: None)
    assert cli.main(["notebook", "in.ipynb", "out.ipynb", "--kernel", "python3", "-p", "dpi", "60"]) == 0
    assert len(calls) == 2 and calls[1][-7:] == ["in.ipynb", "out.ipynb", "--kernel", "python3", "-p", "dpi", "60"]
    assert "trying again" in capsys.readouterr().err
    # another failure (e.g. an exception in a cell) is returned at once
    calls.clear()
    monkeypatch.setattr(subprocess, "run", lambda a, **kw: calls.append(a) or SimpleNamespace(
        returncode=1, stdout="", stderr="PapermillExecutionError: NameError\n"))
    assert cli.main(["notebook", "in.ipynb", "out.ipynb"]) == 1 and len(calls) == 1
