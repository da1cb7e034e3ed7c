"""The report's figure captions: each figure's caption comes from its study's registry entry
(``Study.caption(config, fig)``, rendered by ``workflow/report/figure.rst``) and describes that
study and that figure.

The unit test renders every caption of both shipped configurations with docutils; the integration
test builds ``snakemake --report`` on a finished smoke run and reads the captions in the HTML.
"""

from __future__ import annotations

import io
import json
import re
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


@pytest.mark.integration
def test_report_captions_name_their_study_and_figure(tmp_path_factory):
    work = shared_run(tmp_path_factory, "cores2", "2")
    out = tmp_path_factory.mktemp("report") / "report.html"
    run([BIN / "snakemake", "--report", out], work, timeout=600)
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
