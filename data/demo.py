"""A tiny synthetic image-caption dataset for the CPU demo of the retrieval pipeline.

Each image shows one or two coloured shapes on a dark, lightly noisy background; each
image gets five captions built from templates, all true of the image (shape, colour,
size, position, relative position). Everything is written in the BLIP annotation format
together with a small WordPiece vocabulary, so the demo needs no download.

Layout under ``root``::

    images/{split}_00001.jpg     RGB JPEG images
    annotation/demo_{split}.json BLIP-format annotations (train: one record per caption)
    vocab.txt                    WordPiece vocabulary for ``BertTokenizer``
    attributes.json              the drawn objects of every image (for checks and tests)
    manifest.json                generation parameters; written last, marks the data complete

The vocabulary is fixed by the templates (it does not depend on the seed), so a model
config can state ``vocab_size`` once: ``len(vocab) + 2`` for BLIP's ``[DEC]`` and ``[ENC]``.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image, ImageDraw

from atomic import atomic_write_text

_logger = logging.getLogger(__name__)

# Bump whenever the generated content changes, so stale caches are regenerated.
DEMO_DATA_VERSION = 1

SPLITS = ("train", "val", "test")
CAPTIONS_PER_IMAGE = 5
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

MANIFEST_FILENAME = "manifest.json"
ATTRIBUTES_FILENAME = "attributes.json"
VOCAB_FILENAME = "vocab.txt"
IMAGE_DIRNAME = "images"
ANNOTATION_DIRNAME = "annotation"
_LOCK_FILENAME = ".demo.lock"
_STAGING_PREFIX = ".staging-"

SHAPES = ("circle", "square", "triangle", "star", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (40, 70, 230),
    "yellow": (240, 225, 30),
    "purple": (150, 50, 200),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
}
# Half-extent of a shape as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.11, "large": 0.18}
# Object centres as fractions of the image side (x, y); y grows downwards.
QUADRANTS: dict[str, tuple[float, float]] = {
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
}
POSITIONS: dict[str, tuple[float, float]] = {**QUADRANTS, "center": (0.5, 0.5)}
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "top left": ("in the top left corner", "at the top left", "in the upper left"),
    "top right": ("in the top right corner", "at the top right", "in the upper right"),
    "bottom left": ("in the bottom left corner", "at the bottom left", "in the lower left"),
    "bottom right": ("in the bottom right corner", "at the bottom right", "in the lower right"),
    "center": ("in the center", "in the middle"),
}
_ABOVE, _BELOW, _LEFT_OF, _RIGHT_OF = "above", "below", "to the left of", "to the right of"

# Fields: a_cs = "a red circle", a_zcs = "a small red circle", pos = a position phrase,
# z / c / s = size / colour / shape words; suffixes 1 and 2 name the two objects.
SINGLE_TEMPLATES = (
    "{a_cs} {pos}",
    "there is {a_zcs} {pos}",
    "{a_zcs} on a dark background",
    "{pos}, {a_cs}",
    "one {z} {s} colored {c} {pos}",
    "a picture of {a_cs} {pos}",
    "an image showing {a_zcs}",
    "a single {z} {c} {s}",
)
PAIR_TEMPLATES = (
    "{a_cs1} and {a_cs2}",
    "{a_zcs1} {pos1} and {a_zcs2} {pos2}",
    "two shapes, {a_cs1} {pos1} and {a_cs2} {pos2}",
    "there is {a_cs1} {pos1} and {a_cs2}",
    "{a_cs1} {rel} {a_cs2}",
    "{a_zcs1} next to {a_zcs2}",
    "a picture of {a_cs1} and {a_cs2} on a dark background",
    "{a_cs2} {pos2}, {a_cs1} {pos1}",
)

# Defaults sized so that the demo fine-tune fits in a few CPU minutes.
DEFAULT_N_TRAIN_IMAGES = 600
DEFAULT_N_VAL_IMAGES = 100
DEFAULT_N_TEST_IMAGES = 100
DEFAULT_IMAGE_SIZE = 64

_SINGLE_FRACTION = 0.25  # share of one-object images (their attribute space is small)
_MAX_SINGLE_TRIES = 20  # after this many duplicate draws, fall back to two objects
_POSITION_JITTER = 0.03  # fraction of the image side
_SUPERSAMPLE = 4  # shapes are drawn larger and downsampled for smooth edges
_BACKGROUND_GREY = (35, 70)  # range of the background grey level
_NOISE_STD = 3.0
_JPEG_QUALITY = 95


@dataclass(frozen=True)
class DemoObject:
    """One drawn shape; ``center`` and ``radius`` are in pixels of the final image."""

    shape: str
    colour: str
    size: str
    position: str
    center: tuple[float, float]
    radius: float


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _with_article(*words: str) -> str:
    return f"{_article(words[0])} {' '.join(words)}"


def _template_words(text: str) -> list[str]:
    """Words and commas of ``text`` with ``{field}`` placeholders removed."""
    return re.findall(r"[a-z]+|,", re.sub(r"\{[a-z_0-9]+\}", " ", text))


def vocabulary_words() -> list[str]:
    """Every word and punctuation token a demo caption can contain, sorted (seed-independent)."""
    texts = [*SINGLE_TEMPLATES, *PAIR_TEMPLATES, *SHAPES, *COLOURS, *SIZES,
             _ABOVE, _BELOW, _LEFT_OF, _RIGHT_OF, "a an"]
    texts += [phrase for phrases in POSITION_PHRASES.values() for phrase in phrases]
    return sorted({word for text in texts for word in _template_words(text)})


def demo_vocabulary() -> list[str]:
    """Lines of ``vocab.txt``: BERT's special tokens, then :func:`vocabulary_words`."""
    return [*SPECIAL_TOKENS, *vocabulary_words()]


def _sample_objects(rng: np.random.Generator, image_size: int, single: bool) -> list[DemoObject]:
    """Draw one object (any position) or two objects (distinct quadrants, distinct colour+shape)."""
    if single:
        positions = [list(POSITIONS)[rng.integers(len(POSITIONS))]]
    else:
        picked = rng.choice(len(QUADRANTS), size=2, replace=False)
        positions = [list(QUADRANTS)[i] for i in picked]
    objects: list[DemoObject] = []
    for position in positions:
        while True:
            shape = SHAPES[rng.integers(len(SHAPES))]
            colour = list(COLOURS)[rng.integers(len(COLOURS))]
            if all((shape, colour) != (o.shape, o.colour) for o in objects):
                break
        size = list(SIZES)[rng.integers(len(SIZES))]
        fx, fy = POSITIONS[position]
        jitter = rng.uniform(-_POSITION_JITTER, _POSITION_JITTER, size=2)
        center = (float((fx + jitter[0]) * image_size), float((fy + jitter[1]) * image_size))
        objects.append(DemoObject(shape, colour, size, position, center, SIZES[size] * image_size))
    return objects


def _scene_key(objects: list[DemoObject]) -> tuple:
    return tuple(sorted((o.position, o.shape, o.colour, o.size) for o in objects))


def _sample_scene(rng: np.random.Generator, image_size: int, used: set[tuple]) -> list[DemoObject]:
    """Draw a scene whose attribute combination no earlier image (of any split) has."""
    single = rng.random() < _SINGLE_FRACTION
    tries = 0
    while True:
        objects = _sample_objects(rng, image_size, single and tries < _MAX_SINGLE_TRIES)
        key = _scene_key(objects)
        if key not in used:
            used.add(key)
            return objects
        tries += 1


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon vertices of a non-circle shape centred on (cx, cy) with half-extent r."""
    if shape == "square":
        h = 0.85 * r  # a slightly smaller square has about the area of the circle
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + 0.95 * r, cy + 0.75 * r), (cx - 0.95 * r, cy + 0.75 * r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.8 * r, cy), (cx, cy + r), (cx - 0.8 * r, cy)]
    if shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else 0.45 * r
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    raise ValueError(f"unknown demo shape {shape!r}; expected one of {SHAPES}")


def draw_scene(objects: list[DemoObject], image_size: int, rng: np.random.Generator) -> Image.Image:
    """Render ``objects`` on a dark grey, lightly noisy background as an RGB image."""
    grey = int(rng.integers(*_BACKGROUND_GREY))
    big = image_size * _SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), (grey, grey, grey))
    draw = ImageDraw.Draw(canvas)
    for obj in objects:
        cx, cy, r = (v * _SUPERSAMPLE for v in (*obj.center, obj.radius))
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon(_shape_points(obj.shape, cx, cy, r), fill=fill)
    image = canvas.resize((image_size, image_size), Image.Resampling.BOX)
    pixels = np.asarray(image, dtype=np.float32)
    pixels = pixels + rng.normal(0.0, _NOISE_STD, size=pixels.shape)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


def _relation(first: DemoObject, second: DemoObject, rng: np.random.Generator) -> str:
    """A true spatial relation of ``first`` to ``second`` (both in distinct quadrants)."""
    options = []
    (x1, y1), (x2, y2) = QUADRANTS[first.position], QUADRANTS[second.position]
    if y1 != y2:
        options.append(_ABOVE if y1 < y2 else _BELOW)
    if x1 != x2:
        options.append(_LEFT_OF if x1 < x2 else _RIGHT_OF)
    return options[rng.integers(len(options))]


def _object_fields(obj: DemoObject, rng: np.random.Generator, suffix: str = "") -> dict[str, str]:
    phrases = POSITION_PHRASES[obj.position]
    return {
        f"a_cs{suffix}": _with_article(obj.colour, obj.shape),
        f"a_zcs{suffix}": _with_article(obj.size, obj.colour, obj.shape),
        f"pos{suffix}": phrases[rng.integers(len(phrases))],
        f"z{suffix}": obj.size,
        f"c{suffix}": obj.colour,
        f"s{suffix}": obj.shape,
    }


def make_captions(objects: list[DemoObject], rng: np.random.Generator) -> list[str]:
    """Five distinct captions, each true of ``objects``, from five distinct templates."""
    templates = SINGLE_TEMPLATES if len(objects) == 1 else PAIR_TEMPLATES
    chosen = rng.choice(len(templates), size=CAPTIONS_PER_IMAGE, replace=False)
    captions = []
    for index in chosen:
        if len(objects) == 1:
            fields = _object_fields(objects[0], rng)
        else:
            order = rng.permutation(2)  # which object the caption names first
            first, second = objects[order[0]], objects[order[1]]
            fields = {**_object_fields(first, rng, "1"), **_object_fields(second, rng, "2"),
                      "rel": _relation(first, second, rng)}
        captions.append(templates[index].format(**fields))
    if len(set(captions)) != len(captions):  # distinct templates cannot collide; guard edits
        raise AssertionError(f"duplicate demo captions {captions}")
    return captions


def _encode_jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    # 4:4:4 chroma keeps the colours of small shapes exact.
    image.save(buffer, format="JPEG", quality=_JPEG_QUALITY, subsampling=0)
    return buffer.getvalue()


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def _write_json_atomic(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def _generate_into(folder: Path, params: dict[str, int]) -> dict[str, int]:
    """Write images, annotations, vocabulary and attributes for ``params`` into ``folder``."""
    rng = np.random.default_rng(params["seed"])
    image_size = params["image_size"]
    (folder / IMAGE_DIRNAME).mkdir()
    (folder / ANNOTATION_DIRNAME).mkdir()
    used: set[tuple] = set()
    attributes: dict[str, list[dict[str, Any]]] = {}
    counts: dict[str, int] = {}
    for split in SPLITS:
        records: list[dict[str, Any]] = []
        split_attributes = []
        for number in range(1, params[f"n_{split}_images"] + 1):
            image_id = f"{split}_{number:05d}"
            relative_path = f"{IMAGE_DIRNAME}/{image_id}.jpg"
            objects = _sample_scene(rng, image_size, used)
            image = draw_scene(objects, image_size, rng)
            (folder / relative_path).write_bytes(_encode_jpeg(image))
            captions = make_captions(objects, rng)
            if split == "train":
                records += [{"image": relative_path, "caption": c, "image_id": image_id} for c in captions]
            else:
                records.append({"image": relative_path, "caption": captions})
            split_attributes.append({"image": relative_path, "objects": [asdict(o) for o in objects]})
        _write_json(folder / ANNOTATION_DIRNAME / f"demo_{split}.json", records)
        attributes[split] = split_attributes
        counts[f"{split}_images"] = len(split_attributes)
        counts[f"{split}_captions"] = len(split_attributes) * CAPTIONS_PER_IMAGE
    _write_json(folder / ATTRIBUTES_FILENAME, attributes)
    (folder / VOCAB_FILENAME).write_text("\n".join(demo_vocabulary()) + "\n", encoding="utf-8")
    return counts


def _read_manifest(root: Path) -> dict[str, Any] | None:
    try:
        return json.loads((root / MANIFEST_FILENAME).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def _is_complete(root: Path, params: dict[str, int]) -> bool:
    manifest = _read_manifest(root)
    return (manifest is not None and manifest.get("version") == DEMO_DATA_VERSION
            and manifest.get("params") == params)


@contextlib.contextmanager
def _generation_lock(root: Path) -> Iterator[None]:
    """Serialise generation between processes sharing ``root`` (e.g. several ranks); no-op off POSIX."""
    try:
        import fcntl
    except ImportError:  # Windows: single-process use only
        yield
        return
    with open(root / _LOCK_FILENAME, "a+") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _output_paths(root: Path) -> dict[str, str]:
    return {
        "image_root": str(root),
        "ann_root": str(root / ANNOTATION_DIRNAME),
        "vocab_file": str(root / VOCAB_FILENAME),
    }


def ensure_demo_data(root: str, seed: int = 0, n_train_images: int = DEFAULT_N_TRAIN_IMAGES,
                     n_val_images: int = DEFAULT_N_VAL_IMAGES, n_test_images: int = DEFAULT_N_TEST_IMAGES,
                     image_size: int = DEFAULT_IMAGE_SIZE) -> dict[str, str]:
    """Generate the synthetic demo dataset under ``root`` unless an identical one is already there.

    Generation happens in a staging folder inside ``root``; the results are moved into place
    and ``manifest.json`` is written last, so an interrupted run leaves no manifest and is
    redone by the next call. Output is a deterministic function of the arguments.

    Args:
        root: output folder (created if needed), e.g. ``.cache/blip_demo``.
        seed: seed of the numpy Generator that draws scenes, noise and captions.
        n_train_images / n_val_images / n_test_images: images per split (5 captions each).
        image_size: side of the square images in pixels.

    Returns:
        ``{"image_root": root, "ann_root": root/annotation, "vocab_file": root/vocab.txt}``.
    """
    params = {"seed": int(seed), "n_train_images": int(n_train_images), "n_val_images": int(n_val_images),
              "n_test_images": int(n_test_images), "image_size": int(image_size)}
    for key, value in params.items():
        if key != "seed" and value < (16 if key == "image_size" else 1):
            raise ValueError(f"ensure_demo_data: {key}={value} is too small; use a positive count "
                             "(image_size >= 16)")
    root_path = Path(root)
    if root_path.exists() and not root_path.is_dir():
        raise NotADirectoryError(f"demo data root {root!r} is a file; point `image_root` to a folder")
    if _is_complete(root_path, params):
        return _output_paths(root_path)
    root_path.mkdir(parents=True, exist_ok=True)
    with _generation_lock(root_path):
        if _is_complete(root_path, params):  # another process finished while we waited
            return _output_paths(root_path)
        _logger.info("generating the synthetic demo dataset in %s (%s)", root_path, params)
        _remove(root_path / MANIFEST_FILENAME)
        for stale in root_path.glob(f"{_STAGING_PREFIX}*"):  # left by a killed run
            _remove(stale)
        staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=root_path))
        try:
            counts = _generate_into(staging, params)
            for name in (IMAGE_DIRNAME, ANNOTATION_DIRNAME, ATTRIBUTES_FILENAME, VOCAB_FILENAME):
                _remove(root_path / name)
                os.replace(staging / name, root_path / name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        _write_json_atomic(root_path / MANIFEST_FILENAME,
                           {"version": DEMO_DATA_VERSION, "params": params, "counts": counts})
        _logger.info("demo dataset ready: %s", counts)
    return _output_paths(root_path)


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m data.demo --root .cache/blip_demo`` generates the data and prints counts."""
    parser = argparse.ArgumentParser(description="Generate the synthetic BLIP retrieval demo dataset.")
    parser.add_argument("--root", default=".cache/blip_demo", help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train-images", type=int, default=DEFAULT_N_TRAIN_IMAGES)
    parser.add_argument("--n-val-images", type=int, default=DEFAULT_N_VAL_IMAGES)
    parser.add_argument("--n-test-images", type=int, default=DEFAULT_N_TEST_IMAGES)
    parser.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    paths = ensure_demo_data(args.root, seed=args.seed, n_train_images=args.n_train_images,
                             n_val_images=args.n_val_images, n_test_images=args.n_test_images,
                             image_size=args.image_size)
    manifest = _read_manifest(Path(args.root)) or {}
    for key, value in paths.items():
        print(f"{key}: {value}")
    for key, value in manifest.get("counts", {}).items():
        print(f"{key}: {value}")
    print(f"vocabulary: {len(demo_vocabulary())} entries (tokenizer length {len(demo_vocabulary()) + 2})")


if __name__ == "__main__":
    main()
