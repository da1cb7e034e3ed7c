"""Config validation: every bad value raises ConfigError naming the key and what is allowed."""

from __future__ import annotations

import copy
import re
import shutil

import pytest
import torch
import yaml

from mechrepro.workflow import config as C
from mechrepro.workflow.config import ConfigError

from conftest import ROOT


@pytest.fixture(scope="module")
def base_cfg():
    return yaml.safe_load((ROOT / "config" / "config.yaml").read_text())


def _set(cfg, dotted, value):
    cfg = copy.deepcopy(cfg)
    node = cfg
    *parents, last = dotted.split(".")
    for p in parents:
        node = node[p]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return cfg


_DELETE = object()


def _err(cfg, root=ROOT) -> str:
    with pytest.raises(ConfigError) as exc:
        C.validate(cfg, root=root)
    return str(exc.value)


@pytest.mark.parametrize("name", ["config.yaml", "smoke.yaml"])
def test_valid_configs_load(name):
    cfg = C.load(ROOT / "config" / name)
    assert cfg["ioi"]["data_file"] == "config/ioi_data.yaml"
    assert "base" in cfg["ioi"]["variants"]


def test_dotted_overrides():
    cfg = C.load(ROOT / "config" / "config.yaml", {"ioi.n_prompts": 10, "circuit.thresholds.induction": 0.5})
    assert cfg["ioi"]["n_prompts"] == 10
    assert cfg["circuit"]["thresholds"]["induction"] == 0.5
    assert cfg["ioi"]["variants"] == ["base", "double_io", "triple_io"]  # siblings kept
    assert cfg["circuit"]["thresholds"]["name_mover"] == 0.03
    with pytest.raises(ConfigError, match=r"'ioi.n_prompts' is 0; it must be >= 2"):
        C.load(ROOT / "config" / "config.yaml", {"ioi.n_prompts": 0})
    with pytest.raises(ConfigError, match=r"config override 'seed.x': 'seed' is not a section"):
        C.apply_dotted({"seed": 0, "seed.x": 1})
    assert C.apply_dotted({"a": {"b": 1, "c": 2}, "a.b": 3}) == {"a": {"b": 3, "c": 2}}


@pytest.mark.parametrize("key,value,needles", [
    # typo in a key: names the bad key and the allowed keys of that section
    ("model.nmae", "gpt2", ["'model.nmae'", "name, device, dtype, batch_size"]),
    ("seeed", 1, ["'seeed'", "seed, studies, model, figures, ioi, circuit"]),
    ("studies", ["ioi_generalization", "no_such_study"], ["studies", "'no_such_study'", "ioi_generalization"]),
    # wrong type
    ("model.batch_size", "50", ["'model.batch_size'", "'50'", "integer"]),
    ("ioi.n_prompts", 2.5, ["'ioi.n_prompts'", "integer"]),
    ("ioi.n_prompts", True, ["'ioi.n_prompts'", "integer"]),
    ("circuit.thresholds.induction", "high", ["'circuit.thresholds.induction'", "number"]),
    # out of range
    ("ioi.n_prompts", 0, ["'ioi.n_prompts'", ">= 2"]),
    ("figures.dpi", 10000, ["'figures.dpi'", "<= 600"]),
    # unknown enum values
    ("ioi.variants", ["base", "quadruple_io"], ["ioi.variants", "'quadruple_io'", "base, double_io, triple_io"]),
    ("circuit.method", "fast", ["'circuit.method'", "'fast'", "attribution, exact"]),
    ("model.device", "tpu", ["'model.device'", "cpu, cuda, auto"]),
    ("circuit.source", "paper", ["'circuit.source'", "auto, reference, discover"]),
    # unknown model name
    ("model.name", "gpt5", ["gpt5", "model.name", "smollm2-135m", "tiny-gpt2", "hf:<repo id>"]),
    # missing data file
    ("ioi.data_file", "config/no_such_file.yaml", ["ioi.data_file", "no_such_file.yaml", "does not exist"]),
    # missing required key
    ("circuit.method", _DELETE, ["circuit", "'method'", "required"]),
])
def test_bad_config_raises_readable_error(base_cfg, key, value, needles):
    msg = _err(_set(base_cfg, key, value))
    for needle in needles:
        assert needle in msg, (needle, msg)


def test_variants_without_base(base_cfg):
    msg = _err(_set(base_cfg, "ioi.variants", ["double_io"]))
    assert "ioi.variants" in msg


def test_all_errors_reported_together(base_cfg):
    cfg = _set(_set(base_cfg, "circuit.method", "fast"), "ioi.n_prompts", 0)
    msg = _err(cfg)
    assert "'circuit.method'" in msg and "'ioi.n_prompts'" in msg


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is available")
def test_cuda_without_gpu(base_cfg):
    msg = _err(_set(base_cfg, "model.device", "cuda"))
    assert "'model.device'" in msg and "cpu" in msg and "auto" in msg
    assert C.resolve_device("auto") == "cpu"
    assert C.resolve_device("cpu") == "cpu"


def _copied_data(tmp_path, edit):
    (tmp_path / "config").mkdir()
    if (ROOT / "resources" / "corpora").is_dir():  # rome.corpus wikipedia_sample (fetched by make env)
        (tmp_path / "resources").mkdir()
        (tmp_path / "resources" / "corpora").symlink_to(ROOT / "resources" / "corpora")
    for name in ("subspace_ioi_data.yaml", "facts_data.yaml"):  # Study B's, checked too
        shutil.copy(ROOT / "config" / name, tmp_path / "config")
    dst = tmp_path / "config" / "ioi_data.yaml"
    shutil.copy(ROOT / "config" / "ioi_data.yaml", dst)
    data = yaml.safe_load(dst.read_text())
    edit(data)
    dst.write_text(yaml.safe_dump(data))
    return dst


def test_template_missing_s_in_copied_data_file(base_cfg, tmp_path):
    def edit(data):
        data["templates"][2] = data["templates"][2].replace("{S}", "Bob")

    dst = _copied_data(tmp_path, edit)
    msg = _err(base_cfg, root=tmp_path)
    assert str(dst) in msg and "{S}" in msg and "template 2" in msg and "ioi.data_file" in msg
    # the unmodified copy is valid
    shutil.copy(ROOT / "config" / "ioi_data.yaml", dst)
    assert C.validate(base_cfg, root=tmp_path)["ioi"]["n_prompts"] == 200


@pytest.mark.parametrize("edit,needles", [
    (lambda d: d.update(names=[]), ["'names'", "missing or empty"]),
    (lambda d: d.pop("places"), ["'places'"]),
    (lambda d: d["variant_sentences"].update(double_io=["She was happy."]), ["double_io", "{IO}"]),
])
def test_bad_data_file(base_cfg, tmp_path, edit, needles):
    _copied_data(tmp_path, edit)
    msg = _err(base_cfg, root=tmp_path)
    for needle in needles:
        assert needle in msg, (needle, msg)


def test_invalid_yaml_data_file(base_cfg, tmp_path):
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "ioi_data.yaml").write_text("templates: [unclosed\n")
    assert "not valid YAML" in _err(base_cfg, root=tmp_path)


def test_error_messages_name_only_real_keys(base_cfg):
    """The 'allowed keys' list comes from the schema, so it is always up to date."""
    msg = _err(_set(base_cfg, "circuit.max_heads.nm", 3))
    schema = C.schema()
    allowed = list(schema["properties"]["circuit"]["properties"]["max_heads"]["properties"])
    assert "'circuit.max_heads.nm'" in msg
    assert re.search(r"allowed keys under circuit\.max_heads: " + re.escape(", ".join(allowed)), msg)


def test_rome_layers_must_be_sweep_layers(base_cfg):
    """ROME reads the key statistic of the sweep's layers: a layer outside facts.layers is refused."""
    msg = _err(_set(base_cfg, "rome.layers", [3, 4]))
    assert "'rome.layers' has [4]" in msg and "facts.layers" in msg
    assert C.validate(_set(base_cfg, "rome.layers", [0, 27]), root=ROOT)["rome"]["layers"] == [0, 27]
