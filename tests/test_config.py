"""Tests for config.py: shipped configs, overrides, and clear errors for bad input."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from config import (DEFAULTS, REQUIRED_KEYS, ConfigError, apply_overrides,  # noqa: E402
                    load_config, save_config, validate_config)

BASE_URL = "https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/"

FLICKR_ORIGINAL = {
    "image_root": "/export/share/datasets/vision/flickr30k/",
    "ann_root": "annotation",
    "dataset": "flickr",
    "pretrained": BASE_URL + "model_base_retrieval_flickr.pth",
    "vit": "base",
    "batch_size_train": 32,
    "batch_size_test": 64,
    "vit_grad_ckpt": True,
    "vit_ckpt_layer": 4,
    "init_lr": 1e-5,
    "image_size": 384,
    "queue_size": 57600,
    "alpha": 0.4,
    "k_test": 128,
    "negative_all_rank": False,
    "weight_decay": 0.05,
    "min_lr": 0,
    "max_epoch": 6,
}

COCO_ORIGINAL = {
    **FLICKR_ORIGINAL,
    "image_root": "/export/share/datasets/vision/coco/images/",
    "dataset": "coco",
    "pretrained": BASE_URL + "model_base_retrieval_coco.pth",
    "k_test": 256,
    "negative_all_rank": True,
}


def _minimal_yaml(**changes: str) -> str:
    """The Flickr config as YAML text, with some lines replaced (value given as YAML)."""
    lines = []
    for key, value in FLICKR_ORIGINAL.items():
        text = changes.pop(key, None)
        if text is None:
            text = repr(value) if isinstance(value, str) else str(value)
        lines.append(f"{key}: {text}")
    lines += [f"{key}: {text}" for key, text in changes.items()]
    return "\n".join(lines) + "\n"


def _write(tmp_path: Path, text: str, name: str = "x.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("name, original", [("retrieval_flickr.yaml", FLICKR_ORIGINAL),
                                            ("retrieval_coco.yaml", COCO_ORIGINAL)])
def test_shipped_configs_have_original_values(name: str, original: dict) -> None:
    config = load_config(str(REPO_ROOT / "configs" / name))
    for key, value in original.items():
        assert config[key] == value, key
    assert isinstance(config["init_lr"], float) and isinstance(config["min_lr"], float)
    # Optional keys are not in the files, so the defaults apply.
    for key, value in DEFAULTS.items():
        if key != "med_config":
            assert config[key] == value, key
    assert config["med_config"] == str(REPO_ROOT / "configs" / "med_config.json")
    assert list(config)[:len(REQUIRED_KEYS)] == list(REQUIRED_KEYS)


def test_med_config_resolved_from_repo_root_when_cwd_elsewhere(tmp_path: Path,
                                                               monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(str(REPO_ROOT / "configs" / "retrieval_flickr.yaml"))
    assert config["med_config"] == str(REPO_ROOT / "configs" / "med_config.json")
    with pytest.raises(ConfigError, match="med_config.*not found"):
        load_config(str(REPO_ROOT / "configs" / "retrieval_flickr.yaml"),
                    ["med_config=configs/nope.json"])


def test_typo_key_suggests_the_right_one(tmp_path: Path) -> None:
    text = _minimal_yaml().replace("batch_size_train:", "batch_size_trian:")
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (f"unknown config key 'batch_size_trian' in {path}; "
                              f"did you mean 'batch_size_train'?")


def test_unknown_key_without_close_match_lists_valid_keys(tmp_path: Path) -> None:
    path = _write(tmp_path, _minimal_yaml(zzzqqq="1"))
    with pytest.raises(ConfigError, match="valid keys are: image_root, ann_root"):
        load_config(path)


def test_overrides_are_parsed_as_yaml() -> None:
    config = load_config(str(REPO_ROOT / "configs" / "retrieval_flickr.yaml"), [
        "init_lr=2e-5", "negative_all_rank=true", "batch_size_train=16",
        "vit={embed_dim: 64, depth: 2, num_heads: 2}", "precision=bf16", "seed=7",
        "sha256=" + "AB" * 32,
    ])
    assert config["init_lr"] == 2e-5 and isinstance(config["init_lr"], float)
    assert config["negative_all_rank"] is True
    assert config["batch_size_train"] == 16
    assert config["vit"] == {"embed_dim": 64, "depth": 2, "num_heads": 2,
                             "patch_size": 16, "mlp_ratio": 4.0}
    assert config["precision"] == "bf16"
    assert config["seed"] == 7
    assert config["sha256"] == "ab" * 32


def test_dotted_override_and_override_typo() -> None:
    config = {"vit": {"embed_dim": 64, "depth": 2, "num_heads": 2}}
    apply_overrides(config, ["vit.depth=4"])
    assert config["vit"]["depth"] == 4
    with pytest.raises(ConfigError, match="did you mean 'k_test'"):
        apply_overrides(config, ["k_tset=3"])
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(config, ["init_lr"])


@pytest.mark.parametrize("vit, message", [
    ("{embed_dim: 64, depth: 2}", r"missing \['num_heads'\]"),
    ("{embed_dim: 64, depth: 2, num_heads: 2, heads: 2}", "unknown key 'heads'"),
    ("{embed_dim: 64, depth: 2, num_heads: 5}", "divisible by num_heads"),
    ("{embed_dim: 64, depth: 2.5, num_heads: 2}", r"'vit.depth' must be an int, got 2.5"),
    ("{embed_dim: 64, depth: 2, num_heads: 2, patch_size: 0}", "'vit.patch_size' must be positive"),
    ("huge", r"'base' \(ViT-B/16\), 'large' \(ViT-L/16\), or a mapping .*vit=\{embed_dim: 1280, depth: 32, "
             r"num_heads: 16.*got 'huge'"),
])
def test_bad_vit_is_rejected(vit: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(str(REPO_ROOT / "configs" / "retrieval_flickr.yaml"), [f"vit={vit}"])


def test_bool_given_as_string_is_an_error(tmp_path: Path) -> None:
    path = _write(tmp_path, _minimal_yaml(vit_grad_ckpt="'False'"))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "'vit_grad_ckpt'" in message and "bool" in message and "'False'" in message


@pytest.mark.parametrize("key, yaml_value, expected", [
    ("batch_size_train", "'32'", "must be an int"),
    ("batch_size_train", "true", "must be an int"),
    ("k_test", "1.5", "must be an int"),
    ("init_lr", "fast", "must be a float"),
    ("precision", "fp16", r"one of \['fp32', 'tf32', 'bf16'\]"),
    ("eval_mode", "slow", r"one of \['fast', 'reference'\]"),
    ("batch_size_test", "0", "'batch_size_test' must be > 0"),
    ("alpha", "1.5", "'alpha' must be between 0 and 1"),
    ("k_test", "-1", "'k_test' must be >= 0"),
    ("eval_every", "0", "'eval_every' must be > 0"),
    ("eval_test_every_epoch", "'yes'", "must be a bool"),
    ("queue_size", "0", "'queue_size' must be > 0"),
    ("max_epoch", "-1", "'max_epoch' must be >= 0"),
    ("sha256", "abc", "64-character hex"),
])
def test_bad_values_name_key_and_rule(key: str, yaml_value: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected) as err:
        load_config(str(REPO_ROOT / "configs" / "retrieval_flickr.yaml"),
                    [f"{key}={yaml_value}"])
    assert f"'{key}'" in str(err.value)


def test_floats_accept_ints_and_exponents(tmp_path: Path) -> None:
    path = _write(tmp_path, _minimal_yaml(init_lr="1e-5", min_lr="0", weight_decay="1"))
    config = load_config(path)
    assert config["init_lr"] == 1e-5 and config["min_lr"] == 0.0
    assert isinstance(config["weight_decay"], float)


def test_missing_required_key_is_named(tmp_path: Path) -> None:
    text = "\n".join(l for l in _minimal_yaml().splitlines() if not l.startswith("k_test"))
    with pytest.raises(ConfigError, match="missing required config key.*k_test"):
        load_config(_write(tmp_path, text))


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not found") as err:
        load_config(path)
    assert path in str(err.value)


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    text = "image_root: 'a'\nann_root: 'b'\ndataset: [flickr\nvit: base\n"
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert path in message and "YAML syntax error" in message
    assert "line 4" in message


def test_duplicate_key_is_a_syntax_error_with_line(tmp_path: Path) -> None:
    path = _write(tmp_path, _minimal_yaml() + "alpha: 0.5\n")
    with pytest.raises(ConfigError, match=r"line 19"):
        load_config(path)


def test_save_config_round_trips_in_stable_order(tmp_path: Path) -> None:
    config = load_config(str(REPO_ROOT / "configs" / "retrieval_coco.yaml"),
                         ["vit={embed_dim: 64, depth: 2, num_heads: 2}"])
    out = tmp_path / "sub" / "config.yaml"
    save_config(config, str(out))
    text = out.read_text()
    assert text.splitlines()[0].startswith("image_root:")
    assert "{" not in text  # block style, readable
    assert load_config(str(out)) == config


def test_validate_config_fills_defaults_without_mutating() -> None:
    raw = dict(FLICKR_ORIGINAL)
    config = validate_config(raw)
    assert raw == FLICKR_ORIGINAL
    assert config["embed_dim"] == 256 and config["eval_mode"] == "fast"
    assert os.path.isabs(config["med_config"])
