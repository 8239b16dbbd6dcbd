"""Tests for data/demo.py (the synthetic demo dataset) and the demo configs that depend on it."""
from __future__ import annotations

import json
import math
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from data import demo  # noqa: E402
from data.captions import pre_caption  # noqa: E402

SMALL = dict(n_train_images=40, n_val_images=10, n_test_images=10)
SPLITS = ("train", "val", "test")

_COLOURS = "|".join(demo.COLOURS)
_SHAPES = "|".join(demo.SHAPES)
_SIZES = "|".join(demo.SIZES)
# "<colour> <shape>" pairs and "one <size> <shape> colored <colour>" name one object each.
_COLOUR_SHAPE = re.compile(rf"\b({_COLOURS}) ({_SHAPES})\b")
_SHAPE_COLORED = re.compile(rf"\b({_SHAPES}) colored ({_COLOURS})\b")
_SIZE_WORD = re.compile(rf"\b({_SIZES}) (?:({_COLOURS}) )?({_SHAPES})\b")
_OBJECT = rf"an? ({_COLOURS}) ({_SHAPES})"
_RELATION = re.compile(rf"^{_OBJECT} (above|below|to the left of|to the right of) {_OBJECT}$")
_PHRASE_TO_POSITION = {phrase: position for position, phrases in demo.POSITION_PHRASES.items()
                       for phrase in phrases}
# Areas of the drawn shapes in units of radius**2 (see data.demo._shape_points).
_AREA_PER_R2 = {"circle": math.pi, "square": 1.7 ** 2, "triangle": 0.5 * 1.9 * 1.75, "diamond": 1.6,
                "star": 10 * 0.5 * 0.45 * math.sin(math.pi / 5)}


def _generate(root: Path, seed: int = 0, **overrides: int) -> dict[str, str]:
    return demo.ensure_demo_data(str(root), seed=seed, **{**SMALL, **overrides})


def _files(root: Path) -> dict[str, bytes]:
    """Every data file under ``root`` (relative path -> bytes), without the lock file."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != demo._LOCK_FILENAME}


def _load(root: Path, name: str):
    return json.loads((root / name).read_text(encoding="utf-8"))


def _captions_by_image(root: Path) -> dict[str, list[str]]:
    captions: dict[str, list[str]] = {}
    for record in _load(root, "annotation/demo_train.json"):
        captions.setdefault(record["image"], []).append(record["caption"])
    for split in ("val", "test"):
        for record in _load(root, f"annotation/demo_{split}.json"):
            captions[record["image"]] = record["caption"]
    return captions


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo") / "blip_demo"
    _generate(root)
    return root


def test_returns_paths_in_the_documented_layout(data_root):
    paths = _generate(data_root)
    assert paths == {"image_root": str(data_root), "ann_root": str(data_root / "annotation"),
                     "vocab_file": str(data_root / "vocab.txt")}
    for split in SPLITS:
        assert (data_root / "annotation" / f"demo_{split}.json").is_file()
    manifest = _load(data_root, "manifest.json")
    assert manifest["version"] == demo.DEMO_DATA_VERSION
    assert manifest["params"] == {"seed": 0, "image_size": demo.DEFAULT_IMAGE_SIZE, **SMALL}
    assert manifest["counts"]["train_captions"] == 5 * SMALL["n_train_images"]


def test_same_seed_gives_identical_files_and_other_seed_differs(data_root, tmp_path):
    _generate(tmp_path / "again")
    assert _files(tmp_path / "again") == _files(data_root)
    _generate(tmp_path / "other", seed=1)
    assert _load(tmp_path / "other", "annotation/demo_test.json") != _load(data_root, "annotation/demo_test.json")
    # The vocabulary is fixed by the templates, so model configs can state its size.
    assert (tmp_path / "other" / "vocab.txt").read_bytes() == (data_root / "vocab.txt").read_bytes()


def test_second_call_skips_generation(data_root, monkeypatch):
    before = {p: p.stat().st_mtime_ns for p in data_root.rglob("*") if p.is_file()}

    def fail(*args, **kwargs):
        raise AssertionError("regenerated although the manifest matches")

    monkeypatch.setattr(demo, "_generate_into", fail)
    _generate(data_root)
    after = {p: p.stat().st_mtime_ns for p in data_root.rglob("*") if p.is_file()}
    assert after == before


def test_changed_parameters_regenerate(data_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(data_root, root)
    _generate(root, n_test_images=7)
    assert len(_load(root, "annotation/demo_test.json")) == 7
    assert _load(root, "manifest.json")["params"]["n_test_images"] == 7
    assert len(list((root / "images").glob("test_*.jpg"))) == 7  # old test images are gone


def test_interrupted_generation_is_redone(data_root, tmp_path, monkeypatch):
    root = tmp_path / "interrupted"
    encode = demo._encode_jpeg
    calls = []

    def encode_then_crash(image):
        calls.append(1)
        if len(calls) > 15:
            raise KeyboardInterrupt
        return encode(image)

    monkeypatch.setattr(demo, "_encode_jpeg", encode_then_crash)
    with pytest.raises(KeyboardInterrupt):
        _generate(root)
    assert not (root / "manifest.json").exists()
    monkeypatch.setattr(demo, "_encode_jpeg", encode)
    (root / ".staging-killed").mkdir()  # what a killed (not interrupted) run leaves behind
    _generate(root)
    assert _files(root) == _files(data_root)


def test_annotation_format(data_root):
    train = _load(data_root, "annotation/demo_train.json")
    assert len(train) == 5 * SMALL["n_train_images"]
    per_image: dict[str, list[str]] = {}
    for record in train:
        assert set(record) == {"image", "caption", "image_id"}
        assert isinstance(record["caption"], str)
        assert record["image"] == f"images/{record['image_id']}.jpg"
        per_image.setdefault(record["image"], []).append(record["caption"])
    assert len(per_image) == SMALL["n_train_images"]
    assert all(len(set(captions)) == 5 for captions in per_image.values())
    images = set(per_image)
    for split in ("val", "test"):
        records = _load(data_root, f"annotation/demo_{split}.json")
        assert len(records) == SMALL[f"n_{split}_images"]
        for record in records:
            assert set(record) == {"image", "caption"}
            assert re.fullmatch(rf"images/{split}_\d{{5}}\.jpg", record["image"])
            assert len(record["caption"]) == 5 and len(set(record["caption"])) == 5
        split_images = {r["image"] for r in records}
        assert not split_images & images
        images |= split_images
    for relative in sorted(images)[:: max(1, len(images) // 10)]:
        with Image.open(data_root / relative) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert image.size == (demo.DEFAULT_IMAGE_SIZE, demo.DEFAULT_IMAGE_SIZE)


def test_captions_survive_the_blip_cleaner(data_root):
    for captions in _captions_by_image(data_root).values():
        for caption in captions:
            assert pre_caption(caption) == caption


def test_every_image_has_a_distinct_attribute_combination(data_root):
    attributes = _load(data_root, demo.ATTRIBUTES_FILENAME)
    keys = [tuple(sorted((o["position"], o["shape"], o["colour"], o["size"]) for o in entry["objects"]))
            for split in SPLITS for entry in attributes[split]]
    assert len(keys) == sum(SMALL.values())
    assert len(set(keys)) == len(keys)


def test_captions_state_the_drawn_attributes(data_root):
    attributes = _load(data_root, demo.ATTRIBUTES_FILENAME)
    captions_by_image = _captions_by_image(data_root)
    checked_relations = 0
    for split in SPLITS:
        for entry in attributes[split]:
            objects = entry["objects"]
            pairs = {(o["colour"], o["shape"]) for o in objects}
            for caption in captions_by_image[entry["image"]]:
                named = set(_COLOUR_SHAPE.findall(caption))
                named |= {(c, s) for s, c in _SHAPE_COLORED.findall(caption)}
                assert named == pairs, (caption, objects)  # every object named, nothing invented
                for size, colour, shape in _SIZE_WORD.findall(caption):
                    assert any(o["size"] == size and o["shape"] == shape and colour in ("", o["colour"])
                               for o in objects), (caption, objects)
                for phrase, position in _PHRASE_TO_POSITION.items():
                    if phrase in caption:
                        assert position in {o["position"] for o in objects}, (caption, objects)
                relation = _RELATION.match(caption)
                if relation:
                    checked_relations += 1
                    c1, s1, rel, c2, s2 = relation.groups()
                    first = next(o for o in objects if (o["colour"], o["shape"]) == (c1, s1))
                    second = next(o for o in objects if (o["colour"], o["shape"]) == (c2, s2))
                    (x1, y1), (x2, y2) = first["center"], second["center"]
                    expected = {"above": y1 < y2 - 10, "below": y1 > y2 + 10,
                                "to the left of": x1 < x2 - 10, "to the right of": x1 > x2 + 10}
                    assert expected[rel], (caption, objects)
    assert checked_relations > 0


def test_pixels_show_the_captioned_colour_and_size(data_root):
    attributes = _load(data_root, demo.ATTRIBUTES_FILENAME)
    palette = {name: np.array(rgb, dtype=float) for name, rgb in demo.COLOURS.items()}
    for entry in attributes["val"]:
        pixels = np.asarray(Image.open(data_root / entry["image"]).convert("RGB"), dtype=float)
        background = np.median(pixels.reshape(-1, 3), axis=0)
        for obj in entry["objects"]:
            x, y = (int(round(v)) for v in obj["center"])
            centre_patch = pixels[y - 1:y + 2, x - 1:x + 2].reshape(-1, 3).mean(axis=0)
            candidates = {**palette, "background": background}
            nearest = min(candidates, key=lambda name: np.linalg.norm(candidates[name] - centre_patch))
            assert nearest == obj["colour"], (entry["image"], obj)
            # Size: count this colour's pixels in a window just around the object (other objects,
            # possibly of the same colour, sit in other quadrants, out of reach).
            reach = math.ceil(obj["radius"]) + 2
            window = pixels[max(0, y - reach):y + reach + 1, max(0, x - reach):x + reach + 1]
            area = (np.linalg.norm(window - palette[obj["colour"]], axis=-1) < 60).sum()
            radius = demo.SIZES[obj["size"]] * pixels.shape[0]  # from the size word, not the sidecar
            expected = _AREA_PER_R2[obj["shape"]] * radius ** 2
            assert 0.65 * expected < area < 1.35 * expected, (entry["image"], obj, area, expected)


def test_vocabulary_covers_every_caption(data_root):
    from transformers import BertTokenizer

    lines = (data_root / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert lines == demo.demo_vocabulary()
    assert lines[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert len(set(lines)) == len(lines)
    tokenizer = BertTokenizer(str(data_root / "vocab.txt"), do_lower_case=True)
    captions = [c for caps in _captions_by_image(data_root).values() for c in caps]
    encoded = tokenizer(captions)["input_ids"]
    assert all(tokenizer.unk_token_id not in ids for ids in encoded)
    assert max(len(ids) for ids in encoded) <= 35  # BLIP's retrieval text length
    # Every vocabulary word is a whole word of some caption template (no stray entries).
    words_used = {w for c in captions for w in re.findall(r"[a-z]+|,", c)}
    assert words_used <= set(lines)


def test_demo_configs_agree_with_the_generated_data():
    from ruamel.yaml import YAML

    med = json.loads((REPO_ROOT / "configs" / "demo_med_config.json").read_text(encoding="utf-8"))
    config = YAML(typ="safe").load((REPO_ROOT / "configs" / "retrieval_demo.yaml").read_text(encoding="utf-8"))
    vocabulary = demo.demo_vocabulary()
    assert med["vocab_size"] == len(vocabulary) + 2  # + BLIP's [DEC] and [ENC]
    assert med["encoder_width"] == config["vit"]["embed_dim"]
    assert med["add_cross_attention"] is True
    assert med["max_position_embeddings"] >= 35
    assert med["hidden_size"] % med["num_attention_heads"] == 0
    assert config["vit"]["embed_dim"] % config["vit"]["num_heads"] == 0
    assert config["image_size"] == demo.DEFAULT_IMAGE_SIZE
    assert config["image_size"] % config["vit"]["patch_size"] == 0
    assert config["queue_size"] % config["batch_size_train"] == 0
    assert config["dataset"] == "demo" and config["pretrained"] == ""
    assert config["med_config"] == "configs/demo_med_config.json"
    layout = demo._output_paths(Path(config["image_root"]))
    assert Path(config["ann_root"]) == Path(layout["ann_root"])
    assert Path(config["tokenizer"]) == Path(layout["vocab_file"])


def test_tokenizer_with_blip_tokens_matches_med_vocab_size(data_root):
    from transformers import BertTokenizer

    med = json.loads((REPO_ROOT / "configs" / "demo_med_config.json").read_text(encoding="utf-8"))
    tokenizer = BertTokenizer(str(data_root / "vocab.txt"), do_lower_case=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    assert len(tokenizer) == med["vocab_size"]
    assert max(tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"])) == med["vocab_size"] - 1


def test_bad_arguments_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="n_train_images"):
        demo.ensure_demo_data(str(tmp_path / "x"), n_train_images=0)
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    with pytest.raises(NotADirectoryError, match="image_root"):
        demo.ensure_demo_data(str(not_a_folder))


def test_cli_prints_counts(data_root, capsys):
    demo.main(["--root", str(data_root), "--n-train-images", "40", "--n-val-images", "10",
               "--n-test-images", "10"])
    out = capsys.readouterr().out
    assert "train_captions: 200" in out and "test_images: 10" in out
    assert f"vocab_file: {data_root / 'vocab.txt'}" in out
