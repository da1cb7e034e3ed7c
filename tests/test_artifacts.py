"""Atomic writes, provenance sidecars and corrupt-artifact errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from mechrepro.workflow import artifacts as A
from mechrepro.workflow.artifacts import ArtifactError


def _sha(path):
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_write_json_roundtrip_and_no_temp_files(tmp_path):
    path = tmp_path / "sub" / "x.json"
    obj = {"a": 1, "b": [1.5, "z"], "np": np.float32(0.5), "arr": np.arange(3), "p": tmp_path}
    A.write_json(path, obj)
    assert A.read_json(path) == {"a": 1, "b": [1.5, "z"], "np": 0.5, "arr": [0, 1, 2], "p": str(tmp_path)}
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.json"]


def test_write_json_unserialisable_keeps_old_file(tmp_path):
    path = tmp_path / "x.json"
    A.write_json(path, {"v": 1})
    with pytest.raises(TypeError, match="cannot serialise object"):
        A.write_json(path, {"v": object()})
    assert A.read_json(path) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_atomic_path_failure_mid_write_keeps_old_file(tmp_path):
    path = tmp_path / "out.txt"
    A.write_text(path, "old contents\n")
    with pytest.raises(RuntimeError, match="killed"):
        with A.atomic_path(path) as tmp:
            assert tmp.parent == path.parent and tmp != path
            with open(tmp, "w") as f:
                f.write("half of the new")
                f.flush()
                raise RuntimeError("killed")
    assert path.read_text() == "old contents\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_path_failure_without_old_file_leaves_nothing(tmp_path):
    path = tmp_path / "new.json"
    with pytest.raises(ValueError):
        with A.atomic_path(path) as tmp:
            tmp.write_text("{")
            raise ValueError
    assert list(tmp_path.iterdir()) == []


def test_write_csv_full_precision(tmp_path):
    path = tmp_path / "t.csv"
    frame = pd.DataFrame({"x": [1 / 3, 2e-12, 123456.789012345], "s": ["a", "b", "c"]})
    A.write_csv(path, frame)
    back = pd.read_csv(path)
    np.testing.assert_allclose(back["x"], frame["x"], rtol=1e-9)
    assert list(back["s"]) == ["a", "b", "c"]


def test_provenance_sidecar(tmp_path):
    inp1, inp2 = tmp_path / "in1.json", tmp_path / "in2.txt"
    inp1.write_text('{"k": 1}')
    inp2.write_text("hello")
    model = {"name": "tiny-gpt2", "weight_sha256": "ab" * 32, "description": "d", "extra": 1}
    prov = A.provenance("make_x", {"ioi": {"n_prompts": 5}}, [inp1, str(inp2)], model)
    out = tmp_path / "res" / "x.json"
    A.save_json(out, {"result": 42}, prov)
    side = json.loads((tmp_path / "res" / ("x.json" + A.PROV_SUFFIX)).read_text())
    assert side["rule"] == "make_x"
    assert side["config"] == {"ioi": {"n_prompts": 5}}
    assert side["inputs"] == {str(inp1): _sha(inp1), str(inp2): _sha(inp2)}
    assert side["sha256"] == _sha(out) == A.sha256_file(out)
    assert side["artifact"] == str(out)
    assert side["model"] == {"name": "tiny-gpt2", "weight_sha256": "ab" * 32, "description": "d"}
    assert side["code"]["package"] == "mechrepro" and "git_commit" in side["code"]
    # csv artifacts get a sidecar too, hashing the csv bytes
    csv = tmp_path / "res" / "t.csv"
    A.save_csv(csv, pd.DataFrame({"a": [1, 2]}), A.provenance("make_t", {}, []))
    side = A.read_json(str(csv) + A.PROV_SUFFIX)
    assert side["sha256"] == _sha(csv) and side["model"] is None and side["inputs"] == {}


def test_provenance_changes_when_input_changes(tmp_path):
    inp = tmp_path / "in.txt"
    inp.write_text("a")
    h1 = A.provenance("r", {}, [inp])["inputs"][str(inp)]
    inp.write_text("b")
    h2 = A.provenance("r", {}, [inp])["inputs"][str(inp)]
    assert h1 != h2


def test_read_json_truncated_and_missing(tmp_path):
    path = tmp_path / "metrics.json"
    A.write_json(path, {"a": list(range(50))})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError) as exc:
        A.read_json(path)
    assert str(path) in str(exc.value) and "corrupt" in str(exc.value)
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ArtifactError, match="metrics.json is corrupt"):
        A.read_json(path)
    with pytest.raises(ArtifactError, match="nope.json does not exist"):
        A.read_json(tmp_path / "nope.json")


# ------------------------------------------------------------------ safetensors
def test_safetensors_roundtrip_metadata_and_sidecar(tmp_path):
    import torch

    t = {"v": torch.arange(6.0).reshape(2, 3), "w": torch.ones(4, dtype=torch.float64)}
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    A.save_safetensors(a, t, {"rule": "r"}, {"layer": 3, "site": "mlp"})
    A.save_safetensors(b, dict(reversed(list(t.items()))), {"rule": "r"}, {"site": "mlp", "layer": "3"})
    assert a.read_bytes() == b.read_bytes()  # one sorted metadata entry: equal content, equal bytes
    tensors, meta = A.load_safetensors(a, keys=["v"], shapes={"w": (4,)})
    assert meta == {"layer": "3", "site": "mlp"}
    assert torch.equal(tensors["v"], t["v"]) and torch.equal(tensors["w"], t["w"])
    assert json.loads((tmp_path / "a.safetensors.prov.json").read_text())["sha256"] == _sha(a)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "a.safetensors.prov.json",
                                                          "b.safetensors", "b.safetensors.prov.json"]


def test_plain_safetensors_has_no_metadata(tmp_path):
    import torch
    from safetensors import safe_open

    path = A.write_safetensors(tmp_path / "model.safetensors", {"x": torch.zeros(2)})
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() is None
    assert not (tmp_path / "model.safetensors.prov.json").exists()


def test_safetensors_errors_name_the_file_the_problem_and_the_rule(tmp_path):
    import torch

    path = tmp_path / "sigma.safetensors"
    with pytest.raises(ArtifactError, match="sigma.safetensors does not exist: run 'snakemake all'"):
        A.load_safetensors(path, rule="facts_key_stats")
    A.save_safetensors(path, {"sigma": torch.eye(3)}, {})
    with pytest.raises(ArtifactError, match=r"lacks the tensors \['mean'\] \(it has \['sigma'\]\).*--forcerun r1"):
        A.load_safetensors(path, keys=["mean"], rule="r1")
    with pytest.raises(ArtifactError, match=r"'sigma' has shape \(3, 3\), expected \(4, 4\).*--forcerun r1"):
        A.load_safetensors(path, shapes={"sigma": (4, 4)}, rule="r1")
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ArtifactError, match="sigma.safetensors is corrupt.*delete it and rerun"):
        A.load_safetensors(path)
