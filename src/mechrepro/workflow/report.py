"""The replication report: per study, every claim of its paper with its verdict, beside its figure.

The ``scorecard`` rule (:func:`scorecard`) writes

* ``results/scorecard.json``: the numbers (``rows``) and the claims with their verdicts (``claims``);
* ``results/scorecard.md``: the numbers table;
* ``results/replication.md``: the report, readable on GitHub: a summary, then per study its claims
  table (claim, the paper's evidence, our numbers, verdict, figure, the ``python -m mechrepro
  audit`` command that traces it), the rule behind each verdict, and its numbers table;
* ``results/replication.rst``: the summary and the claims tables with the rule of each verdict, as
  the front page of ``snakemake --report`` (the workflow description; the Snakefile's ``report:``
  points to it once it exists). It is a Jinja template as Snakemake renders it: each figure links
  to the figure in the report.

The README shows the claims tables of the default run: ``python -m mechrepro.workflow.report
readme RUN_DIR`` copies them from ``RUN_DIR/results/replication.md`` between the README's markers,
with the hash of the claims they were tested against; ``--check`` fails when the claims of
``reference/published.yaml`` have changed since (``make readme-results`` / ``make lint``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from mechrepro.workflow import claims as C
from mechrepro.workflow.scorecard import build, claim_rows, fmt, number_lines, to_markdown

REFERENCE = "reference/published.yaml"
AUDIT = "python -m mechrepro audit"
VERDICT_TEXT = {C.REPRODUCED: "**reproduced**", C.PARTLY: "partly reproduced", C.NOT_REPRODUCED: "not reproduced",
                C.UNTESTABLE: "untestable"}


@dataclass
class StudyReport:
    """One configured study's part of the report."""

    name: str
    letter: str
    title: str
    paper: str
    category: str
    metrics: str
    figures_dir: str
    drawn: list[str]
    model: str | None
    model_description: str | None
    claims: list[dict]
    numbers: list[dict]


def assemble(config: dict, reference: str | Path, metrics_paths: dict[str, str]) -> list[StudyReport]:
    """The report of every configured study, in the registry's order (``metrics_paths``: scorecard
    entry → ``metrics.json``, as :func:`mechrepro.workflow.pipeline.study_metrics`)."""
    from mechrepro.studies import studies

    numbers, claims = build(reference, metrics_paths), claim_rows(reference, metrics_paths)
    out = []
    for s in studies().values():
        if s.name not in config["studies"]:
            continue
        mine = [r for r in numbers if r["study"] in s.scorecard]
        first = json.loads(Path(s.metrics).read_text()) if Path(s.metrics).is_file() else {}
        out.append(StudyReport(s.name, s.letter, s.title, s.paper, s.category, s.metrics, s.figures_dir,
                               s.figure_names(config), first.get("model"), first.get("model_description"),
                               [c for c in claims if c["study"] in s.scorecard], mine))
    return out


def counts(report: list[StudyReport]) -> dict[str, dict[str, int]]:
    """Per study, how many claims got each verdict."""
    return {s.name: {v: sum(c["verdict"] == v for c in s.claims) for v in C.VERDICTS} for s in report}


def shown(c: dict) -> str:
    """Our numbers of a claim: ``label value; label value``."""
    return "; ".join(f"{label} {fmt(v)}" for label, v in c["shown"].items())


def audit_command(s: StudyReport, c: dict) -> str:
    fig = f" {s.figures_dir}/{c['figure']}.png" if c["figure"] in s.drawn else ""
    return f"{AUDIT} {s.metrics}{fig}"


def rule_text(c: dict) -> str:
    """The rule behind a verdict: the tests and what this run gave."""
    parts = [f"reproduced when `{c['test']}`"]
    if c["partly"]:
        parts.append(f"partly reproduced when `{c['partly']}`")
    if c["requires"]:
        parts.append(f"testable when `{c['requires']}`")
    return "; ".join(parts) + f". Here: {c['reason']}."


# ------------------------------------------------------------------------------------------ Markdown
CLAIMS_HEADER = ["| # | claim | paper's evidence | ours | verdict | figure | trace |", "|---|---|---|---|---|---|---|"]


def claim_lines(s: StudyReport, figure_prefix: str = "../") -> list[str]:
    """The claims table of one study (``figure_prefix``: the figures' path from the document)."""
    lines = list(CLAIMS_HEADER)
    for c in s.claims:
        fig = (f"[{c['figure']}]({figure_prefix}{s.figures_dir}/{c['figure']}.png)" if c["figure"] in s.drawn
               else f"{c['figure']} (not drawn)")
        lines.append(f"| {c['id']} | {c['claim']} ({c['where']}) | {c['evidence']} ({c['paper_model']}) | {shown(c)} | "
                     f"{VERDICT_TEXT[c['verdict']]} | {fig} | `{audit_command(s, c)}` |")
    return lines


def study_markdown(s: StudyReport) -> list[str]:
    model = f"`{s.model}`" + (f" ({s.model_description})" if s.model_description else "")
    out = [f"## Study {s.letter}: {s.title}", "", f"Paper: {s.paper}. Our model: {model}.", ""]
    if not s.claims:
        out += ["No claims of this paper are recorded in `reference/published.yaml`.", ""]
    else:
        out += [f"<!-- claims:{s.name} -->", *claim_lines(s), f"<!-- end claims:{s.name} -->", "",
                f"Rules (tests over `{s.metrics}`):", ""]
        out += [f"- **{c['id']}**: {rule_text(c)}" for c in s.claims] + [""]
    if s.numbers:
        out += [f"### Study {s.letter}: numbers", "", *number_lines(s.numbers), ""]
    return out


def summary_lines(report: list[StudyReport]) -> list[str]:
    n = counts(report)
    lines = ["| study | model | " + " | ".join(C.VERDICTS) + " |", "|---|---|" + "---|" * len(C.VERDICTS)]
    for s in report:
        lines.append(f"| {s.letter}: {s.title} | `{s.model}` | " + " | ".join(str(n[s.name][v]) for v in C.VERDICTS) + " |")
    return lines


INTRO = ("Every claim of the replicated papers (`reference/published.yaml`) tested on this run's metrics. "
         "Verdicts: **reproduced** (the claim's test holds); partly reproduced (only its weaker test holds); "
         "not reproduced; untestable (a metric the test needs is missing or null, or this model cannot do "
         "the task the claim is about). The rule behind each verdict is under each table. Numbers are "
         "compared only when they come from the same model, or through the stated relative-depth mapping.")


def to_replication_markdown(report: list[StudyReport]) -> str:
    lines = ["# Replication report", "", INTRO, "", *summary_lines(report), ""]
    for s in report:
        lines += study_markdown(s)
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ RST
def _rst(text: str) -> str:
    """Plain text in reStructuredText (markup characters escaped) and in Snakemake's Jinja template."""
    text = re.sub(r"([\\*`_|])", r"\\\1", str(text))
    return text.replace("{{", "{ {").replace("{%", "{ %").replace("{#", "{ #")


def _literal(text: str) -> str:
    return f"``{text}``".replace("{{", "{ {").replace("{%", "{ %").replace("{#", "{ #")


def _table(header: list[str], rows: list[list[str]], widths: str) -> list[str]:
    out = [".. list-table::", "   :header-rows: 1", f"   :widths: {widths}", ""]
    for row in [header, *rows]:
        out += [f"   * - {row[0]}"] + [f"     - {cell}" for cell in row[1:]]
    return out + [""]


def _figure_link(s: StudyReport, fig: str) -> str:
    """A link to the figure in the report when the report has it (Jinja decides, at report time)."""
    if fig not in s.drawn:
        return f"{_rst(fig)} (not drawn)"
    target = f"{fig}.png"
    # the space after endif keeps the line's newline (Snakemake's Jinja removes the first one after a tag)
    return (f'{{% if "{target}" in files|map(attribute="target")|list %}}`{target}`_{{% else %}}{_rst(target)}'
            f"{{% endif %}} ")


def study_rst(s: StudyReport) -> list[str]:
    title = f"Study {s.letter}: {s.title}"
    out = [_rst(title), "-" * len(_rst(title)), "", f"Paper: {_rst(s.paper)}. Our model: {_literal(s.model)}.", ""]
    rows = [[_rst(c["id"]), f"{_rst(c['claim'])} ({_rst(c['where'])})", f"{_rst(c['evidence'])} ({_rst(c['paper_model'])})",
             _rst(shown(c)), _rst(c["verdict"]), _figure_link(s, c["figure"]), _literal(audit_command(s, c))]
            for c in s.claims]
    if rows:
        out += _table(["#", "claim", "paper's evidence", "ours", "verdict", "figure", "trace"], rows, "4 30 22 16 8 10 10")
    else:
        out += ["No claims of this paper are recorded in the reference file.", ""]
    return out


# Snakemake's report shows the description in a narrow column (max-w-lg) of a container that centres its
# content, which cuts off the top of a long page: the front page widens the one and top-aligns the other.
FRONT_STYLE = [".. raw:: html", "",
               "   <style>.prose.max-w-lg { max-width: 80rem; } "
               "div.justify-center.overflow-auto { align-items: flex-start; justify-content: flex-start; }</style>", ""]


def to_rst(report: list[StudyReport]) -> str:
    """The report's front page (reStructuredText, rendered by Snakemake's Jinja first): the summary and
    each study's claims table, then the rule of each verdict (the numbers are in replication.md)."""
    n = counts(report)
    intro = _rst(INTRO.replace("`", "").replace("The rule behind each verdict is under each table.",
                                                "The rule behind each verdict follows the tables."))
    lines = ["Replication report", "==================", "", *FRONT_STYLE, intro, ""]
    lines += _table(["study", "model", *C.VERDICTS],
                    [[_rst(f"{s.letter}: {s.title}"), _literal(s.model), *(str(n[s.name][v]) for v in C.VERDICTS)]
                     for s in report], "30 20 10 10 10 10")
    for s in report:
        lines += study_rst(s)
    lines += ["Rules of the verdicts", "---------------------", ""]
    lines += [f"* **{_rst(c['id'])}**: {_rst(rule_text(c).replace('`', ''))}" for s in report for c in s.claims]
    lines += ["", f"The papers' numbers beside ours: {_literal('results/replication.md')} (and "
                  f"{_literal('results/scorecard.md')}).", ""]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ the stage
def scorecard(snk) -> None:
    """The ``scorecard`` rule: ``results/scorecard.{json,md}``, ``results/replication.{md,rst}``."""
    from mechrepro.workflow import artifacts as art
    from mechrepro.workflow.pipeline import study_metrics
    from mechrepro.workflow.stage import prov, setup

    setup(snk)
    report = assemble(snk.config, snk.input.reference, {key: snk.input[key] for key in study_metrics(snk.config)})
    rows, claims = [r for s in report for r in s.numbers], [c for s in report for c in s.claims]
    record = prov(snk)
    art.save_json(snk.output.json, {"rows": rows, "claims": claims}, record)
    for path, text in ((snk.output.md, to_markdown(rows)), (snk.output.replication, to_replication_markdown(report)),
                       (snk.output.front, to_rst(report))):
        art.write_text(path, text)
        art.write_provenance(path, record)


# ------------------------------------------------------------------------------------------ README
BEGIN, END = "<!-- replication:begin", "<!-- replication:end -->"


def claims_sha256(reference: str | Path = REFERENCE) -> str:
    """The hash of every claim of the reference file (what the README's verdicts were tested against)."""
    ref = yaml.safe_load(Path(reference).read_text())
    claims = {key: entry.get("claims", []) for key, entry in ref.items() if isinstance(entry, dict)}
    return hashlib.sha256(yaml.safe_dump(claims, sort_keys=True).encode()).hexdigest()


def readme_block(replication_md: str, digest: str) -> str:
    """The README's results: each study's heading, model and claims table from ``replication.md``
    (figure links made relative to the repository root)."""
    out = [f"{BEGIN} generated by `make readme-results` from results/replication.md of the default run; "
           f"claims sha256 {digest} -->"]
    for m in re.finditer(r"^## (Study .+?)\n\n(Paper: .+?)\n\n<!-- claims:(\w+) -->\n(.*?)\n<!-- end claims:\3 -->",
                         replication_md, re.MULTILINE | re.DOTALL):
        table = m.group(4).replace("](../figures/", "](figures/")
        model = m.group(2).split(" Our model: ", 1)[-1]
        out += ["", f"**{m.group(1)}** — our model: {model}", "", table]
    return "\n".join(out + ["", END])


def update_readme(readme: str | Path, run_dir: str | Path, reference: str | Path = REFERENCE) -> None:
    """Replace the README's results block by the claims tables of ``run_dir``'s report."""
    path = Path(readme)
    text = path.read_text()
    block = readme_block((Path(run_dir) / "results" / "replication.md").read_text(), claims_sha256(reference))
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"{path} has no '{BEGIN} ... {END}' block to replace")
    path.write_text(text[:start] + block + text[end + len(END):])


def check_readme(readme: str | Path, reference: str | Path = REFERENCE) -> list[str]:
    """Problems of the README's results block: missing, or tested against other claims than the
    reference file's now (then run the default model and ``make readme-results``)."""
    text = Path(readme).read_text()
    m = re.search(re.escape(BEGIN) + r".*?claims sha256 (\w+) -->(.*?)" + re.escape(END), text, re.DOTALL)
    if not m:
        return [f"{readme} has no results block ('{BEGIN} ... {END}')"]
    problems = []
    if m.group(1) != claims_sha256(reference):
        problems.append(f"the claims tables of {readme} were tested against other claims than those of {reference} "
                        "now: rerun the default model and 'make readme-results RUN=<its directory>'")
    ref = yaml.safe_load(Path(reference).read_text())
    want = [c["id"] for e in ref.values() if isinstance(e, dict) for c in e.get("claims", [])]
    have = re.findall(r"^\| ([A-Z]\d+) \|", m.group(2), re.MULTILINE)
    if sorted(have) != sorted(want):
        problems.append(f"{readme} shows the claims {sorted(have)}, the reference file has {sorted(want)}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mechrepro.workflow.report",
                                     description="The README's claims tables from a run's results/replication.md.")
    parser.add_argument("run_dir", nargs="?", default=".", help="the run's workflow directory (default: .)")
    parser.add_argument("--readme", default="README.md")
    parser.add_argument("--reference", default=REFERENCE)
    parser.add_argument("--check", action="store_true", help="exit 1 if the README's tables are stale")
    args = parser.parse_args(argv)
    if args.check:
        problems = check_readme(args.readme, args.reference)
        for p in problems:
            print(p, file=sys.stderr)
        if not problems:
            print(f"{args.readme}: the claims tables match the claims of {args.reference}")
        return 1 if problems else 0
    update_readme(args.readme, args.run_dir, args.reference)
    print(f"updated the claims tables of {args.readme} from {args.run_dir}/results/replication.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
