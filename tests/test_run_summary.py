"""benchmarks/run_summary.py: per-study totals from Snakemake's benchmark files."""

from __future__ import annotations

import importlib.util
from pathlib import Path

HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def _module():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "run_summary.py"
    spec = importlib.util.spec_from_file_location("run_summary", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tsv(path: Path, *lines: tuple[float, str, float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEADER + "".join(f"{s}\t0:00:01\t{rss}\t1\t1\t1\t0\t0\t50\t{cpu}\n" for s, rss, cpu in lines))


def test_summary_per_study_and_rule(tmp_path, capsys):
    m = _module()
    _tsv(tmp_path / "ioi_generalization" / "ioi_circuit.tsv", (60.0, "3000.5", 80.0))
    _tsv(tmp_path / "subspace_illusion" / "facts_layer" / "layer0.tsv", (10.0, "900", 9.0))
    _tsv(tmp_path / "subspace_illusion" / "facts_layer" / "layer3.tsv", (99.0, "5", 1.0),
         (20.0, "1500", 18.0))  # the newest line counts
    _tsv(tmp_path / "mcq_circuits" / "mcq_dla.tsv", (2.0, "-", 1.0))
    _tsv(tmp_path / "shared" / "scorecard.tsv", (1.0, "300", 1.0))
    studies = m.summarise(m.read(tmp_path), "study")
    assert studies["ioi_generalization"] == {"jobs": 1, "wall_s": 60.0, "cpu_s": 80.0, "max_rss_mb": 3000.5,
                                             "peak_rule": "ioi_circuit"}
    b = studies["subspace_illusion"]
    assert b["jobs"] == 2 and b["wall_s"] == 30.0 and b["max_rss_mb"] == 1500
    assert studies["mcq_circuits"]["max_rss_mb"] == 0.0 and studies["shared"]["jobs"] == 1
    assert m.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "facts_layer" in out and "ioi_circuit" in out


def test_summary_without_benchmarks_says_what_to_do(tmp_path, capsys):
    assert _module().main([str(tmp_path)]) == 1
    assert "snakemake all" in capsys.readouterr().err
