"""The Snakemake report: its front page is the replication report (every claim with its verdict),
and each figure's caption comes from its study's registry entry (``Study.caption(config, fig)``,
rendered by ``workflow/report/figure.rst``) and describes that study and that figure.

Unit tests render every caption of both shipped configurations with docutils, and the front page
of a small report as Snakemake does (Jinja, then docutils). The integration tests build
``snakemake --report`` on the shared smoke run: one reads the captions in the HTML, one opens the
report in headless Chromium (tests/browser.py) and checks from the rendered DOM that every claim row,
figure and caption is there, keeping a screenshot of the front page (ci-artifacts/report-front.png);
a workflow test changes a metric in a copy of the run and checks that the verdict it decides flips
in results/replication.md and on the report's front page.
"""

from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from mechrepro.studies import studies
from smoke_utils import BIN, run, shared_run

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("config/config.yaml", "config/smoke.yaml")


@pytest.mark.parametrize("configfile", CONFIGS)
def test_captions_are_clean_restructuredtext_naming_their_study_and_figure(configfile):
    from docutils.core import publish_parts

    config = yaml.safe_load((ROOT / configfile).read_text())
    for s in studies().values():
        others = {f"Study {o.letter} figure" for o in studies().values()} - {f"Study {s.letter} figure"}
        for fig in s.figures:
            text = s.caption(config, fig)
            warnings = io.StringIO()
            html = publish_parts(text, writer="html",
                                 settings_overrides={"warning_stream": warnings, "report_level": 1})["body"]
            assert warnings.getvalue() == "", f"{s.name}/{fig}: {warnings.getvalue()}"
            assert text.startswith(f"Study {s.letter} figure ``{fig}``"), text
            assert not any(o in text for o in others), text
            assert "system-message" not in html


def _report_results(html: str) -> dict:
    """The report's ``var results = {...}`` (one line): output file -> name, caption (HTML), ..."""
    line = next(l for l in html.splitlines() if l.lstrip().startswith("var results = {"))
    return json.loads(line.split("=", 1)[1].strip().rstrip(";"))


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, Path]:
    """The shared smoke run and ``snakemake --report`` built on it (once per module)."""
    work = shared_run(tmp_path_factory, "cores2", "2")
    out = tmp_path_factory.mktemp("report") / "report.html"
    run([BIN / "snakemake", "--report", out], work, timeout=600)
    return work, out


@pytest.mark.integration
def test_report_captions_name_their_study_and_figure(report):
    work, out = report
    results = _report_results(out.read_text())
    config = yaml.safe_load((work / "config" / "config.yaml").read_text())
    expected = {f"{s.figures_dir}/{fig}.png": (s, fig) for s in studies().values() for fig in s.figure_names(config)}
    assert set(expected) <= set(results), sorted(set(expected) - set(results))
    for path, (s, fig) in expected.items():
        caption = results[path]["caption"]
        assert re.search(rf"Study {s.letter} figure <tt[^>]*>{fig}</tt>", caption), (path, caption)
        others = [f"Study {o.letter} figure" for o in studies().values() if o.letter != s.letter]
        assert not any(o in caption for o in others), (path, caption)
        assert "system-message" not in caption, (path, caption)


# ------------------------------------------------------------------------------------ the front page
def _front_html(rst: str, figures: list[str]) -> str:
    """The front page as Snakemake renders it: Jinja (with its links to the report's figures), then docutils."""
    from types import SimpleNamespace

    from docutils.core import publish_parts
    from jinja2 import Environment

    files = [SimpleNamespace(target=Path(f).name, path=f) for f in figures]
    links = "".join(f"\n.. _{f.target}: javascript:app.showResultInfo('{f.path}')" for f in files)
    text = Environment(trim_blocks=True, lstrip_blocks=True).from_string(rst + "\n" + links).render(
        files=files, categories={})
    warnings = io.StringIO()
    html = publish_parts(text, writer="html", settings_overrides={"warning_stream": warnings})["html_body"]
    assert warnings.getvalue() == "" and "system-message" not in html, warnings.getvalue()
    return html


def _fake_run(tmp_path, toy_v: float) -> tuple[dict, dict[str, str]]:
    """A run directory with Study B's metrics only (the toy network's numbers and an IOI part)."""
    from mechrepro.workflow.artifacts import write_json

    metrics = tmp_path / "results" / "subspace_illusion" / "metrics.json"
    write_json(metrics, {"model": "m", "model_spec": {"n_layers": 4},
                         "toy": {"v": toy_v, "e3": -2.0, "v_null": 0.0, "v_row": 0.0},
                         "ioi": {"clean_acc": 0.2, "clean_ld": 0.1},
                         "facts": {"0": {"flip_frac_1d": 0.5}, "2": {"flip_frac_1d": 0.25}}})
    config = {"studies": ["subspace_illusion"], "facts": {"layers": [0, 2]}}
    return config, {"study_b": str(metrics), "study_b_facts": str(metrics)}


@pytest.mark.parametrize("toy_v,verdict", [(-2.0, "reproduced"), (0.0, "not reproduced")])
def test_front_page_and_replication_report_show_each_claims_verdict(tmp_path, monkeypatch, toy_v, verdict):
    from mechrepro.workflow import report as R

    monkeypatch.chdir(tmp_path)
    config, paths = _fake_run(tmp_path, toy_v)
    rep = R.assemble(config, ROOT / "reference" / "published.yaml", paths)
    assert [s.name for s in rep] == ["subspace_illusion"]
    claims = rep[0].claims
    assert {c["id"] for c in claims} >= {"B1", "B2", "B9", "B14"}
    by_id = {c["id"]: c for c in claims}
    assert by_id["B1"]["verdict"] == verdict
    assert all(c["verdict"] == "untestable" for c in claims if c["id"] != "B1")  # no ability, missing metrics
    md = R.to_replication_markdown(rep)
    row = next(line for line in md.splitlines() if line.startswith("| B1 |"))
    assert f"| {R.VERDICT_TEXT[verdict]} |" in row and f"effect v {R.fmt(toy_v)};" in row
    assert "`python -m mechrepro audit results/subspace_illusion/metrics.json figures/subspace_illusion/toy_example.png`" in row
    rows = [line for line in md.splitlines() if re.match(r"\| B\d+ \|", line)]
    assert len(rows) == len(claims) and all(line.count(" | ") == 6 for line in rows)
    # the facts rows of GPT2-XL's layers map to ours by relative depth (layer 2 of 4 = 0.5 <-> 25 of 48)
    facts = {r["id"]: r for r in rep[0].numbers if r["study"] == "study_b_facts"}
    assert facts["facts.25.flip_frac_1d"]["key"] == "facts.2.flip_frac_1d" and facts["facts.25.flip_frac_1d"]["ours"] == 0.25
    assert "our layer 2/4 = 0.50" in facts["facts.25.flip_frac_1d"]["comparison"]
    assert facts["facts.10.flip_frac_1d"]["ours"] is None and "not compared" in facts["facts.10.flip_frac_1d"]["comparison"]
    html = _front_html(R.to_rst(rep), ["figures/subspace_illusion/toy_example.png"])
    cells = re.search(r"<tr><td>B1</td>(.*?)</tr>", html, re.DOTALL).group(1)
    assert f"<td>{verdict}</td>" in cells and "javascript:app.showResultInfo('figures/subspace_illusion/toy_example.png')" in cells
    # a figure the report lacks is named, not linked (no broken reference)
    html = _front_html(R.to_rst(rep), [])
    assert "toy_example.png" in html and "showResultInfo" not in html


def test_readme_claims_tables_are_not_stale():
    """README.md's claims tables were tested against the claims of reference/published.yaml as they are
    (otherwise: rerun the default model and `make readme-results RUN=<its directory>`)."""
    from mechrepro.workflow.report import check_readme

    assert check_readme(ROOT / "README.md", ROOT / "reference" / "published.yaml") == []


def test_readme_block_is_rebuilt_from_a_replication_report(tmp_path, monkeypatch):
    from mechrepro.workflow import report as R

    monkeypatch.chdir(tmp_path)
    config, paths = _fake_run(tmp_path, -2.0)
    rep = R.assemble(config, ROOT / "reference" / "published.yaml", paths)
    (tmp_path / "results" / "replication.md").write_text(R.to_replication_markdown(rep))
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{R.BEGIN} old -->\nold table\n{R.END}\n\nrest\n")
    R.update_readme(readme, tmp_path, ROOT / "reference" / "published.yaml")
    text = readme.read_text()
    assert text.startswith("# x\n\n") and text.endswith("\n\nrest\n") and "old table" not in text
    assert "**Study B: subspace-patching illusion** — our model: `m`" in text
    assert "[toy_example](figures/subspace_illusion/toy_example.png)" in text
    problems = R.check_readme(readme, ROOT / "reference" / "published.yaml")
    assert len(problems) == 1 and "shows the claims" in problems[0]  # only Study B's claims are in it
    readme.write_text(text.replace(R.claims_sha256(ROOT / "reference" / "published.yaml"), "0" * 64))
    assert any("other claims" in p for p in R.check_readme(readme, ROOT / "reference" / "published.yaml"))


# ------------------------------------------------------------------------------------ in a browser
ARTIFACT = ROOT / "ci-artifacts" / "report-front.png"  # kept by CI (gitignored)
TABLE_ROWS = """return Array.from(document.querySelectorAll('table tr')).map(
    tr => Array.from(tr.cells).map(td => td.innerText.trim()));"""
SHOWS_IMAGE = """const img = document.querySelector('img[src^="data:image/png"]');
    return img !== null && img.complete && img.naturalWidth > 0;"""
CLICK_VIEW = """const span = Array.from(document.querySelectorAll('span')).find(s => s.textContent === arguments[0]);
    if (!span) return false;
    const link = span.parentElement.querySelector('a');
    if (!link) return false;
    link.click();
    return true;"""


def _browser_or_skip():
    import os

    import browser

    if not browser.available():
        message = (f"headless Chromium is not installed ({browser.CHROMIUM}, {browser.CHROMEDRIVER}): "
                   "scripts/install_browser.sh installs Debian's chromium and chromium-driver")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return browser


@pytest.mark.integration
def test_report_in_a_browser_shows_every_claim_figure_and_caption(report):
    """Open the Snakemake report in headless Chromium: the front page (the workflow description) is the
    replication report with one row per claim and its verdict; every figure is in its study's category,
    opens as an image, and shows its caption."""
    browser = _browser_or_skip()
    work, out = report
    claims = json.loads((work / "results" / "scorecard.json").read_text())["claims"]
    config = yaml.safe_load((work / "config" / "config.yaml").read_text())
    figures = {f"{s.figures_dir}/{fig}.png": (s, fig) for s in studies().values() for fig in s.figure_names(config)}
    with browser.Browser() as b:
        b.open(out.resolve().as_uri())
        b.wait_for("return document.body.innerText.includes('Replication report')")
        rows = {r[0]: r for r in b.run(TABLE_ROWS) if r}
        for c in claims:
            assert c["id"] in rows, f"claim {c['id']} is not on the front page"
            row = rows[c["id"]]
            assert row[4] == c["verdict"] and row[5].startswith(c["figure"]), (c["id"], row)
        counts = {s.name: {v: sum(c["verdict"] == v for c in claims if c["study"] in s.scorecard)
                           for v in ("reproduced", "partly reproduced", "not reproduced", "untestable")}
                  for s in studies().values()}
        for s in studies().values():
            assert rows[f"{s.letter}: {s.title}"][2:] == [str(n) for n in counts[s.name].values()]
        b.screenshot(ARTIFACT)
        assert ARTIFACT.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        # a figure link of the front page opens the figure's entry in the report
        first = claims[0]
        b.run("Array.from(document.querySelectorAll('a')).find(a => a.textContent === arguments[0]).click();",
              f"{first['figure']}.png")
        b.wait_for("return document.body.innerText.includes(arguments[0])", f"figure {first['figure']}")
        for path, (s, fig) in figures.items():
            b.run("app.showCategory(arguments[0]);", s.category)
            b.wait_for("return document.body.innerText.includes(arguments[0])", f"{fig}.png")
            b.run("app.showResultInfo(arguments[0]);", path)
            caption = b.wait_for("return document.body.innerText.includes(arguments[0]) && document.body.innerText",
                                 f"Study {s.letter} figure {fig} (")
            assert "The plotted numbers are in the CSV beside the PNG." in caption, path
            assert b.run(CLICK_VIEW, path), f"no view button for {path}"
            b.wait_for(SHOWS_IMAGE)
            b.run("app.setView({content: 'rulegraph'});")


@pytest.mark.workflow
def test_a_changed_metric_flips_its_verdict_in_the_report(smoke_copy):
    """Change one metric (the toy network's effect of v) in a copy of the run, consistently with its
    sidecar as a rebuild would: the scorecard reruns and the claim it decides flips, in
    results/replication.md and on the report's front page."""
    from mechrepro.workflow import artifacts as A

    rel = "results/subspace_illusion/metrics.json"
    metrics = json.loads((smoke_copy / rel).read_text())
    before = json.loads((smoke_copy / "results" / "scorecard.json").read_text())["claims"]
    assert next(c for c in before if c["id"] == "B1")["verdict"] == "reproduced"
    metrics["toy"]["v"] = 0.0
    A.write_json(smoke_copy / rel, metrics)
    side = json.loads((smoke_copy / (rel + A.PROV_SUFFIX)).read_text())
    side["sha256"] = A.sha256_file(smoke_copy / rel)
    A.write_json(smoke_copy / (rel + A.PROV_SUFFIX), side)
    run([BIN / "snakemake", "results/replication.md", "--cores", "1"], smoke_copy, timeout=600)
    after = json.loads((smoke_copy / "results" / "scorecard.json").read_text())["claims"]
    changed = {c["id"]: c["verdict"] for c in after}.items() ^ {c["id"]: c["verdict"] for c in before}.items()
    assert changed == {("B1", "not reproduced"), ("B1", "reproduced")}
    md = (smoke_copy / "results" / "replication.md").read_text()
    assert re.search(r"^\| B1 \|.*\| effect v 0; .*\| not reproduced \|", md, re.MULTILINE), md
    out = smoke_copy / "report.html"
    run([BIN / "snakemake", "--report", out], smoke_copy, timeout=600)
    desc = out.read_text()
    assert re.search(r"<tr><td>B1</td>.*?<td>not reproduced</td>", desc, re.DOTALL)


@pytest.mark.integration
def test_replication_report_audits_clean(report):
    """Every number of results/replication.md is the value at its key in the metrics file it names."""
    work, _ = report
    md = (work / "results" / "replication.md").read_text()
    n = sum(bool(re.match(r"\| study_\w+ \| ", line)) for line in md.splitlines())
    done = run([sys.executable, "-m", "mechrepro", "audit", "results/replication.md"], work, check=False)
    assert done.returncode == 0, done.stdout[-3000:]
    assert f"rows:   {n}/{n} numbers equal the value at their key" in done.stdout
    claims = json.loads((work / "results" / "scorecard.json").read_text())["claims"]
    assert all(re.search(rf"^\| {c['id']} \|", md, re.MULTILINE) for c in claims)
    # the smoke models can do none of the tasks: no claim about them is reproduced but the toy network's
    assert {c["id"] for c in claims if c["verdict"] == "reproduced"} <= {"B1"}
