"""Command line: ``python -m mechrepro <command>``.

* ``audit PATH [PATH ...] [--root DIR]`` — print the provenance chain of an artifact, figure,
  scorecard or results directory and check every recorded hash (exit 1 on any mismatch); see
  :mod:`mechrepro.workflow.audit`.
* ``record RULE --config JSON --inputs IN ... --outputs OUT ...`` — write provenance sidecars for
  files made outside :mod:`mechrepro.studies.ioi_generalization.stages` (the figure notebooks' PNG, CSV and executed notebook).
  The model recorded is the one the inputs' own sidecars name.
* ``preflight --inputs IN ... --outputs OUT ...`` — before a shell job (the figure notebooks): refuse
  inputs that differ from their provenance records (exit 1 with the audit's message) and remove the
  old sidecars of the outputs (:func:`mechrepro.workflow.integrity.preflight`).
* ``notebook IN OUT [papermill options]`` — run papermill; when the Jupyter kernel dies while
  starting (a port race when many kernels start at once, e.g. ``--cores 8``), try again, up to
  :data:`NOTEBOOK_ATTEMPTS` times. Any other failure is returned at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _record(args) -> int:
    from mechrepro.workflow.artifacts import PROV_SUFFIX, provenance, write_provenance

    try:
        config = json.loads(args.config)
    except json.JSONDecodeError as exc:
        print(f"record: --config is not JSON ({exc})", file=sys.stderr)
        return 2
    models = []
    for path in args.inputs:
        side = Path(str(path) + PROV_SUFFIX)
        if side.is_file():
            model = json.loads(side.read_text()).get("model")
            if model and model not in models:
                models.append(model)
    missing = [p for p in args.outputs if not Path(p).is_file()]
    if missing:
        print(f"record: missing output(s) {', '.join(missing)}", file=sys.stderr)
        return 1
    prov = provenance(args.rule, config, args.inputs, models[0] if len(models) == 1 else None)
    for out in args.outputs:
        write_provenance(out, prov)
        print(f"wrote {out}{PROV_SUFFIX}")
    return 0


NOTEBOOK_ATTEMPTS = 3
KERNEL_START_FAILURE = "Kernel died before replying to kernel_info"


def _notebook(papermill_args: list[str]) -> int:
    import subprocess
    import time

    for attempt in range(1, NOTEBOOK_ATTEMPTS + 1):
        done = subprocess.run([sys.executable, "-m", "papermill", *papermill_args], capture_output=True, text=True)
        sys.stdout.write(done.stdout)
        sys.stderr.write(done.stderr)
        if done.returncode == 0 or KERNEL_START_FAILURE not in done.stdout + done.stderr:
            return done.returncode
        if attempt < NOTEBOOK_ATTEMPTS:
            print(f"notebook: the Jupyter kernel died while starting (attempt {attempt} of {NOTEBOOK_ATTEMPTS}); "
                  "trying again", file=sys.stderr)
            time.sleep(attempt)
    return done.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mechrepro", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("audit", help="print an artifact's provenance chain and check every recorded hash")
    a.add_argument("paths", nargs="+", help="artifact, figure (PNG/CSV), scorecard, sidecar or directory")
    a.add_argument("--root", default=".", help="the workflow directory the sidecars' paths are relative to "
                                                "(default: the current directory)")
    r = sub.add_parser("record", help="write provenance sidecars for files made by a notebook")
    r.add_argument("rule")
    r.add_argument("--config", required=True, help="the config values the rule read, as JSON")
    r.add_argument("--inputs", nargs="*", default=[])
    r.add_argument("--outputs", nargs="+", required=True)
    f = sub.add_parser("preflight", help="refuse damaged inputs of a job; remove its outputs' old sidecars")
    f.add_argument("--inputs", nargs="*", default=[])
    f.add_argument("--outputs", nargs="*", default=[])
    n = sub.add_parser("notebook", help="run papermill, retrying when the kernel dies while starting")
    n.add_argument("papermill_args", nargs=argparse.REMAINDER, help="papermill's arguments")
    args = parser.parse_args(argv)
    if args.command == "notebook":
        return _notebook(args.papermill_args)
    if args.command == "preflight":
        from mechrepro.workflow.integrity import IntegrityError, preflight

        try:
            preflight(args.inputs, args.outputs)
        except IntegrityError as exc:
            print(exc, file=sys.stderr)
            return 1
        return 0
    if args.command == "audit":
        from mechrepro.workflow.audit import audit

        if not (Path(args.root) / "Snakefile").is_file():
            print(f"note: {Path(args.root).resolve()} has no Snakefile; paths in sidecars are relative to the "
                  "workflow directory (use --root)")
        return 0 if audit(args.paths, root=args.root, out=_print).ok else 1
    return _record(args)


def _print(line: str) -> None:
    try:
        print(line)
    except BrokenPipeError:  # piped into e.g. `head`: finish the audit quietly, keep its exit status
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


if __name__ == "__main__":
    sys.exit(main())
