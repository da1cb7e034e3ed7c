"""Nothing a user does loses results or blesses bad data (the smoke run, copies of it).

One test per class of mistake or fault, each on a private copy of the finished smoke run
(``smoke_copy``) where it damages something, each as cheap as it can be (a refusal costs one
parse of the Snakefile; a repair reruns only what was lost):

* **Validation before any job.** Values a job would reject (a layer outside the model, a model
  name typo in ``mcq.model``, ``8.0`` for an integer, a count above its bound, bad data files)
  stop ``snakemake all`` when the Snakefile is parsed: no job starts, no file changes.
* **Damaged inputs are refused, never recorded.** A byte flipped in an intermediate (ROME's key
  statistic ``Σ``) or in the model's weights stops ``snakemake all`` before any job starts (when
  ``rule all``'s inputs are listed), a run of another target too (Snakemake's ``onstart``), a job
  started anyway (``--no-hooks``) refuses it itself, and ``dvc.lock`` is never updated with it
  (``pipeline.record_in_dvc``); ``dvc status`` sees the damaged weights.
* **``snakemake all`` repairs what is missing.** Files deleted by hand, the outputs of a job
  interrupted with SIGINT and of a failed figure notebook are rebuilt by ``snakemake all`` (no
  ``--forcerun``), with the bytes of the clean run; the audit's advice is that command; a failed
  notebook leaves neither its figure nor an orphan sidecar.
* **Files named by the config are tracked.** A CounterFact file named by
  ``facts.counterfact_file`` is an input of ``facts_dataset`` (its hash in the sidecar, a DVC
  dependency), and editing it reruns what depends on it.

SIGKILLs of the whole run are in ``test_faults.py``; the ``--cores`` independence of every byte
in ``test_parallel.py``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from smoke_utils import BIN, ROOT, compare_runs, env, output_files, run, sha256

from mechrepro.studies import study

pytestmark = pytest.mark.workflow

A, B = study("ioi_generalization").results, study("subspace_illusion").results
SIGMA = f"{B}/rome/key_stats/layer0.safetensors"
WEIGHTS = "resources/models/tiny-gpt2/model.safetensors"


def _state(work: Path) -> dict[str, tuple[str, int]]:
    return {rel: (sha256(p), p.stat().st_mtime_ns) for rel, p in output_files(work).items()}


def _snakemake(work: Path, *args, timeout: int = 600):
    """``snakemake <args> --cores 1``: (exit code, output, seconds)."""
    t = time.time()
    done = run([BIN / "snakemake", *args, "--cores", "1"], work, check=False, timeout=timeout)
    return done.returncode, done.stdout + done.stderr, time.time() - t


def _jobs_started(out: str) -> list[str]:
    return re.findall(r"^(?:local)?rule (\w+):$", out, re.M)


def _flip_byte(path: Path, at: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def _orphan_sidecars(work: Path) -> list[str]:
    return [p.relative_to(work).as_posix() for d in ("results", "figures", "resources")
            for p in (work / d).rglob("*.prov.json") if not Path(str(p)[: -len(".prov.json")]).exists()]


@pytest.fixture(scope="module")
def finished(smoke, tmp_path_factory):
    """A private copy of the finished smoke run, for tests that change nothing in it."""
    work = tmp_path_factory.mktemp("reliability") / "run"
    shutil.copytree(smoke, work, symlinks=True)
    return work


# ------------------------------------------------------------------------------------------------
# 1. Values a job would reject are refused when the Snakefile is parsed

PARSE_CASES = {
    # the case: a layer the model does not have (tiny-gpt2 has 4), which a job used to meet after
    # Snakemake had deleted every key statistic
    "layer_outside_the_model": (["--config", "facts={layers: [0, 2, 9]}"],
                                ["'facts.layers' has 9", "'tiny-gpt2' has 4 layers, 0-3", "Fix: use layers in 0-3"]),
    "model_name_typo_in_mcq": (["--config", "mcq={model: gpt5}"],
                               ["'mcq.model' is 'gpt5'", "not a model name", "organism", "Fix: set mcq.model"]),
    "integer_written_as_a_float": (["--config", "ioi={n_prompts: 8.0}"],
                                   ["'ioi.n_prompts' is '8.0'", "must be an integer", "not 8.0 or 1e3"]),
    "count_above_its_bound": (["--config", "circuit={max_rows: 1000000000}"],
                              ["'circuit.max_rows' is 1000000000, above its bound", "GB of memory (estimated)",
                               "Fix: set circuit.max_rows to at most"]),
}


@pytest.mark.parametrize("case", list(PARSE_CASES))
def test_bad_value_refused_before_any_job(finished, case):
    args, needles = PARSE_CASES[case]
    before = _state(finished)
    code, out, took = _snakemake(finished, "all", *args)
    assert code != 0, out[-3000:]
    for needle in needles:
        assert needle in out, (needle, out[-3000:])
    assert not _jobs_started(out) and "Execute" not in out, out[-3000:]
    assert _state(finished) == before  # nothing deleted or rewritten
    print(f"{case}: exit {code} after {took:.1f}s")


def _validate(overrides: dict, edit_root=None, tmp_path=None) -> str:
    from mechrepro.workflow.config import ConfigError, load

    root = ROOT
    if edit_root is not None:
        shutil.copytree(root / "config", tmp_path / "config")
        edit_root(tmp_path)
        root = tmp_path
    with pytest.raises(ConfigError) as err:
        load(root / "config" / "smoke.yaml", overrides)
    return str(err.value)


def _yaml_edit(name: str, edit):
    def apply(root: Path):
        path = root / "config" / name
        data = yaml.safe_load(path.read_text())
        edit(data)
        path.write_text(yaml.safe_dump(data))
    return apply


def _write(name: str, text: str):
    return lambda root: (root / "config" / name).write_text(text)


# (overrides, edit of a copy of config/, needles): the checks behind the parse-time refusals
VALIDATION_CASES = {
    "site_layer_without_a_layer_above": ({"subspace.layer": 3}, None,
                                         ["'subspace.layer' has 3", "here at most 2", "name movers"]),
    "float_integer_in_a_file": ({"rome.corpus_tokens": 1.5e3}, None, ["'rome.corpus_tokens' is 1500.0", "integer"]),
    "bool_is_not_an_integer": ({"facts.steps": True}, None, ["'facts.steps' is True"]),
    "seed_beyond_numpy": ({"seed": 2**33}, None, ["'seed' is 8589934592, above its bound 4294967295"]),
    "prompts_beyond_bound": ({"ioi.n_prompts": 10**6}, None, ["above its bound 10000", "forward passes"]),
    "top_k_beyond_the_heads": ({"head_patching.top_k": 17}, None, ["above its bound 16", "the model has 16 heads"]),
    "min_pairs_above_pairs": ({"facts.min_pairs": 7}, None, ["'facts.min_pairs' is 7, above its bound 6"]),
    "chunk_beyond_positions": ({"rome.chunk_tokens": 300}, None, ["'rome.chunk_tokens' is 300", "256 positions"]),
    "organism_heads": ({"mcq.organism.n_kv_heads": 3}, None, ["'mcq.organism.n_kv_heads' is 3", "divide n_heads"]),
    "organism_too_big": ({"mcq.organism.d_mlp": 10**9}, None, ["'mcq.organism'", "GB of memory"]),
    "name_read_as_a_boolean": ({}, _yaml_edit("ioi_data.yaml", lambda d: d["names"].append(False)),
                               ["ioi_data.yaml: 'names' has False (bool)", "quote it"]),
    "fact_object_read_as_a_number": ({}, _yaml_edit("facts_data.yaml",
                                                    lambda d: d["relations"]["capital"]["facts"].update(Atlantis=1984)),
                                     ["facts_data.yaml: 'relations.capital.facts' has 1984 (int)"]),
    "fact_prompt_without_slot": ({}, _yaml_edit("facts_data.yaml",
                                                lambda d: d["relations"]["capital"].update(prompt="The capital is")),
                                 ["facts_data.yaml: the prompt of relation 'capital'", "facts.data_file"]),
    "counterfact_not_json": ({"facts.counterfact_file": "config/cf.json"}, _write("cf.json", "[{\"case_id\": 0,"),
                             ["'facts.counterfact_file'", "cf.json is not valid JSON"]),
    "counterfact_not_records": ({"facts.counterfact_file": "config/cf.json"}, _write("cf.json", "[{\"case_id\": 0}]"),
                                ["cf.json is not a CounterFact file", "requested_rewrite"]),
    "corpus_missing": ({"rome.corpus": "config/wiki.txt"}, None, ["'rome.corpus' is", "wiki.txt", "stdlib_docs"]),
    "corpus_empty": ({"rome.corpus": "config/wiki.txt"}, _write("wiki.txt", "\n\n"), ["wiki.txt is empty"]),
}


@pytest.mark.parametrize("case", list(VALIDATION_CASES))
def test_validation_names_the_key_and_the_fix(case, tmp_path):
    overrides, edit, needles = VALIDATION_CASES[case]
    msg = _validate(overrides, edit, tmp_path)
    for needle in needles:
        assert needle in msg, (needle, msg)


# ------------------------------------------------------------------------------------------------
# 2. Damaged inputs are refused before use and never recorded


def test_damaged_intermediate_refused_before_any_job(smoke_copy):
    """The issue's case: one byte of a key statistic Σ changed by an ordinary write. Before: 13 jobs
    reran on it and dvc.lock recorded it."""
    work = smoke_copy
    _flip_byte(work / SIGMA)
    lock = (work / "dvc.lock").read_bytes()
    before = _state(work)
    code, out, took = _snakemake(work, "all")
    assert code == 1, out[-3000:]
    assert f"{SIGMA} differs from its provenance record" in out and f"rm {SIGMA} && snakemake all" in out, out[-3000:]
    assert "differ from their records" in out and "Execute" not in out, out[-3000:]
    assert _state(work) == before and (work / "dvc.lock").read_bytes() == lock
    # a run of another target checks the inputs of the jobs it would start (Snakemake's onstart)
    code, out, _ = _snakemake(work, f"{B}/rome/layer0.json")
    assert code == 1 and "Refusing to start" in out and f"{SIGMA} differs" in out and "Execute" not in out, out[-3000:]
    assert _state(work) == before
    # a job started without the onstart check (--no-hooks) refuses the damaged input itself
    code, out, _ = _snakemake(work, f"{B}/facts/layer0.json", "--forcerun", "facts_layer", "--no-hooks")
    assert code != 0 and "refusing to run on damaged inputs" in out and f"{SIGMA} differs" in out, out[-3000:]
    assert not _orphan_sidecars(work)
    # the audit gives the same message and the same fix
    done = run([sys.executable, "-m", "mechrepro", "audit", f"{B}/rome.json"], work, check=False)
    assert done.returncode == 1 and f"rm {SIGMA} && snakemake all" in done.stdout
    print(f"damaged Σ: refused in {took:.1f}s")


def test_damaged_weights_seen_by_dvc_and_never_recorded(smoke_copy):
    """The model's weights are an output of prepare_model: `dvc status` reports them; a run that would
    use them refuses; dvc.lock is not updated while they differ from the manifest."""
    work = smoke_copy
    _flip_byte(work / WEIGHTS, at=len((work / WEIGHTS).read_bytes()) // 2)
    status = run([BIN / "dvc", "status"], work).stdout
    assert "prepare_model" in status and WEIGHTS in status and "modified" in status, status
    lock = (work / "dvc.lock").read_bytes()
    before = _state(work)
    code, out, took = _snakemake(work, "all")  # even with nothing to run, the damaged file is reported
    assert code == 1 and f"model file {WEIGHTS} differs from" in out and "Execute" not in out, out[-3000:]
    code, out, _ = _snakemake(work, f"{A}/metrics.json", "--forcerun", "ioi_metrics")  # a job that would use it
    assert code == 1 and "Refusing to start" in out and f"model file {WEIGHTS} differs from" in out, out[-3000:]
    assert _state(work) == before
    record = run([sys.executable, "-c", "from types import SimpleNamespace as S\n"
                  "from mechrepro.workflow.pipeline import record_in_dvc\n"
                  "record_in_dvc(S(config={}, configfiles=[]))"], work, check=False)
    assert record.returncode == 1 and "dvc.lock not updated" in record.stderr and WEIGHTS in record.stderr
    assert (work / "dvc.lock").read_bytes() == lock
    print(f"damaged weights: refused in {took:.1f}s")


# ------------------------------------------------------------------------------------------------
# 3. `snakemake all` repairs what is missing


def _interrupt(work: Path, args: list[str], job_log: Path, log: Path) -> None:
    """Start ``snakemake <args>``; send SIGINT (as Ctrl-C does, to the whole process group) once the
    job writing ``job_log`` is under way (its stage has rewritten the log); wait for the end."""
    old = job_log.stat().st_mtime_ns if job_log.exists() else 0
    with open(log, "ab") as out:  # SIGINT handled as in a terminal, even if this process ignores it
        proc = subprocess.Popen([str(BIN / "snakemake"), *args, "--cores", "1"], cwd=work, env=env(work), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while not (job_log.exists() and job_log.stat().st_mtime_ns != old and job_log.stat().st_size > 0):
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=120) != 0


def test_missing_and_interrupted_outputs_are_rebuilt(smoke_copy, smoke):
    """Deleted by hand (the issue's DAS direction), interrupted with SIGINT: `snakemake all` rebuilds
    them, as the audit advises, with the clean run's bytes."""
    work = smoke_copy
    das, paths = f"{B}/das/mlp.safetensors", f"{A}/value_paths.csv"
    log = work.parent / "interrupted.log"
    _interrupt(work, ["all", "--forcerun", "ioi_value_paths"], work / "logs/ioi_generalization/ioi_value_paths.log", log)
    # Where the signal lands decides what is left: no output (Snakemake removed it), an output marked
    # incomplete (the next run rebuilds it), or the previous output untouched and intact (the audit
    # passes it). Never a file that the next run would take as good without being so.
    rerun = "ioi_value_paths" in _jobs_started(_snakemake(work, "all", "--dry-run")[1])
    if (work / paths).exists() and not rerun:
        kept = run([sys.executable, "-m", "mechrepro", "audit", paths], work, check=False)
        assert kept.returncode == 0 and "audit OK" in kept.stdout, log.read_text()[-2000:] + kept.stdout
    assert rerun or (work / paths).exists(), log.read_text()[-2000:]
    assert not _orphan_sidecars(work)
    (work / das).unlink()
    audit = run([sys.executable, "-m", "mechrepro", "audit", f"{B}/ioi.json"], work, check=False)
    assert audit.returncode == 1 and f"{das} (an input of {B}/ioi.json) does not exist; rebuild it: snakemake all" \
        in audit.stdout, audit.stdout
    code, out, took = _snakemake(work, "all")
    assert code == 0, out[-3000:]
    assert {"subspace_ioi_das"} | ({"ioi_value_paths"} if rerun else set()) <= set(_jobs_started(out)), out[-3000:]
    diffs, _ = compare_runs(smoke, work)
    assert not diffs, "\n".join(diffs)
    done = run([sys.executable, "-m", "mechrepro", "audit", "results", "figures", "resources"], work)
    assert "audit OK" in done.stdout
    assert "Nothing to be done" in _snakemake(work, "all", "--dry-run")[1]
    print(f"repaired in {took:.1f}s")


def test_failed_notebook_leaves_no_orphan_and_is_redrawn(smoke_copy, smoke):
    work = smoke_copy
    nb = work / "notebooks" / "ioi_generalization" / "fig6_value_paths.ipynb"
    png = work / "figures" / "ioi_generalization" / "fig6_value_paths.png"
    original = nb.read_text()
    broken = json.loads(original)
    code_cells = [c for c in broken["cells"] if c["cell_type"] == "code"]
    code_cells[-1]["source"] = "raise RuntimeError('a broken figure notebook')\n"
    nb.write_text(json.dumps(broken))
    code, out, _ = _snakemake(work, "all")
    assert code != 0 and "rule figure" in out
    assert not png.exists() and not Path(str(png) + ".prov.json").exists()
    assert not _orphan_sidecars(work)
    nb.write_text(original)
    code, out, _ = _snakemake(work, "all")
    assert code == 0, out[-3000:]
    assert png.read_bytes() == (smoke / png.relative_to(work)).read_bytes()
    assert "audit OK" in run([sys.executable, "-m", "mechrepro", "audit", "figures"], work).stdout


# ------------------------------------------------------------------------------------------------
# 4. Files named by the config are rule inputs, recorded in the sidecars and DVC dependencies

COUNTERFACT = [{"case_id": i, "requested_rewrite": {"prompt": prompt, "subject": subject, "relation_id": "P36",
                                                     "target_true": {"str": obj}, "target_new": {"str": "Rome"}}}
               for i, (prompt, subject, obj) in enumerate([("The capital of {} is", "Norway", "Oslo"),
                                                           ("The capital of {} is", "Peru", "Lima")])]


def test_counterfact_file_is_tracked(smoke_copy):
    work = smoke_copy
    cf = work / "config" / "counterfact.json"
    cf.write_text(json.dumps(COUNTERFACT))
    cfg = work / "config" / "config.yaml"
    cfg.write_text(cfg.read_text().replace('counterfact_file: ""', 'counterfact_file: config/counterfact.json'))
    data = f"{B}/facts/data.json"
    code, out, _ = _snakemake(work, data)
    assert code == 0 and "rule facts_dataset" in out, out[-3000:]
    prov = json.loads((work / f"{data}.prov.json").read_text())
    assert prov["inputs"]["config/counterfact.json"] == sha256(cf)
    dvc = run([sys.executable, "-m", "mechrepro.workflow.dvcgen", "--root", str(work)], work)
    assert "wrote" in dvc.stdout
    stage = yaml.safe_load((work / "dvc.yaml").read_text())["stages"]["facts_dataset"]
    assert "config/counterfact.json" in stage["deps"]
    # editing the file reruns the dataset and what depends on it
    cf.write_text(json.dumps(COUNTERFACT[:1]))
    code, out, _ = _snakemake(work, "all", "--dry-run")
    assert code == 0 and re.search(r"rule facts_dataset:\n(?:.*\n)*?\s+reason: .*config/counterfact.json", out), \
        out[-3000:]
    assert {"facts_layer", "rome_layer", "facts_summary", "subspace_metrics"} <= set(_jobs_started(out))
