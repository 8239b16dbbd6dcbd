"""Load, override, validate and save the YAML retrieval configs.

The original BLIP retrieval keys are all required; the newer keys are optional and
their defaults (``DEFAULTS``) reproduce the original behaviour.
"""
from __future__ import annotations

import difflib
import io
import logging
import os
import re
from typing import Any, Callable

from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError

_logger = logging.getLogger(__name__)

REPO_ROOT = os.path.dirname(os.path.abspath(__file__))

REQUIRED_KEYS: tuple[str, ...] = (
    "image_root", "ann_root", "dataset", "pretrained", "vit",
    "batch_size_train", "batch_size_test", "vit_grad_ckpt", "vit_ckpt_layer", "init_lr",
    "image_size", "queue_size", "alpha", "k_test", "negative_all_rank",
    "weight_decay", "min_lr", "max_epoch",
)

DEFAULTS: dict[str, Any] = {
    "med_config": "configs/med_config.json",
    "tokenizer": "bert-base-uncased",
    "embed_dim": 256,
    "momentum": 0.995,
    "num_workers": None,  # None: min(4, this process's share of the CPUs), see data.loaders.default_num_workers
    "precision": "tf32",
    "eval_mode": "fast",
    "eval_pair_batch": None,  # None: 1024 on a GPU, 256 on the CPU
    "eval_every": 1,  # fine-tuning: evaluate val every N epochs, and always after the last one
    "eval_test_every_epoch": False,  # fine-tuning: test every time val is evaluated, not only when val improves
    "compile": False,
    "seed": None,
    "log_every": 50,
    "max_words": 30,
    "sha256": None,
    "allow_unsafe_checkpoint": False,
    "save_every_steps": 0,
    "accum_steps": 1,  # each process plays this many ranks, one micro-batch each (models/virtual_ranks.py)
    "tensorboard": True,
    "augment": True,
    "report": True,  # output_dir/report/: the visual report of each evaluation (report/)
    "report_queries": 24,  # gallery queries per direction and split: half the worst-ranked, half random
    "report_thumb_px": 128,  # longest side of the report's JPEG thumbnails
}

PRECISIONS = ("fp32", "tf32", "bf16")
EVAL_MODES = ("fast", "reference")
VIT_PRESETS = ("base", "large")
VIT_KEYS = ("embed_dim", "depth", "num_heads", "patch_size", "mlp_ratio")
VIT_DEFAULTS = {"patch_size": 16, "mlp_ratio": 4.0}

_ALL_KEYS = REQUIRED_KEYS + tuple(DEFAULTS)

# Keys that change no number of a fine-tune (logging, speed, outputs; a resumed run takes its weights from
# checkpoint_last.pth, not `pretrained`): changing them on --resume is not worth a warning. The evaluation path
# and batching and torch.compile change results only by rounding.
RESULT_NEUTRAL_KEYS = ("log_every", "tensorboard", "num_workers", "save_every_steps", "pretrained", "sha256",
                       "allow_unsafe_checkpoint", "eval_mode", "eval_pair_batch", "compile", "eval_every",
                       "eval_test_every_epoch")


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and the fix."""


def _yaml() -> YAML:
    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    yaml.width = 4096  # keep long URLs on one line
    yaml.sort_base_mapping_type_on_output = False  # keep our key order when saving
    return yaml


# --------------------------------------------------------------------------- #
# Type checks
# --------------------------------------------------------------------------- #
def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _as_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"config key '{key}' must be an int, got {_describe(value)}")
    return value


def _as_float(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"config key '{key}' must be a float, got {_describe(value)}")
    return float(value)


def _as_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"config key '{key}' must be a bool (write true or false "
                          f"without quotes), got {_describe(value)}")
    return value


def _as_str(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"config key '{key}' must be a string, got {_describe(value)}")
    return value


def _optional(check: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    return lambda key, value: None if value is None else check(key, value)


def _choice(choices: tuple[str, ...]) -> Callable[[str, Any], str]:
    def check(key: str, value: Any) -> str:
        if value not in choices:
            raise ConfigError(f"config key '{key}' must be one of {list(choices)}, "
                              f"got {value!r}")
        return value
    return check


def _as_sha256(key: str, value: Any) -> str:
    digest = _as_str(key, value).lower()
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ConfigError(f"config key '{key}' must be a 64-character hex SHA-256 digest "
                          f"(e.g. from `sha256sum file.pth`), got {value!r}")
    return digest


_VIT_FORMS = ("'base' (ViT-B/16), 'large' (ViT-L/16), or a mapping for another size, e.g. "
              "vit={embed_dim: 1280, depth: 32, num_heads: 16, patch_size: 16, mlp_ratio: 4} "
              "(patch_size and mlp_ratio optional; BLIP's official checkpoints exist for base and large only)")


def _as_vit(key: str, value: Any) -> str | dict[str, Any]:
    """'base', 'large', or a mapping describing a custom ViT."""
    if isinstance(value, str):
        if value not in VIT_PRESETS:
            raise ConfigError(f"config key '{key}' must be {_VIT_FORMS}; got {value!r}")
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"config key '{key}' must be {_VIT_FORMS}; got {_describe(value)}")
    for sub in value:
        if sub not in VIT_KEYS:
            raise ConfigError(f"unknown key '{sub}' in config key '{key}'"
                              f"{_suggestion(str(sub), VIT_KEYS)}")
    missing = [k for k in VIT_KEYS if k not in value and k not in VIT_DEFAULTS]
    if missing:
        raise ConfigError(f"config key '{key}' is missing {missing}; a custom ViT needs "
                          f"embed_dim, depth and num_heads (patch_size, mlp_ratio optional)")
    vit = {**VIT_DEFAULTS, **value}
    out: dict[str, Any] = {}
    for sub in VIT_KEYS:
        name = f"{key}.{sub}"
        out[sub] = _as_float(name, vit[sub]) if sub == "mlp_ratio" else _as_int(name, vit[sub])
        if out[sub] <= 0:
            raise ConfigError(f"config key '{name}' must be positive, got {vit[sub]!r}")
    if out["embed_dim"] % out["num_heads"]:
        raise ConfigError(f"config key '{key}': embed_dim {out['embed_dim']} must be "
                          f"divisible by num_heads {out['num_heads']}")
    return out


_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "image_root": _as_str,
    "ann_root": _as_str,
    "dataset": _as_str,
    "pretrained": _optional(_as_str),  # path or URL; null trains from scratch
    "vit": _as_vit,
    "batch_size_train": _as_int,
    "batch_size_test": _as_int,
    "vit_grad_ckpt": _as_bool,
    "vit_ckpt_layer": _as_int,
    "init_lr": _as_float,
    "image_size": _as_int,
    "queue_size": _as_int,
    "alpha": _as_float,
    "k_test": _as_int,
    "negative_all_rank": _as_bool,
    "weight_decay": _as_float,
    "min_lr": _as_float,
    "max_epoch": _as_int,
    "med_config": _as_str,
    "tokenizer": _as_str,
    "embed_dim": _as_int,
    "momentum": _as_float,
    "num_workers": _optional(_as_int),
    "precision": _choice(PRECISIONS),
    "eval_mode": _choice(EVAL_MODES),
    "eval_pair_batch": _optional(_as_int),
    "eval_every": _as_int,
    "eval_test_every_epoch": _as_bool,
    "compile": _as_bool,
    "seed": _optional(_as_int),
    "log_every": _as_int,
    "max_words": _as_int,
    "sha256": _optional(_as_sha256),
    "allow_unsafe_checkpoint": _as_bool,
    "save_every_steps": _as_int,
    "accum_steps": _as_int,
    "tensorboard": _as_bool,
    "augment": _as_bool,
    "report": _as_bool,
    "report_queries": _as_int,
    "report_thumb_px": _as_int,
}
assert set(_CHECKS) == set(_ALL_KEYS)


def _check_range(config: dict[str, Any]) -> None:
    def require(ok: bool, key: str, rule: str) -> None:
        if not ok:
            raise ConfigError(f"config key '{key}' must be {rule}, got {config[key]!r}")

    for key in ("batch_size_train", "batch_size_test", "image_size", "queue_size",
                "embed_dim", "log_every", "max_words", "eval_every"):
        require(config[key] > 0, key, "> 0")
    require(config["eval_pair_batch"] is None or config["eval_pair_batch"] > 0, "eval_pair_batch", "> 0 or null")
    for key in ("vit_ckpt_layer", "save_every_steps", "max_epoch", "init_lr", "min_lr", "weight_decay"):
        require(config[key] >= 0, key, ">= 0")
    require(config["num_workers"] is None or config["num_workers"] >= 0, "num_workers", ">= 0 or null")
    require(0.0 <= config["alpha"] <= 1.0, "alpha", "between 0 and 1")
    require(0.0 <= config["momentum"] <= 1.0, "momentum", "between 0 and 1")
    require(config["k_test"] >= 0, "k_test", ">= 0 (0: the contrastive-only protocol, no matching head)")
    require(config["accum_steps"] >= 1, "accum_steps", ">= 1 (1: one batch per process and step)")
    require(config["report_queries"] >= 1, "report_queries", ">= 1 (set report: false to write no report)")
    require(16 <= config["report_thumb_px"] <= 1024, "report_thumb_px", "between 16 and 1024 pixels")
    # queue_size % (batch_size_train x processes x accum_steps) is checked when training starts: evaluation never fills
    # the queue, so (as in the original) an evaluate run takes any queue_size of the checkpoint.
    patch = config["vit"]["patch_size"] if isinstance(config["vit"], dict) else 16
    if config["image_size"] % patch:
        raise ConfigError(f"config key 'image_size' ({config['image_size']}) must be a "
                          f"multiple of the ViT patch size ({patch})")


# --------------------------------------------------------------------------- #
# Public API
# --------------------------------------------------------------------------- #
# Names other code bases use for BLIP's keys: a suggestion by meaning, where spelling finds nothing close.
KEY_ALIASES: dict[str, str] = {
    "lr": "init_lr", "learning_rate": "init_lr", "base_lr": "init_lr", "peak_lr": "init_lr",
    "final_lr": "min_lr", "end_lr": "min_lr",
    "epochs": "max_epoch", "num_epochs": "max_epoch", "n_epochs": "max_epoch", "max_epochs": "max_epoch",
    "batch_size": "batch_size_train", "train_batch_size": "batch_size_train", "bs": "batch_size_train",
    "eval_batch_size": "batch_size_test", "test_batch_size": "batch_size_test",
    "wd": "weight_decay", "topk": "k_test", "top_k": "k_test", "k": "k_test",
    "checkpoint": "pretrained", "ckpt": "pretrained", "weights": "pretrained", "model": "pretrained",
    "image_dir": "image_root", "images": "image_root", "data_root": "image_root",
    "annotation_dir": "ann_root", "ann_dir": "ann_root", "workers": "num_workers",
    "amp": "precision", "fp16": "precision", "dtype": "precision", "mixed_precision": "precision",
}
# Command-line flags, not config keys.
_FLAGS = {"output_dir": "--output_dir", "resume": "--resume", "evaluate": "--evaluate", "device": "--device"}


def _suggestion(key: str, valid: tuple[str, ...]) -> str:
    if key in _FLAGS:
        return f"; it is a command-line flag: pass {_FLAGS[key]} to train_retrieval.py"
    if key in KEY_ALIASES and key not in valid:
        meant = KEY_ALIASES[key]
        also = " (and batch_size_test for evaluation)" if meant == "batch_size_train" else ""
        return (f"; did you mean '{meant}'{also}? BLIP's names: init_lr (not lr), max_epoch (not epochs), "
                "batch_size_train / batch_size_test (not batch_size)")
    close = difflib.get_close_matches(key, valid, n=1)
    if close:
        return f"; did you mean '{close[0]}'?"
    return f"; valid keys are: {', '.join(valid)}"


def _check_known_keys(config: dict[Any, Any], source: str) -> None:
    for key in config:
        if key not in _ALL_KEYS:
            raise ConfigError(f"unknown config key '{key}' in {source}"
                              f"{_suggestion(str(key), _ALL_KEYS)}")


def _resolve_med_config(path: str) -> str:
    """Use ``path`` as given if it exists from the CWD, else relative to the repo root."""
    if os.path.isabs(path) or os.path.exists(path):
        candidate = path
    else:
        candidate = os.path.join(REPO_ROOT, path)
    if not os.path.isfile(candidate):
        tried = path if candidate == path else f"{path!r} (from the current directory) and {candidate!r}"
        raise ConfigError(f"config key 'med_config': file not found, tried {tried}")
    return os.path.abspath(candidate)


def validate_config(config: dict[str, Any]) -> dict[str, Any]:
    """Check every key and value; return a new dict with defaults filled, in a stable order."""
    if not isinstance(config, dict):
        raise ConfigError(f"config must be a mapping of keys to values, got {_describe(config)}")
    _check_known_keys(config, "config")
    missing = [key for key in REQUIRED_KEYS if key not in config]
    if missing:
        raise ConfigError(f"missing required config key(s): {', '.join(missing)}")
    merged = {**DEFAULTS, **config}
    out = {key: _CHECKS[key](key, merged[key]) for key in _ALL_KEYS}
    _check_range(out)
    out["med_config"] = _resolve_med_config(out["med_config"])
    return out


def _parse_yaml_text(text: str, source: str) -> Any:
    try:
        return _yaml().load(text)
    except MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = err.problem or err.context or "invalid YAML"
        if err.context and err.context_mark and err.context_mark is not mark:
            problem += f" ({err.context} started at line {err.context_mark.line + 1})"
        raise ConfigError(f"YAML syntax error in {source}{where}: {problem}") from None
    except YAMLError as err:
        raise ConfigError(f"YAML syntax error in {source}: {err}") from None


def apply_overrides(config: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``key=value`` overrides (value parsed as YAML) to ``config`` in place and return it.

    ``vit.depth=2`` sets one field of a custom ViT mapping.
    """
    for override in overrides or []:
        key, sep, raw = override.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {override!r} must look like key=value, "
                              f"e.g. init_lr=2e-5")
        value = _parse_yaml_text(raw, f"override {override!r}") if raw.strip() else None
        top, _, sub = key.partition(".")
        _check_known_keys({top: None}, f"override {override!r}")
        if sub:
            if not isinstance(config.get(top), dict):
                raise ConfigError(f"override {override!r}: '{top}' is not a mapping, "
                                  f"set it whole instead ({top}={{...}})")
            config[top][sub] = value
        else:
            config[key] = value
    return config


def load_config(path: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Read a YAML config, apply ``key=value`` overrides, validate and fill defaults."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as f:
        raw = _parse_yaml_text(f.read(), path)
    if raw is None:
        raise ConfigError(f"config file {path} is empty")
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must contain a mapping of keys to values, "
                          f"got {type(raw).__name__}")
    _check_known_keys(raw, path)
    apply_overrides(raw, overrides)
    return validate_config(raw)


def save_config(config: dict[str, Any], path: str) -> None:
    """Write ``config`` as block-style YAML (required keys first, then optional keys)."""
    known = [key for key in _ALL_KEYS if key in config]
    ordered = {key: config[key] for key in known + [k for k in config if k not in _ALL_KEYS]}
    buffer = io.StringIO()
    _yaml().dump(ordered, buffer)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(buffer.getvalue())


# ---------------------------------------------------------------------------- editing a config file's text
def yaml_quote(value: str) -> str:
    """`value` as a single-quoted YAML scalar (read back as the same string)."""
    return "'" + value.replace("'", "''") + "'"


def set_config_lines(text: str, values: dict[str, str]) -> str:
    """``text`` (YAML) with top-level keys set by editing only their lines (comments stay; missing keys appended)."""
    lines = text.splitlines(keepends=True)
    for key, value in values.items():
        pattern = re.compile(
            rf"^{key}\s*:\s*(?P<value>'(?:[^']|'')*'|\"[^\"]*\"|[^#\n]*?)(?P<comment>\s+#.*)?(?P<eol>\r?\n)?$"
        )
        for index, line in enumerate(lines):
            match = pattern.match(line)
            if match:
                lines[index] = f"{key}: {value}{match['comment'] or ''}{match['eol'] or ''}"
                break
        else:
            if lines and not lines[-1].endswith("\n"):
                lines[-1] += "\n"
            lines.append(f"{key}: {value}\n")
    return "".join(lines)
