"""Device and precision choice (tested without a GPU: the logic that picks devices and moves tensors)."""

from __future__ import annotations

import pytest
import torch

from mechrepro.workflow.config import ConfigError, resolve_device
from mechrepro.workflow.stage import use_device


@pytest.fixture(autouse=True)
def restore_defaults():
    yield
    torch.set_default_device("cpu")
    torch.set_default_dtype(torch.float32)


def test_auto_picks_cuda_only_when_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"
    with pytest.raises(ConfigError, match="model.device"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda" and resolve_device("cuda") == "cuda"


def test_use_device_sets_defaults_for_new_tensors(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert use_device("auto", "float64") == "cpu"
    assert torch.zeros(2).dtype == torch.float64 and torch.arange(3).device.type == "cpu"
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch, "set_default_device", lambda d: calls.append(d))
    assert use_device("auto") == "cuda" and calls == ["cuda"]


def test_float64_model_matches_float32(models):
    model = models["llama"]
    tokens = torch.randint(0, model.spec.vocab_size, (3, 7))
    with torch.no_grad():
        ref = model(tokens)
        hi = model.to(torch.float64)(tokens)
    model.to(torch.float32)
    assert hi.dtype == torch.float64 and ref.dtype == torch.float32
    torch.testing.assert_close(hi.float(), ref, atol=1e-4, rtol=1e-4)
