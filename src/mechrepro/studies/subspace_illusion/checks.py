"""Early checks of Study B's configuration, before any job runs (``STUDY.check_config``).

* the data files: the IOI pair templates (``subspace_ioi.data_file``), the fact material
  (``facts.data_file``: relations with one ``{}`` and string subjects and objects), the optional
  CounterFact JSON (``facts.counterfact_file``: JSON that parses, CounterFact records) and the
  key-statistic corpus (``rome.corpus``: ``stdlib_docs``, ``wikipedia_sample`` (its file fetched)
  or a non-empty UTF-8 text file);
* layer indices against the model's shape (:func:`mechrepro.workflow.config.model_spec`, without
  loading it): every layer of ``facts.layers`` (the fact sweep, ROME and the key statistic), and
  ``subspace.layer``, which needs a layer above it for the name movers;
* every count within its bound, e.g. ``rome.chunk_tokens`` within a GPT-2 model's positions.

Errors are :class:`~mechrepro.workflow.config.ConfigError` naming the key or file and the fix.
"""

from __future__ import annotations

import json
from pathlib import Path

from mechrepro.workflow.config import (Bound, ConfigError, activation_bytes, check_bounds, check_layers, dtype_bytes,
                                       fixed, memory_cost, memory_limit, model_spec, require_strings, work_cost)

FACT_TOKENS = 16  # tokens of a fact prompt, at most (memory estimates)


def check_data_files(config: dict, root: str | Path) -> None:
    """The data files Study B reads parse and hold what its rules need."""
    from mechrepro.studies.subspace_illusion.facts import load_counterfact, load_facts_data
    from mechrepro.studies.subspace_illusion.ioi import load_data

    root = Path(root)
    try:
        load_data(root / config["subspace_ioi"]["data_file"])
    except ValueError as err:
        raise ConfigError(str(err)) from err
    facts_path = root / config["facts"]["data_file"]
    try:
        relations = load_facts_data(facts_path)
    except FileNotFoundError as err:
        raise ConfigError(f"config key 'facts.data_file': {err}; the default is config/facts_data.yaml") from err
    except ValueError as err:
        raise ConfigError(f"{err} (config key facts.data_file)") from err
    for name, rel in relations.items():
        require_strings(facts_path, f"relations.{name}.facts", rel["facts"])
    if config["facts"]["counterfact_file"]:
        check_counterfact(root, config["facts"]["counterfact_file"], load_counterfact)
    corpus = config["rome"]["corpus"]
    if corpus == "wikipedia_sample":
        if not (root / WIKIPEDIA_SAMPLE).is_file():
            raise ConfigError(f"config key 'rome.corpus' is wikipedia_sample, but {WIKIPEDIA_SAMPLE} is missing: "
                              "fetch it with scripts/fetch_wikipedia_sample.sh (make env runs it), or set the key "
                              "to stdlib_docs")
    elif corpus != "stdlib_docs":
        check_corpus(root, corpus)


def check_counterfact(root: Path, name: str, load) -> None:
    """``name`` (relative to ``root``) is a CounterFact JSON with at least one usable record."""
    key, path = "config key 'facts.counterfact_file'", root / name
    if not path.is_file():
        raise ConfigError(f"{key}: {name} does not exist; set it to a CounterFact JSON file, or to \"\" for none")
    try:
        relations = load(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{key}: {name} is not valid JSON ({err}); fix the file or set the key to \"\"") from err
    except (ValueError, TypeError, AttributeError) as err:
        raise ConfigError(f"{key}: {name} is not a CounterFact file ({err}): it must be a JSON list of records "
                          "with requested_rewrite: {prompt, subject, target_true: {str}, relation_id}") from err
    if not relations:
        raise ConfigError(f"{key}: {name} has no usable record (a prompt with exactly one '{{}}'); fix the file "
                          "or set the key to \"\"")


def check_corpus(root: Path, name: str) -> None:
    """``name`` (relative to ``root``) is a non-empty UTF-8 text file."""
    key, path = "config key 'rome.corpus'", root / name
    if not path.is_file():
        raise ConfigError(f"{key} is '{name}', which is neither 'stdlib_docs' nor an existing text file; set it to "
                          "stdlib_docs or to a plain-text file (paragraphs separated by blank lines)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{key}: {name} is not a UTF-8 text file ({err}); use a plain-text file or stdlib_docs") from err
    if not text.strip():
        raise ConfigError(f"{key}: {name} is empty; use a text file with English prose, or stdlib_docs")


# Words in the documentation strings of the standard library that rome.corpus 'stdlib_docs' reads
# (46,872 with Python 3.11: about 65,000 GPT-2 tokens), rounded down for other Python versions.
STDLIB_DOCS_WORDS = 40_000


# rome.corpus 'wikipedia_sample': English Wikipedia articles (CC BY-SA) from the test data of the gensim
# package, a MediaWiki XML dump fetched by scripts/fetch_wikipedia_sample.sh (run by `make env`).
WIKIPEDIA_SAMPLE = "resources/corpora/enwiki-sample.xml.bz2"


def corpus_file(config: dict) -> list[str]:
    """The file ``rome.corpus`` reads (the key statistic's rule input), or none for ``stdlib_docs``."""
    corpus = config["rome"]["corpus"]
    return [] if corpus == "stdlib_docs" else [WIKIPEDIA_SAMPLE if corpus == "wikipedia_sample" else corpus]


# Words in the paragraphs that rome.corpus 'wikipedia_sample' reads (395,753; the file is pinned by its sha256)
WIKIPEDIA_SAMPLE_WORDS = 395_000


def corpus_words(config: dict, root: str | Path = ".") -> int | None:
    """Words in the key-statistic corpus: a lower bound of its tokens for any tokenizer."""
    corpus = config["rome"]["corpus"]
    if corpus == "stdlib_docs":
        return STDLIB_DOCS_WORDS
    if corpus == "wikipedia_sample":
        return WIKIPEDIA_SAMPLE_WORDS
    path = Path(root) / corpus
    try:
        return len(path.read_text(encoding="utf-8").split())
    except (OSError, UnicodeDecodeError):
        return None


def check_layers_of(config: dict, spec: dict | None) -> None:
    name = config["model"]["name"]
    check_layers("facts.layers", config["facts"]["layers"], spec, name)
    outside = [layer for layer in config["rome"]["layers"] if layer not in config["facts"]["layers"]]
    if outside:
        raise ConfigError(f"config key 'rome.layers' has {outside}, not in facts.layers {config['facts']['layers']}: "
                          "ROME uses the key statistic computed for the sweep's layers; add them to facts.layers "
                          "or remove them from rome.layers")
    if spec is not None and config["subspace"]["layer"] != "auto":
        # the IOI site needs name movers in a layer above it
        check_layers("subspace.layer", [config["subspace"]["layer"]], spec, name, top=spec["n_layers"] - 2,
                     why="the name movers read the site from a layer above it")


MAX_CHUNK = 8192  # tokens per corpus row without learned positions (rotary): SmolLM2's context


def _positions(config: dict, spec: dict | None) -> int | None:
    return spec["n_positions"] if spec and spec.get("n_positions") else MAX_CHUNK


def _chunk_cost(config: dict, spec: dict | None, value: int) -> str:
    if spec and spec.get("n_positions"):
        return f"model '{config['model']['name']}' has {spec['n_positions']} positions; a longer row cannot be run"
    return f"rows longer than {MAX_CHUNK} tokens exceed the context the models here were trained on"


def _fact_bytes(c: dict, s: dict, v: int) -> float:
    return activation_bytes(s, v, FACT_TOKENS, dtype_bytes(c), backward=True)


def _rome_rows(c: dict) -> int:
    """Prompts per step of ROME's value optimisation: the bare prompt, the contexts and the essence prompt."""
    r = c["rome"]
    if r["method"] != "rome":
        return 1
    n = len(r["contexts"]) if isinstance(r["contexts"], list) else sum(n for _, n in r["context_lengths"])
    return n + 2


BOUNDS = [
    Bound("subspace_ioi.n_train", fixed(10_000), work_cost(lambda c, v: v * c["subspace_ioi"]["epochs"],
                                                           "forward and backward passes of DAS")),
    Bound("subspace_ioi.n_test", fixed(20_000), work_cost(lambda c, v: 12 * v, "forward passes in subspace_ioi_eval")),
    Bound("subspace_ioi.epochs", fixed(1_000), work_cost(lambda c, v: v * c["subspace_ioi"]["n_train"],
                                                         "forward and backward passes of DAS")),
    Bound("subspace_ioi.batch", memory_limit(_fact_bytes), memory_cost(_fact_bytes, "a DAS step over that many pairs")),
    Bound("facts.n_pairs", fixed(1_000), work_cost(
        lambda c, v: v * c["facts"]["steps"] * len(c["facts"]["lrs"]) * c["facts"]["trials"] * len(c["facts"]["layers"]),
        "forward and backward passes in the fact sweep")),
    Bound("facts.min_pairs", lambda c, s: c["facts"]["n_pairs"],
          lambda c, s, v: f"at most facts.n_pairs = {c['facts']['n_pairs']} pairs are made, so the run would always stop"),
    Bound("facts.steps", fixed(10_000), work_cost(
        lambda c, v: v * c["facts"]["n_pairs"] * len(c["facts"]["lrs"]) * c["facts"]["trials"] * len(c["facts"]["layers"]),
        "forward and backward passes in the fact sweep")),
    Bound("rome.n_pairs", fixed(1_000), work_cost(lambda c, v: v * c["rome"]["steps"] * len(c["facts"]["layers"])
                                                  * _rome_rows(c), "prompt runs of ROME's value optimisation")),
    Bound("rome.steps", fixed(10_000), work_cost(lambda c, v: v * c["rome"]["n_pairs"] * len(c["facts"]["layers"])
                                                 * _rome_rows(c), "prompt runs of ROME's value optimisation")),
    Bound("rome.chunk_tokens", _positions, _chunk_cost),
]


def corpus_bound(root: str | Path) -> Bound:
    """``rome.corpus_tokens`` at most the corpus's words (facts_key_stats stops when the corpus runs out)."""
    def words(config: dict, spec: dict | None) -> int | None:
        return corpus_words(config, root)
    return Bound("rome.corpus_tokens", words,
                 lambda c, s, v: f"the corpus {c['rome']['corpus']} holds at least {words(c, s)} words, and only as many "
                                 "tokens are sure to be there (a word is at least one token)")


def check_config(config: dict, root: str | Path) -> None:
    """Study B's configuration (see the module docstring); raises ConfigError."""
    check_data_files(config, root)
    spec = model_spec(config["model"]["name"], root)
    check_layers_of(config, spec)
    check_bounds(config, [*BOUNDS, corpus_bound(root)], spec)
