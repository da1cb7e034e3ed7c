"""The package's layout rules, checked on the source: short functions, plumbing that knows no
study, and rules, stage functions and the study registry that agree with each other."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

import mechrepro.studies as registry
from mechrepro.studies import rule_config, stage_module

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "mechrepro"
RULES = ROOT / "workflow" / "rules"
MAX_LINES = 80


def _modules(under: Path) -> list[Path]:
    return sorted(under.rglob("*.py"))


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def function_lengths(tree: ast.Module) -> list[tuple[str, int, int]]:
    """``(qualified name, first line, number of lines)`` of every function and method of a module,
    counted from its ``def`` line to its last line (decorators excluded)."""
    out = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                out.append((name, child.lineno, child.end_lineno - child.lineno + 1))
                visit(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(tree, "")
    return out


def test_function_lengths_are_counted_from_def_to_the_last_line():
    src = ("import functools\n\n\n@functools.cache\ndef f():\n    def g():\n        return 1\n\n    return g\n\n\n"
           "class C:\n    @property\n    def p(self):\n        return 1\n")
    assert function_lengths(ast.parse(src)) == [("f", 5, 5), ("f.g", 6, 2), ("C.p", 14, 2)]


def test_no_library_function_is_longer_than_80_lines():
    long = [f"{path.relative_to(ROOT)}:{line} {name} ({n} lines)"
            for path in _modules(SRC) for name, line, n in function_lengths(_tree(path)) if n > MAX_LINES]
    assert not long, f"functions longer than {MAX_LINES} lines (split them into named steps):\n  " + "\n  ".join(long)


def _study_packages() -> set[str]:
    return {p.name for p in (SRC / "studies").iterdir() if (p / "__init__.py").is_file()}


def test_the_workflow_package_imports_no_study():
    """``mechrepro.workflow`` is plumbing: it may read the registry (``mechrepro.studies``), never a
    study's own modules (not even inside a function)."""
    studies = _study_packages()
    assert studies, "no study package found"
    bad = []
    for path in _modules(SRC / "workflow"):
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + ([f"{node.module}.{a.name}" for a in node.names]
                                         if node.module == "mechrepro.studies" else [])
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[:2] == ["mechrepro", "studies"] and len(parts) > 2 and parts[2] in studies:
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {name}")
    assert not bad, "the workflow package imports study modules:\n  " + "\n  ".join(bad)


def _smk_rules() -> dict[str, tuple[Path, str]]:
    """Every rule of ``workflow/rules/*.smk``: name → (file, the rule's text up to the next rule)."""
    rules: dict[str, tuple[Path, str]] = {}
    for path in sorted(RULES.glob("*.smk")):
        text = path.read_text()
        starts = [(m.group(1), m.start()) for m in re.finditer(r"^rule (\w+):", text, re.MULTILINE)]
        for i, (name, start) in enumerate(starts):
            end = starts[i + 1][1] if i + 1 < len(starts) else len(text)
            assert name not in rules, f"rule {name} is defined in {rules[name][0].name} and {path.name}"
            rules[name] = (path, text[start:end])
    return rules


def _is_shell(body: str) -> bool:
    return re.search(r"^\s+shell:", body, re.MULTILINE) is not None


def test_the_rules_files_are_found():
    rules = _smk_rules()
    assert {"prepare_model", "figure", "scorecard", "ioi_dataset", "mcq_metrics", "subspace_toy"} <= set(rules)
    assert _is_shell(rules["figure"][1]) and not _is_shell(rules["ioi_dataset"][1])


@pytest.mark.parametrize("rule", sorted(r for r, (_, body) in _smk_rules().items() if r != "all" and not _is_shell(body)))
def test_every_rule_has_its_stage_function(rule):
    path, body = _smk_rules()[rule]
    assert '"../scripts/stage.py"' in body, f"rule {rule} ({path.name}) must run workflow/scripts/stage.py"
    module = stage_module(rule)
    fn = getattr(importlib.import_module(module), rule, None)
    assert callable(fn), f"rule {rule} ({path.name}) has no stage function {module}.{rule}"


def test_the_registry_declares_exactly_the_rules_of_the_rules_files():
    declared = set(rule_config())
    written = set(_smk_rules()) - {"all"}
    assert not declared - written, f"declared in the registry but in no workflow/rules/*.smk: {sorted(declared - written)}"
    assert not written - declared, f"in workflow/rules/*.smk but declared by no study: {sorted(written - declared)}"


def test_every_study_package_is_registered():
    assert _study_packages() == set(registry.studies())
