"""Model registry: names, tiny models prepared offline, hash checks on load."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from mechrepro.core import registry as R
from mechrepro.core.registry import ModelUnavailableError


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-gpt2")
    manifest = R.prepare_model("tiny-gpt2", out, seed=7)
    return out, manifest


def test_unknown_name_lists_known_names():
    with pytest.raises(ModelUnavailableError) as exc:
        R.check_name("gpt-17")
    msg = str(exc.value)
    assert "'gpt-17'" in msg and "model.name" in msg
    for name in R.KNOWN:
        assert name in msg
    assert "hf:<repo id>" in msg
    with pytest.raises(ModelUnavailableError):
        R.prepare_model("gpt-17", "/nonexistent/never-created")
    for ok in ("smollm2-135m", "gpt2", "gpt2-xl", "tiny-gpt2", "tiny-llama", "hf:Qwen/Qwen2-0.5B"):
        R.check_name(ok)


def test_prepare_and_load_tiny_gpt2(prepared, tokenizer):
    out, manifest = prepared
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["name"] == "tiny-gpt2" and manifest["source"]["kind"] == "random"
    assert manifest["source"]["seed"] == 7 and manifest["bos_token_id"] == 50256
    assert manifest["spec"]["n_layers"] == 4 and manifest["spec"]["d_model"] == 64
    assert "model.safetensors" in manifest["files"] and "manifest.json" not in manifest["files"]
    lm = R.load_model(out)
    assert R.state_dict_sha256(lm.model) == manifest["weight_sha256"]
    assert lm.name == "tiny-gpt2" and lm.bos_id == 50256
    assert lm.encode(" Mary") == [5335]
    assert "randomly initialised" in lm.description()
    # the loaded model runs and its logits have the tokenizer's vocabulary
    logits = lm.model(torch.tensor([[50256, 5335, 290, 1757]]), logits_at=torch.tensor([3]))
    assert logits.shape == (1, 50257) and torch.isfinite(logits).all()



def test_rerun_over_a_previous_run_hashes_only_model_files(tmp_path):
    """A forced rerun finds the last run's provenance sidecar and hidden temp files: not model files."""
    out = tmp_path / "m"
    first = R.prepare_model("tiny-gpt2", out, seed=7)
    (out / "manifest.json.prov.json").write_text("{}")
    (out / ".model.safetensors.tmp").write_text("partial")
    again = R.prepare_model("tiny-gpt2", out, seed=7)
    assert again["files"] == first["files"]
    assert not any(n.endswith(".prov.json") or n.startswith(".") for n in again["files"])
    R.load_model(out)  # the files the manifest lists still check out

def test_seed_changes_weights(prepared, tmp_path):
    _, manifest = prepared
    other = R.prepare_model("tiny-gpt2", tmp_path / "m", seed=8)
    assert other["weight_sha256"] != manifest["weight_sha256"]
    again = R.prepare_model("tiny-gpt2", tmp_path / "m2", seed=7)
    assert again["weight_sha256"] == manifest["weight_sha256"]


def test_truncated_safetensors_raises(prepared, tmp_path):
    src, _ = prepared
    d = tmp_path / "copy"
    shutil.copytree(src, d)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelUnavailableError) as exc:
        R.load_model(d)
    assert str(f) in str(exc.value) and "manifest.json" in str(exc.value)


def test_modified_file_same_size_raises(prepared, tmp_path):
    src, _ = prepared
    d = tmp_path / "copy"
    shutil.copytree(src, d)
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF  # flip bits inside a weight
    f.write_bytes(bytes(data))
    with pytest.raises(ModelUnavailableError, match="model.safetensors"):
        R.load_model(d)


def test_missing_or_corrupt_manifest(prepared, tmp_path):
    with pytest.raises(ModelUnavailableError, match="manifest.json is missing"):
        R.load_model(tmp_path)
    src, _ = prepared
    d = tmp_path / "copy"
    shutil.copytree(src, d)
    (d / "manifest.json").write_text('{"name": "tiny')
    with pytest.raises(ModelUnavailableError, match="not valid JSON"):
        R.load_model(d)
    shutil.copy(src / "manifest.json", d / "manifest.json")
    (d / "model.safetensors").unlink()
    with pytest.raises(ModelUnavailableError, match="model.safetensors is missing"):
        R.load_model(d)


def test_prepare_and_load_tiny_llama(tmp_path):
    manifest = R.prepare_model("tiny-llama", tmp_path, seed=0)
    assert manifest["spec"]["n_kv_heads"] == 2 and manifest["spec"]["arch"] == "llama"
    lm = R.load_model(tmp_path)
    assert R.state_dict_sha256(lm.model) == manifest["weight_sha256"]


def test_state_dict_hash_sensitive_to_weights(prepared):
    lm = R.load_model(prepared[0])
    h = R.state_dict_sha256(lm.model)
    with torch.no_grad():
        lm.model.p("blocks.0.W_Q")[0, 0, 0] += 1e-3
    assert R.state_dict_sha256(lm.model) != h


def test_hf_name_loads_through_the_hub_path(tmp_path):
    """`hf:<id>` goes through the hub loading code; a local directory stands in for the hub here."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from mechrepro.core.registry import gpt2_tokenizer, load_model, prepare_model

    src = tmp_path / "fake_hub_model"
    torch.manual_seed(1)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50257, n_positions=32)).save_pretrained(src)
    gpt2_tokenizer().save_pretrained(src)
    manifest = prepare_model(f"hf:{src}", tmp_path / "prepared")
    assert manifest["source"] == {"kind": "hub", "repo_id": str(src)}
    assert manifest["files"] == {}
    lm = load_model(tmp_path / "prepared")
    assert lm.model.spec.n_layers == 1 and lm.bos_id == 50256


def test_unreachable_hub_model_fails_fast_with_instructions(tmp_path, monkeypatch):
    import time

    from mechrepro.core.registry import ModelUnavailableError, prepare_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.time()
    with pytest.raises(ModelUnavailableError) as err:
        prepare_model("hf:nobody/no-such-model-xyz", tmp_path / "m")
    assert time.time() - t < 30
    msg = str(err.value)
    assert "HF_HOME" in msg and "smollm2-135m" in msg and "nobody/no-such-model-xyz" in msg
