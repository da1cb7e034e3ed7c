"""Configuration: dotted overrides, schema validation with readable errors, and early checks.

Everything a run will need from the config is checked here, before any job starts (a value a job
would reject must never reach it: the job would first delete its old outputs): the schema (key
names, types, allowed values; an integer must be written as one, ``8.0`` and ``1e3`` are refused),
the model names, the device, the upper bound of every count (:class:`Bound`: the message gives the
bound and the estimated cost), and each study's own checks (``STUDY.check_config`` of
:mod:`mechrepro.studies`: its data files' contents, layer indices against the model's shape from
:func:`model_spec`, which reads it without loading weights). Errors name the key or file, say what
is wrong and how to fix it.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import yaml

SCHEMA_DIR = Path(__file__).resolve().parents[3] / "workflow" / "schemas"


def schema() -> dict:
    """The config schema: ``config.schema.yaml`` (shared sections) with every registered study's
    ``<study>.schema.yaml`` sections merged in, and ``studies`` restricted to the registered names."""
    from mechrepro.studies import studies

    merged = yaml.safe_load((SCHEMA_DIR / "config.schema.yaml").read_text())
    for name in studies():
        path = SCHEMA_DIR / f"{name}.schema.yaml"
        part = yaml.safe_load(path.read_text()) if path.is_file() else {}
        clash = set(merged["properties"]) & set(part.get("properties", {}))
        if clash:
            raise ConfigError(f"{path} declares config sections that already exist: {sorted(clash)}")
        merged["properties"].update(part.get("properties", {}))
        merged["required"] += part.get("required", [])
    merged["properties"]["studies"]["items"] = {"enum": list(studies())}
    return merged


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key and how to fix it."""


def apply_dotted(config: dict) -> dict:
    """Turn flat ``"a.b": v`` keys (from ``snakemake --config a.b=v``) into nested values."""
    out = copy.deepcopy({k: v for k, v in config.items() if "." not in k})
    for key, value in config.items():
        if "." not in key:
            continue
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"config override '{key}': '{part}' is not a section")
            node = node[part]
        node[parts[-1]] = value
    return out


def _schema_at(schema: dict, path: list) -> dict:
    node = schema
    for part in path:
        if isinstance(part, int):
            node = node.get("items", {})
        else:
            node = node.get("properties", {}).get(part, {})
    return node


def _describe(error: jsonschema.ValidationError, schema: dict) -> str:
    where = ".".join(str(p) for p in error.absolute_path) or "(top level)"
    if error.validator == "additionalProperties":
        node = _schema_at(schema, list(error.absolute_path))
        allowed = ", ".join(node.get("properties", {}))
        extra = sorted(set(error.instance) - set(node.get("properties", {})))
        prefix = f"{where}." if error.absolute_path else ""
        return (f"unknown config key {', '.join(repr(prefix + e) for e in extra)}; "
                f"allowed keys{' under ' + where if error.absolute_path else ''}: {allowed}")
    if error.validator == "enum":
        return f"config key '{where}' is {error.instance!r}; allowed values: {', '.join(map(str, error.validator_value))}"
    if error.validator == "type" and error.validator_value == "integer" and not isinstance(error.instance, bool):
        return (f"config key '{where}' is {error.instance!r} ({type(error.instance).__name__}); it must be an integer "
                "written with digits only (e.g. 8 or 1000, not 8.0 or 1e3)")
    if error.validator == "type":
        return f"config key '{where}' is {error.instance!r} ({type(error.instance).__name__}); it must be of type {error.validator_value}"
    if error.validator in ("minimum", "maximum"):
        op = ">=" if error.validator == "minimum" else "<="
        return f"config key '{where}' is {error.instance!r}; it must be {op} {error.validator_value}"
    if error.validator == "contains":
        return f"config key '{where}' is {error.instance!r}; it must include {error.validator_value.get('const')!r}"
    if error.validator in ("anyOf", "oneOf"):
        node = _schema_at(schema, list(error.absolute_path))
        allowed = " ".join(node.get("description", "").split()) or error.message
        return f"config key '{where}' is {error.instance!r}; allowed: {allowed}"
    if error.validator == "required":
        return f"config section '{where}' is missing a key: {error.message}"
    return f"config key '{where}': {error.message}"


def coerce(value, schema: dict):
    """Convert strings to the schema's number/boolean type where they parse cleanly.

    ``snakemake --config 'ioi={n_prompts: 100}'`` delivers nested values as strings.
    """
    kind = schema.get("type")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        return {k: coerce(v, props.get(k, {})) for k, v in value.items()}
    if isinstance(value, list):
        return [coerce(v, schema.get("items", {})) for v in value]
    if isinstance(value, str) and ("anyOf" in schema or "oneOf" in schema):
        for alternative in schema.get("anyOf", schema.get("oneOf", [])):
            converted = coerce(value, alternative)
            if not isinstance(converted, str):
                return converted
        return value
    if isinstance(value, str):
        try:
            if kind == "integer":
                return int(value)
            if kind == "number":
                return float(value)
        except ValueError:
            return value
        if kind == "boolean" and value.lower() in ("true", "false"):
            return value.lower() == "true"
    return value


# An integer is an int: JSON Schema would also accept 8.0 (and YAML reads 1.0e3 as a float), which
# a job would then use as a count or an index and fail on.
_Validator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda checker, value: isinstance(value, int) and not isinstance(value, bool)),
)


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def validate(config: dict, root: str | Path = ".", cli_overrides: dict | None = None) -> dict:
    """Validate ``config`` (after dotted overrides) and return it; raise :class:`ConfigError`.

    ``cli_overrides`` are the ``snakemake --config`` values: Snakemake parses values nested in a
    mapping as strings, so these (and only these) are converted to the schema's types first.
    """
    from mechrepro.core.registry import ModelUnavailableError, check_name
    from mechrepro.studies import studies

    full = schema()
    config = apply_dotted(config)
    if cli_overrides:
        config = _merge(config, coerce(cli_overrides, full))
    errors = sorted(_Validator(full).iter_errors(config), key=lambda e: [str(p) for p in e.absolute_path])
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(_describe(e, full) for e in errors))
    try:
        check_name(config["model"]["name"])
    except ModelUnavailableError as exc:
        raise ConfigError(str(exc)) from exc
    resolve_device(config["model"]["device"])
    spec = model_spec(config["model"]["name"], root)
    check_bounds(config, SHARED_BOUNDS, spec)
    for study in studies().values():  # each study's own checks (its data files), whether selected or not
        if study.check_config is not None:
            study.check_config(config, str(root))
    return config


# ------------------------------------------------------------------ the model's shape
def model_spec(name: str, root: str | Path = ".", folder: str | None = None) -> dict | None:
    """The shape of model ``name`` (``n_layers``, ``n_heads``, ``d_model``, ``d_mlp``, ``vocab_size``,
    ``n_positions``, …), without loading its weights: from its ``manifest.json`` once prepared (in
    ``folder``, default the model's directory), else from the registry's table, else from its
    ``config.json`` in the Hugging Face cache; None when none is at hand (then the rule that prepares
    the model checks the configuration against its shape, before any job uses it)."""
    from mechrepro.core.registry import SPECS, cached_spec
    from mechrepro.workflow.pipeline import model_dir

    manifest = Path(root) / (folder or model_dir(name)) / "manifest.json"
    try:
        import json

        return dict(json.loads(manifest.read_text())["spec"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return dict(SPECS[name]) if name in SPECS else cached_spec(name)


def check_layers(key: str, layers: list[int], spec: dict | None, name: str, top: int | None = None,
                 why: str = "") -> None:
    """Every index of ``layers`` (config ``key``) must be a layer of the model (at most ``top``,
    for the reason ``why``)."""
    if spec is None:
        return
    last = spec["n_layers"] - 1
    top = last if top is None else top
    bad = [layer for layer in layers if not 0 <= layer <= top]
    if bad:
        here = f", and here at most {top} ({why})" if top < last else ""
        raise ConfigError(f"config key '{key}' has {', '.join(map(str, bad))}: model '{name}' has {spec['n_layers']} "
                          f"layers, 0-{last}{here}. Fix: use layers in 0-{top} (in config/config.yaml or --config "
                          f"'{key.split('.')[0]}={{{key.split('.', 1)[1]}: ...}}')")


# ------------------------------------------------------------------ upper bounds of counts
def machine_memory() -> int:
    """Physical memory of this machine in bytes (16 GB if unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 << 30


def gb(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:.1f} GB"


def dtype_bytes(config: dict) -> int:
    return 8 if config["model"]["dtype"] == "float64" else 4


def activation_bytes(spec: dict, rows: int, seq: int, nbytes: int, backward: bool = False) -> float:
    """Estimated peak memory of one forward pass over ``rows`` prompts of ``seq`` tokens: per layer
    the residual stream and its copies, attention scores and the MLP hidden units; the logits at one
    position. A backward pass keeps every layer's activations and their gradients (×3)."""
    per_row = seq * spec["n_layers"] * (3 * spec["d_model"] + spec["d_mlp"] + spec["n_heads"] * seq)
    return (3 if backward else 1) * rows * (per_row + spec["vocab_size"]) * nbytes


@dataclass(frozen=True)
class Bound:
    """The upper bound of a count ``key``: ``limit(config, spec)`` (None: no bound can be computed,
    e.g. without the model's shape) and ``cost(config, spec, value)``, the estimated cost of a value
    (memory or work), shown in the message."""

    key: str
    limit: Callable[[dict, dict | None], int | None]
    cost: Callable[[dict, dict | None, int], str]


def fixed(n: int) -> Callable[[dict, dict | None], int]:
    return lambda config, spec: n


def memory_limit(bytes_at: Callable[[dict, dict, int], float]) -> Callable[[dict, dict | None], int | None]:
    """The largest value whose estimated memory ``bytes_at(config, spec, value)`` fits in this machine's
    physical memory (the estimate grows linearly with the value)."""
    def limit(config: dict, spec: dict | None) -> int | None:
        if spec is None:
            return None
        return max(1, int(machine_memory() // max(bytes_at(config, spec, 1), 1)))
    return limit


def memory_cost(bytes_at: Callable[[dict, dict, int], float], what: str) -> Callable[[dict, dict | None, int], str]:
    """The estimated memory of ``what`` at a value, beside this machine's memory."""
    def cost(config: dict, spec: dict | None, value: int) -> str:
        if spec is None:
            return what
        return (f"{what} would need about {gb(bytes_at(config, spec, value))} of memory (estimated), and this "
                f"machine has {gb(machine_memory())}")
    return cost


def work_cost(unit: Callable[[dict, int], float], what: str) -> Callable[[dict, dict | None, int], str]:
    """The estimated work at a value: ``unit(config, value)`` of ``what`` (e.g. forward passes)."""
    return lambda config, spec, value: f"about {unit(config, value):.3g} {what} (estimated)"


def check_bounds(config: dict, bounds: list[Bound], spec: dict | None) -> None:
    """Refuse every count above its bound, with the bound and the estimated cost of the value."""
    from mechrepro.workflow.pipeline import get_key

    problems = []
    for b in bounds:
        value = get_key(config, b.key)
        values = value if isinstance(value, list) else [value]
        limit = b.limit(config, spec)
        for v in values:
            if limit is not None and isinstance(v, int) and v > limit:
                problems.append(f"config key '{b.key}' is {v}, above its bound {limit}: {b.cost(config, spec, v)}. "
                                f"Fix: set {b.key} to at most {limit}")
                break
    if problems:
        raise ConfigError("count too large:\n  - " + "\n  - ".join(problems))


IOI_TOKENS = 32  # tokens of an IOI prompt, at most (memory estimates)
SHARED_BOUNDS = [
    Bound("seed", fixed(2**32 - 1), lambda c, s, v: "numpy's random generators take seeds below 2**32"),
    Bound("model.batch_size",
          memory_limit(lambda c, s, v: activation_bytes(s, v, IOI_TOKENS, dtype_bytes(c))),
          memory_cost(lambda c, s, v: activation_bytes(s, v, IOI_TOKENS, dtype_bytes(c)),
                      "one forward pass over a batch of that many prompts")),
    Bound("figures.n_attention_samples", fixed(10_000), work_cost(lambda c, v: v, "prompts per error bar of Figure 4")),
]


# Top-level directories the workflow writes to (see mechrepro.workflow.pipeline and the rules).
OUTPUT_ROOTS = ("results", "figures", "resources", "logs")


def check_output_dirs(root: str | Path = ".") -> None:
    """Every existing directory the workflow writes to must be writable (checked by creating a
    temporary file), so that a read-only ``figures/`` stops the run before any rule, not after
    hours of compute. Raises :class:`ConfigError` naming the directory."""
    import tempfile

    root = Path(root)
    # a missing top-level directory is created under the working directory
    dirs = [root] if any(not (root / top).is_dir() for top in OUTPUT_ROOTS) else []
    for top in OUTPUT_ROOTS:
        d = root / top
        if d.is_dir():
            dirs.append(d)
            dirs += sorted(p for p in d.rglob("*") if p.is_dir()
                           and not any(x.startswith(".") for x in p.relative_to(d).parts))
    for d in dirs:
        try:
            with tempfile.TemporaryFile(dir=d):
                pass
        except OSError as exc:
            rel = d.relative_to(root).as_posix() if d != root else "."
            raise ConfigError(f"output directory '{rel}' is not writable ({exc.strerror}); make it writable "
                              f"(e.g. chmod -R u+w {rel}) or run the workflow in a directory you can write to") from exc


def resolve_device(device: str) -> str:
    """``auto`` -> cuda if available else cpu; ``cuda`` without a GPU is a :class:`ConfigError`."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config key 'model.device' is 'cuda' but no CUDA device is available; "
                          "use 'cpu' or 'auto'")
    return device


def require_strings(path: str | Path, key: str, values, key_hint: str = "") -> None:
    """``values`` (the list or mapping ``key`` of data file ``path``) must be non-empty strings: YAML
    reads e.g. ``No`` as False and ``1984`` as a number, which would silently become "False" and "1984"."""
    if not isinstance(values, (list, dict)):
        raise ConfigError(f"{path}: '{key}' must be a list{key_hint}; it is {values!r}")
    items = list(values.items()) if isinstance(values, dict) else list(enumerate(values))
    for where, value in items:
        pairs = [value] if not isinstance(values, dict) else [where, value]
        for v in pairs:
            if not isinstance(v, str) or not v.strip():
                raise ConfigError(f"{path}: '{key}' has {v!r} ({type(v).__name__}) at {where!r}, which is not a "
                                  f"non-empty string; quote it in the file (YAML reads e.g. No as false and 1984 "
                                  f"as a number){key_hint}")


def read_yaml(path: str | Path, missing: Exception, invalid: type[Exception] = ValueError):
    """The parsed YAML file ``path``; raises ``missing`` when there is no such file and
    ``invalid`` (naming the file, line and column) when it is not valid YAML."""
    path = Path(path)
    if not path.is_file():
        raise missing
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise invalid(f"{path} is not valid YAML: {exc}") from exc


def load(path: str | Path, overrides: dict | None = None) -> dict:
    """Read a YAML config file, apply ``overrides`` (dotted keys allowed) and validate it."""
    path = Path(path)
    config = apply_dotted(_merge(yaml.safe_load(path.read_text()), overrides or {}))
    return validate(config, root=path.resolve().parent.parent)
