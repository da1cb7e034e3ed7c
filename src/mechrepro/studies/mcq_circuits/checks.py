"""Early checks of Study C's configuration, before any job runs (``STUDY.check_config``).

* ``mcq.model``: ``organism`` or a model name of the registry (the same names as ``model.name``);
* the organism's shape: ``d_model`` divisible by ``n_heads`` into an even head size (rotary
  positions), ``n_heads`` divisible by ``n_kv_heads``; its parameters, gradients and Adam moments
  must fit in this machine's memory;
* every count within its bound (the memory of a batch and of a patching pass, MMLU's size, the
  nodes that can be ranked).

Errors are :class:`~mechrepro.workflow.config.ConfigError` naming the key and the fix.
"""

from __future__ import annotations

from pathlib import Path

from mechrepro.workflow.config import (Bound, ConfigError, activation_bytes, check_bounds, dtype_bytes, fixed, gb,
                                       machine_memory, memory_cost, memory_limit, model_spec, work_cost)

ORGANISM = "organism"
MMLU_TEST = 14_042  # questions of MMLU's test split (the real-model path draws n_shots + n_items of them)
TOKENS_PER_ITEM = 96  # tokens of a question with its options, at most (memory estimates)
GPT2_VOCAB = 50257  # the organism uses GPT-2's tokenizer


def organism_spec(config: dict) -> dict:
    o = config["mcq"]["organism"]
    return dict(n_layers=o["n_layers"], n_heads=o["n_heads"], n_kv_heads=o["n_kv_heads"], d_model=o["d_model"],
                d_head=o["d_model"] // o["n_heads"], d_mlp=o["d_mlp"], vocab_size=GPT2_VOCAB, n_positions=0)


def mcq_spec(config: dict, root: str | Path = ".") -> dict | None:
    """The shape of Study C's model: the organism's from its config, else the registry model's."""
    from mechrepro.studies.mcq_circuits import model_dir

    name = config["mcq"]["model"]
    return organism_spec(config) if name == ORGANISM else model_spec(name, root, folder=model_dir(name))


def check_organism(config: dict) -> None:
    o = config["mcq"]["organism"]
    fix = "Fix: change mcq.organism.d_model, n_heads or n_kv_heads"
    if o["d_model"] % o["n_heads"] or (o["d_model"] // o["n_heads"]) % 2:
        raise ConfigError(f"config key 'mcq.organism.d_model' is {o['d_model']}: it must be n_heads ({o['n_heads']}) "
                          f"times an even head size (rotary positions rotate pairs of dimensions). {fix}")
    if o["n_kv_heads"] > o["n_heads"] or o["n_heads"] % o["n_kv_heads"]:
        raise ConfigError(f"config key 'mcq.organism.n_kv_heads' is {o['n_kv_heads']}: it must divide n_heads "
                          f"({o['n_heads']}); each key/value head serves a group of query heads. {fix}")
    if o["probe_layer"] >= o["n_layers"]:
        raise ConfigError(f"config key 'mcq.organism.probe_layer' is {o['probe_layer']}, but the organism has "
                          f"{o['n_layers']} layers (0 … {o['n_layers'] - 1}). Fix: choose a layer below n_layers")
    spec = organism_spec(config)
    n_params = spec["vocab_size"] * spec["d_model"] + spec["n_layers"] * (
        2 * spec["d_model"] ** 2 + 2 * spec["d_model"] * spec["n_kv_heads"] * spec["d_head"]
        + 3 * spec["d_model"] * spec["d_mlp"])
    need = 16 * n_params + activation_bytes(spec, o["batch_size"], TOKENS_PER_ITEM, 4, backward=True)
    if need > machine_memory():
        raise ConfigError(f"config section 'mcq.organism' describes a model of {n_params:.3g} parameters; training it "
                          f"(weights, gradients, Adam moments, a batch of {o['batch_size']}) would need about "
                          f"{gb(need)} of memory (estimated), and this machine has {gb(machine_memory())}. Fix: "
                          "lower d_model, d_mlp, n_layers or batch_size")


def _bytes(key: str, backward: bool = False):
    def at(c: dict, s: dict, v: int) -> float:
        tokens = TOKENS_PER_ITEM * (1 + c["mcq"]["n_shots"] * (c["mcq"]["model"] != ORGANISM))
        return activation_bytes(s, v, tokens, dtype_bytes(c), backward)
    return at


def _nodes(config: dict, spec: dict | None) -> int | None:
    return None if spec is None else spec["n_layers"] * (spec["n_heads"] + 1)


BOUNDS = [
    Bound("mcq.n_items", lambda c, s: MMLU_TEST - c["mcq"]["n_shots"] if c["mcq"]["model"] != ORGANISM else 20_000,
          lambda c, s, v: (f"MMLU's test split has {MMLU_TEST} questions, n_shots of them are examples"
                           if c["mcq"]["model"] != ORGANISM else
                           f"about {v * len(c['mcq']['label_sets']):.3g} prompts to evaluate (estimated)")),
    Bound("mcq.n_analysis", fixed(20_000), work_cost(lambda c, v: v * 4 * (_nodes(c, mcq_spec(c)) or 1),
                                                     "forward passes of the analyses (patching every node)")),
    Bound("mcq.batch_size", memory_limit(_bytes("batch")),
          memory_cost(_bytes("batch"), "one forward pass over that many prompts")),
    Bound("mcq.max_rows", memory_limit(_bytes("rows")),
          memory_cost(_bytes("rows"), "one patching pass over that many prompt copies")),
    Bound("mcq.verify.n_prompts", fixed(20_000), work_cost(lambda c, v: v * 6, "forward passes of the "
                                                          "correct-letter checks")),
    Bound("mcq.top_k", _nodes, lambda c, s, v: f"the model has {_nodes(c, s)} nodes (heads and MLPs) to rank"),
    Bound("mcq.low_rank.ranks", fixed(4096), lambda c, s, v: "ranks are capped at the head size (at most 4096)"),
    Bound("mcq.low_rank.mutation_rank", fixed(4096), lambda c, s, v: "ranks are capped at the head size (at most 4096)"),
    Bound("mcq.organism.steps", fixed(100_000), work_cost(lambda c, v: v * c["mcq"]["organism"]["batch_size"],
                                                          "training questions (forward and backward)")),
    Bound("mcq.organism.n_eval", fixed(20_000), work_cost(
        lambda c, v: v * c["mcq"]["organism"]["steps"] / c["mcq"]["organism"]["eval_every"],
        "held-out questions evaluated during training")),
    Bound("mcq.organism.eval_every", lambda c, s: c["mcq"]["organism"]["steps"],
          lambda c, s, v: f"training runs at most mcq.organism.steps = {c['mcq']['organism']['steps']} steps"),
]


def check_config(config: dict, root: str | Path) -> None:
    """Study C's configuration (see the module docstring); raises ConfigError."""
    from mechrepro.core.registry import ModelUnavailableError, check_name

    try:
        check_name(config["mcq"]["model"], key="mcq.model", extra=(ORGANISM,))
    except ModelUnavailableError as err:
        raise ConfigError(str(err)) from err
    if config["mcq"]["model"] == ORGANISM:
        check_organism(config)
    check_bounds(config, BOUNDS, mcq_spec(config, root))
