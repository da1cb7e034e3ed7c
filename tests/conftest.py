"""Shared fixtures: tiny randomly initialised Hugging Face models and their mechrepro conversions.

No hub access is needed: every model is built from a config with a fixed seed. The initialiser
range is larger than the HF default (0.02) so that attention patterns are far from uniform and
patching effects are large enough to be tested.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
SMALL_VOCAB = 101
FULL_VOCAB = 50257  # GPT-2 tokenizer size (for the TransformerLens bridge)
ARCHS = ("gpt2", "llama", "qwen2")


def make_hf(arch: str, vocab: int = SMALL_VOCAB, n_layers: int = 3, seed: int = 0):
    """A tiny HF causal LM in eval mode: gpt2, llama (grouped-query attention) or qwen2 (q/k/v bias)."""
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    torch.manual_seed(seed)
    if arch == "gpt2":
        cfg = GPT2Config(n_layer=n_layers, n_embd=32, n_head=4, vocab_size=vocab, n_positions=64,
                         initializer_range=0.2, bos_token_id=0, eos_token_id=0)
        model = GPT2LMHeadModel(cfg)
    elif arch == "llama":
        cfg = LlamaConfig(num_hidden_layers=n_layers, hidden_size=32, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=64, vocab_size=vocab,
                          max_position_embeddings=64, initializer_range=0.2, bos_token_id=0, eos_token_id=0)
        model = LlamaForCausalLM(cfg)
    elif arch == "qwen2":
        cfg = Qwen2Config(num_hidden_layers=n_layers, hidden_size=32, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=64, vocab_size=vocab,
                          max_position_embeddings=64, initializer_range=0.2, bos_token_id=0, eos_token_id=0)
        model = Qwen2ForCausalLM(cfg)
        # HF initialises biases to zero; make the q/k/v biases matter.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("_proj.bias"):
                    p.normal_(0.0, 0.3)
    else:  # pragma: no cover
        raise ValueError(arch)
    return model.eval()


@pytest.fixture(scope="session")
def hf_models():
    return {arch: make_hf(arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def models(hf_models):
    from mechrepro.core.model import Transformer

    return {arch: Transformer.from_hf(m) for arch, m in hf_models.items()}


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture(scope="session")
def toy_batch():
    """Random prompts with IOI-like bookkeeping: right-padded, varying END, two templates.

    Rows ``[b=6, p=10]``; END is 9 for the first template and 8 for the second (padding after).
    """
    g = torch.Generator().manual_seed(1)
    b, p = 6, 10
    tokens = torch.randint(1, SMALL_VOCAB, (b, p), generator=g)
    abc = torch.randint(1, SMALL_VOCAB, (b, p), generator=g)
    template = torch.tensor([0, 0, 0, 1, 1, 1])
    end = torch.where(template == 0, 9, 8)
    tokens[template == 1, 9] = 0  # padding
    abc[template == 1, 9] = 0
    abc[:, :2] = tokens[:, :2]  # shared prefix as in ABC prompts
    io = torch.randint(1, SMALL_VOCAB, (b,), generator=g)
    s = (io + torch.randint(1, SMALL_VOCAB - 1, (b,), generator=g)) % SMALL_VOCAB
    pos = torch.tensor([4, 5, 3, 6, 4, 5])  # a "S2"-like position per prompt (< END)
    return {"tokens": tokens, "abc": abc, "template": template, "end": end, "io": io, "s": s, "pos": pos}


@pytest.fixture(scope="session")
def tokenizer():
    from mechrepro.core.registry import gpt2_tokenizer

    return gpt2_tokenizer()


@pytest.fixture(scope="session")
def ioi_data():
    import yaml

    return yaml.safe_load((ROOT / "config" / "ioi_data.yaml").read_text())


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one thread (and do not fight over a loaded 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def smoke(tmp_path_factory) -> Path:
    """The repository after ``snakemake all --cores 2`` on config/smoke.yaml, run once per session and
    shared by every test that only reads it (see ``smoke_utils.shared_run``). Never modify it: use
    :func:`smoke_copy` for a run a test may damage."""
    from smoke_utils import shared_run

    return shared_run(tmp_path_factory, "cores2", "2")


@pytest.fixture(scope="session")
def smoke_serial(tmp_path_factory) -> Path:
    """The smoke run with ``--cores 1`` (one job at a time), SIGKILLed at three points and completed,
    once per session: the reference of the determinism test (test_parallel.py) and the subject of
    the recovery test (test_faults.py). See ``smoke_utils.killed_serial_run``."""
    from smoke_utils import killed_serial_run

    return killed_serial_run(tmp_path_factory)


@pytest.fixture
def smoke_copy(smoke, tmp_path) -> Path:
    """A private copy of the finished smoke run that a test may damage."""
    import shutil

    work = tmp_path / "run"
    shutil.copytree(smoke, work, symlinks=True)
    return work
