"""Configuration: dotted overrides, schema validation with readable errors, and early checks.

Everything a run will need from the config is checked here, before any model is loaded: the
schema (key names, types, allowed values), the model name, the device, and each study's own
checks of its data files (``STUDY.check_config`` of :mod:`mechrepro.studies`). Errors name the
key and say what is allowed.
"""

from __future__ import annotations

import copy
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
    errors = sorted(jsonschema.Draft202012Validator(full).iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(_describe(e, full) for e in errors))
    try:
        check_name(config["model"]["name"])
    except ModelUnavailableError as exc:
        raise ConfigError(str(exc)) from exc
    resolve_device(config["model"]["device"])
    for study in studies().values():  # each study's own checks (its data files), whether selected or not
        if study.check_config is not None:
            study.check_config(config, str(root))
    return config


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
