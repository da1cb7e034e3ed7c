"""Bad inputs refused: `snakemake all` on a finished smoke run, with one mistake each.

Every case must exit non-zero before expensive work starts, print a message naming the bad key or
file and saying how to fix it, and leave earlier artifacts untouched.

* Configuration mistakes (``CONFIG_CASES``) are caught when the Snakefile is parsed: no job starts
  and no file changes. They run ``snakemake all`` for real (not ``-n``): a check that let the run
  through would start the work and fail the "untouched" check.
* Damaged files (``DAMAGED_CASES``: a truncated model or artifact) differ from their provenance
  records: the run stops before any job starts, and nothing changes.
* Mistakes that only a job can see (``RUNTIME_CASES``: the hub unreachable, a circuit head outside
  the model) stop the first job that reads the bad input, within seconds. Snakemake deletes the
  outputs of a job it starts (before running it); every other file is unchanged, and no partial
  output is left.

The multiple-choice item with fewer than two options belongs to Study C, which does not exist yet.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from smoke_utils import BIN, output_files, run, sha256

from mechrepro.studies import study

RESULTS, FIGURES = study("ioi_generalization").results, study("ioi_generalization").figures_dir

pytestmark = pytest.mark.workflow


@pytest.fixture(scope="module")
def finished(smoke, tmp_path_factory):
    """A private copy of a finished smoke run (the shared run stays pristine)."""
    work = tmp_path_factory.mktemp("bad_inputs") / "run"
    shutil.copytree(smoke, work, symlinks=True)
    return work


def _state(work: Path) -> dict[str, tuple[str, int]]:
    return {rel: (sha256(p), p.stat().st_mtime_ns) for rel, p in output_files(work).items()}


def _snakemake(work: Path, *args, extra_env=None):
    t = time.time()
    done = run([BIN / "snakemake", "all", "--cores", "1", *args], work, check=False, timeout=300,
               extra_env=extra_env)
    return done, done.stdout + done.stderr, time.time() - t


def _started_outputs(out: str) -> set[str]:
    """Outputs of the jobs Snakemake started (its job blocks' ``output:`` lines)."""
    files = set()
    for m in re.finditer(r"^\s+output: (.+)$", out, re.M):
        files |= {f.strip() for f in m.group(1).split(",")}
    return files


def _data_file(work: Path, name: str, edit) -> str:
    data = yaml.safe_load((work / "config" / "ioi_data.yaml").read_text())
    edit(data)
    (work / "config" / name).write_text(yaml.safe_dump(data))
    return f"config/{name}"


def _config_file(work: Path, name: str, text: str) -> str:
    (work / "config" / name).write_text(text)
    return f"config/{name}"


def _drop_s(data):
    data["templates"][1] = data["templates"][1].replace("{S}", "Bob")


def _few_single_token_names(data):
    # made-up names the GPT-2 tokenizer splits into several tokens, and five real ones
    data["names"] = [f"Zyx{c}quorbl" for c in "abcdefghijklmnopqrstuvwxyz"] + data["names"][:5]


# id -> (make the arguments, needles in the message); each is a real `snakemake all --cores 1`
CONFIG_CASES = {
    "unknown_model_name": (lambda w: ["--config", "model={name: gpt5}"],
                           ["'gpt5'", "model.name", "Known names", "smollm2-135m"]),
    "zero_prompt_count": (lambda w: ["--config", "ioi={n_prompts: 0}"], ["'ioi.n_prompts' is 0", "must be >= 2"]),
    "negative_prompt_count": (lambda w: ["--config", "ioi={n_prompts: -5}"],
                              ["'ioi.n_prompts' is -5", "must be >= 2"]),
    "negative_discovery_prompts": (lambda w: ["--config", "circuit={n_prompts: -1}"],
                                   ["'circuit.n_prompts' is -1", ">= 2"]),
    "template_missing_placeholder": (lambda w: ["--config", "ioi={data_file: " + _data_file(w, "no_s.yaml", _drop_s) + "}"],
                                     ["config/no_s.yaml", "template 1", "{S}", "ioi.data_file", "Fix it"]),
    "too_few_single_token_names": (
        lambda w: ["--config", "ioi={data_file: " + _data_file(w, "few_names.yaml", _few_single_token_names) + "}"],
        ["config/few_names.yaml", "only 5 of the 31 names are single tokens", "ioi.min_single_token_names",
         "add more common first names"]),
    "too_few_names_listed": (
        lambda w: ["--config", "ioi={data_file: " + _data_file(w, "six.yaml", lambda d: d.update(names=d["names"][:6])) + "}"],
        ["config/six.yaml", "'names' has 6 distinct names", "20 single-token names are needed"]),
    "unknown_variant": (lambda w: ["--config", "ioi={variants: [base, quadruple_io]}"],
                        ["ioi.variants", "'quadruple_io'", "allowed values: base, double_io, triple_io"]),
    "variants_without_base": (lambda w: ["--config", "ioi={variants: [double_io]}"], ["ioi.variants", "'base'"]),
    "cuda_without_gpu": (lambda w: ["--config", "model={device: cuda}"],
                         ["'model.device' is 'cuda'", "no CUDA device", "use 'cpu' or 'auto'"]),
    "key_typo_on_command_line": (lambda w: ["--config", "model={nmae: gpt2}"],
                                 ["unknown config key 'model.nmae'", "allowed keys under model: name, device"]),
    "key_typo_in_config_file": (lambda w: ["--configfile", _config_file(w, "typo.yaml", "ioi:\n  n_promts: 10\n")],
                                ["unknown config key 'ioi.n_promts'", "allowed keys under ioi"]),
    "wrong_type_on_command_line": (lambda w: ["--config", "model={batch_size: lots}"],
                                   ["'model.batch_size' is 'lots'", "must be an integer"]),
    "wrong_type_in_config_file": (lambda w: ["--configfile", _config_file(w, "types.yaml", "seed: '0'\nfigures:\n  dpi: 72.5\n")],
                                  ["'seed' is '0'", "'figures.dpi' is 72.5", "integer"]),
    "missing_data_file": (lambda w: ["--config", "ioi={data_file: config/nope.yaml}"],
                          ["'ioi.data_file'", "config/nope.yaml does not exist", "config/ioi_data.yaml"]),
    "config_yaml_syntax_error": (lambda w: _break_config(w),
                                 ["config/config.yaml is not valid YAML", "\"config/config.yaml\", line 2, column 6"]),
}


def _break_config(work: Path) -> list[str]:
    path = work / "config" / "config.yaml"
    shutil.copy(path, work / "config" / "config.yaml.orig")
    path.write_text("seed: 0\nioi: {n_prompts: 3\n" + path.read_text())
    return []


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_config_mistake_stops_before_any_job(finished, case):
    if case == "cuda_without_gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    make_args, needles = CONFIG_CASES[case]
    args = make_args(finished)
    before = _state(finished)
    try:
        done, out, took = _snakemake(finished, *args)
    finally:
        orig = finished / "config" / "config.yaml.orig"
        if orig.exists():
            orig.replace(finished / "config" / "config.yaml")
    assert done.returncode != 0, out[-3000:]
    for needle in needles:
        assert needle in out, (needle, out[-3000:])
    assert not _started_outputs(out) and "Execute" not in out, out[-3000:]
    assert took < 60
    assert _state(finished) == before


def test_non_writable_output_directory(finished):
    """figures/ioi_generalization read-only: refused before the hours of compute that precede the
    figures. (As root, permissions do not stop writes: the directory is made immutable instead.)"""
    target = finished / FIGURES
    before = _state(finished)
    if os.geteuid() == 0:
        lock, unlock = ["chattr", "+i", str(target)], ["chattr", "-i", str(target)]
    else:
        lock, unlock = ["chmod", "a-w", str(target)], ["chmod", "u+w", str(target)]
    subprocess.run(lock, check=True)
    try:
        done, out, _ = _snakemake(finished, "--config", "figures={dpi: 61}")
    finally:
        subprocess.run(unlock, check=True)
    assert done.returncode != 0
    assert f"output directory '{FIGURES}' is not writable" in out and "chmod -R u+w" in out, out[-3000:]
    assert not _started_outputs(out)
    assert _state(finished) == before


# ------------------------------------------------------------------------------------------------
# Mistakes a job finds


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _bad_head(work: Path) -> None:
    """A circuit naming a head the model lacks, recorded as made by the workflow (its sidecar's hash
    updated, as if older code had written it): only the job's own check can see it."""
    import json

    path = work / RESULTS / "circuit.json"
    circuit = json.loads(path.read_text())
    circuit["classes"]["name_mover"][0][1] = 7  # the circuit's own name mover, not a discovery candidate
    path.write_text(json.dumps(circuit, indent=2))
    side = Path(str(path) + ".prov.json")
    side.write_text(json.dumps({**json.loads(side.read_text()), "sha256": sha256(path)}, indent=2))


RUNTIME_CASES = {
    # the paper's model with the hub unreachable and an empty cache
    "hub_model_offline": (None, ["--config", "model={name: gpt2}"],
                          ["cannot load 'openai-community/gpt2'", "not in the local Hugging Face cache",
                           "HF_HOME", "model={name: smollm2-135m}"], "prepare_model"),
    "circuit_head_out_of_range": (_bad_head, [],
                                  [f"{RESULTS}/circuit.json: head [", "of class 'name_mover' is not a [layer, head] pair",
                                   "heads 0-3", "snakemake --forcerun ioi_circuit"], "(?:ioi_|subspace_ioi_)"),
}


@pytest.mark.parametrize("case", list(RUNTIME_CASES))
def test_bad_input_stops_the_first_job(finished, tmp_path, case):
    damage, args, needles, rule = RUNTIME_CASES[case]
    work = tmp_path / "run"
    shutil.copytree(finished, work, symlinks=True)
    extra_env = None
    if case == "hub_model_offline":
        (tmp_path / "empty_hf_home").mkdir()
        extra_env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty_hf_home")}
    if damage:
        damage(work)
    before = _state(work)
    done, out, took = _snakemake(work, *args, extra_env=extra_env)
    assert done.returncode != 0, out[-3000:]
    for needle in needles:
        assert needle in out, (needle, out[-4000:])
    assert took < 120
    started = _started_outputs(out)
    assert len(re.findall(r"^(?:local)?rule \w+:$", out, re.M)) == 1, out[-3000:]  # only the first job ran
    if rule:
        assert re.search(rf"^(?:local)?rule {rule}", out, re.M), out[-3000:]
    after = _state(work)
    # the failed job's outputs and their sidecars are gone; every other file is untouched
    untouched = {rel for rel in before if rel.removesuffix(".prov.json") not in started}
    assert {rel: after.get(rel) for rel in untouched} == {rel: before[rel] for rel in untouched}
    assert not [rel for rel in started if rel in after or f"{rel}.prov.json" in after], "a failed job left an output"


# Damaged files: refused before any job starts (no job deletes its outputs to run on them)
DAMAGED_CASES = {
    "truncated_safetensors": (lambda w: _truncate(w / "resources/models/tiny-gpt2/model.safetensors"),
                              ["--forcerun", "ioi_inference"],
                              ["model file resources/models/tiny-gpt2/model.safetensors differs from",
                               "rm resources/models/tiny-gpt2/manifest.json && snakemake all"]),
    "truncated_json_artifact": (lambda w: _truncate(w / RESULTS / "data" / "base.json"), [],
                                [f"{RESULTS}/data/base.json differs from its provenance record",
                                 f"rm {RESULTS}/data/base.json && snakemake all"]),
}


@pytest.mark.parametrize("case", list(DAMAGED_CASES))
def test_damaged_input_stops_the_run_before_any_job(finished, tmp_path, case):
    damage, args, needles = DAMAGED_CASES[case]
    work = tmp_path / "run"
    shutil.copytree(finished, work, symlinks=True)
    damage(work)
    before = _state(work)
    done, out, took = _snakemake(work, *args)
    assert done.returncode == 1, out[-3000:]
    for needle in needles:
        assert needle in out, (needle, out[-4000:])
    assert "differ from their records" in out and "Execute" not in out, out[-3000:]
    assert took < 120
    assert _state(work) == before


# ------------------------------------------------------------------------------------------------
# The same checks at library level


@pytest.mark.parametrize("head", [[4, 0], [0, 4], [-1, 0], [0, -2], [1], [1, 2, 3], ["1", 0], [1.0, 2], [True, 0]])
def test_circuit_head_outside_the_model(head):
    from mechrepro.studies.ioi_generalization.circuit import check_circuit

    spec = {"n_layers": 4, "n_heads": 4}
    check_circuit({"classes": {"name_mover": [[3, 3], [0, 0]]}}, spec, "c.json")
    with pytest.raises(ValueError) as exc:
        check_circuit({"classes": {"name_mover": [[0, 1]], "induction": [head]}}, spec, "c.json")
    assert "c.json: head" in str(exc.value) and "'induction'" in str(exc.value) and "layers 0-3, heads 0-3" in str(exc.value)


def test_quick_tokenizer_agrees_with_the_models(tokenizer, ioi_data):
    """The parse-time single-token check uses the same tokens as the ioi_dataset rule."""
    from mechrepro.studies.ioi_generalization.checks import quick_tokenizer
    from mechrepro.studies.ioi_generalization.data import single_token_words

    quick = quick_tokenizer("tiny-gpt2")
    assert single_token_words(ioi_data["names"], quick) == single_token_words(ioi_data["names"], tokenizer)
    assert quick_tokenizer("gpt2") is not None
    assert quick_tokenizer("hf:someone/unprepared-model", root="/nonexistent") is None  # checked by the rule
