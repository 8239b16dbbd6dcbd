"""Your own image-caption pairs as a BLIP retrieval dataset: checked, split and configured in one command.

    python -m data.prepare_pairs SOURCE --image-root DIR --ann-root DIR --name NAME
        [--image-column image] [--caption-column caption] [--split-column split]
        [--val N] [--test N] [--seed 0] [--write-config PATH] [--base-config PATH] [--skip-bad-rows]

SOURCE is a ``.csv`` / ``.tsv`` with a header, a ``.jsonl`` with one object per line, or a ``.json`` holding
either a list of such objects or COCO captions (``images`` + ``annotations``). One row per caption (an image may
be on many rows), or a JSON list of captions in one row. Image paths are relative to ``--image-root`` (absolute
paths under it are accepted).

Writes ``ANN_ROOT/NAME_{train,val,test}.json`` in BLIP's format (what ``dataset: NAME`` reads, see
data/annotations.py) and ``ANN_ROOT/NAME_summary.json``; with ``--write-config``, a config for
``train_retrieval.py``. Every image is opened and every row checked first: on bad input the command lists the
problems by source line and exits with code 2, having written nothing.

Over 500 lines on purpose: one command, its checks in the order they run, each naming a source line; reading the
source formats is data/pairs_source.py, the image check data/image_folder.py, config text editing config.py.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

import utils
from atomic import atomic_write_text
from config import REPO_ROOT, ConfigError, load_config, set_config_lines, yaml_quote
from data.annotations import DataError, annotation_file
from data.captions import pre_caption
from data.image_folder import decode_problem
from data.pairs_source import BadInput, Source, read_source
from data.retrieval_dataset import image_file_problem
from evaluation import chance_recall

_logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
DEFAULT_BASE_CONFIG = "configs/retrieval_flickr.yaml"
TINY_CONFIG = "configs/retrieval_tiny.yaml"
MAX_LISTED_PROBLEMS = 20
DEFAULT_SPLIT_IMAGES = 1000  # val and test images each, or DEFAULT_SPLIT_SHARE of the images when that is fewer
DEFAULT_SPLIT_SHARE = 0.05
QUEUE_PROCESSES = 8  # the written queue_size suits 1, 2, 4 and 8 processes (README: 8 GPUs x 32 = 256)
SMALL_EVAL_IMAGES = 100  # fewer val or test images than this: R@1 is mostly noise (a warning says how much)
UNK_SAMPLE = 2000  # captions tokenized to measure the [UNK] rate
UNK_WARN_SHARE = 0.01  # of the tokens
RESERVED_NAMES = ("flickr", "coco", "demo")  # datasets with files of their own, or generated
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_NO_CUT = sys.maxsize  # pre_caption's max_words when only cleaning


@dataclass
class Pair:
    """One usable caption of one image."""

    index: int
    where: str
    ref: str
    image: str  # relative to image_root, '/'-separated
    written: str  # the image path as the source writes it, for messages
    caption: str  # stripped, as the user wrote it (the datasets clean captions when they load them)
    split: str | None


@dataclass
class Problem:
    index: int
    where: str
    message: str
    kind: str  # what --skip-bad-rows counts; "" for problems that it cannot skip
    captions: int = 1  # captions the problem takes out of the dataset


# --------------------------------------------------------------------------- rows to pairs
def relative_image_path(value: str, image_root: str) -> str | None:
    """``value`` as a '/'-separated path relative to ``image_root``, or None when it lies outside it."""
    root = os.path.abspath(image_root)
    path = os.path.normpath(value if os.path.isabs(value) else os.path.join(root, value))
    for base, target in ((root, path), (os.path.realpath(root), os.path.realpath(path))):
        if target != base and os.path.commonpath([base, target]) == base:
            return os.path.relpath(target, base).replace(os.sep, "/")
    return None


def _captions_of(value: Any, column: str) -> list[str] | str:
    """The captions of a row, or why it has none."""
    if isinstance(value, str):
        return [value]
    if value is None:
        return f"no caption in {column!r}"
    if isinstance(value, list):
        if not value:
            return "empty caption list"
        if all(isinstance(item, str) for item in value):
            return value
        return "the caption list holds an entry that is not text"
    return f"the caption is not text or a list of texts (a JSON {type(value).__name__})"


def rows_to_pairs(source: Source, image_root: str, columns: dict[str, str], split_in_use: bool
                  ) -> tuple[list[Pair], list[Problem]]:
    """Usable pairs, and the problems of rows (their image files are checked later)."""
    pairs: list[Pair] = []
    problems: list[Problem] = []
    for row in source.rows:
        if row.problem:
            problems.append(Problem(row.index, row.where, row.problem, "unreadable row"))
            continue
        if not isinstance(row.image, str) or not row.image.strip():
            problems.append(Problem(row.index, row.where, f"no image path in {columns['image']!r}", "missing image"))
            continue
        image = row.image.strip()
        relative = relative_image_path(image, image_root)
        if relative is None:
            problems.append(Problem(row.index, row.where, f"image {image} is not under --image-root {image_root}",
                                    "missing image"))
            continue
        split = None
        if split_in_use:
            split = row.split.strip().lower() if isinstance(row.split, str) else row.split
            if split not in SPLITS:
                shown = "empty" if split in (None, "") else repr(row.split)
                problems.append(Problem(row.index, row.where, f"split {shown} in {columns['split']!r}: each row "
                                        "needs train, val or test", ""))
                continue
        captions = _captions_of(row.caption, columns["caption"])
        if isinstance(captions, str):
            problems.append(Problem(row.index, row.where, captions, "empty caption"))
            continue
        for caption in captions:
            text = caption.strip()
            if not pre_caption(text, _NO_CUT):
                what = "empty caption" if not text else f"caption {text!r} is empty once punctuation is removed"
                problems.append(Problem(row.index, row.where, what, "empty caption"))
                continue
            pairs.append(Pair(row.index, row.where, row.ref, relative, image, text, split))
    return pairs, problems


# --------------------------------------------------------------------------- images
@dataclass(frozen=True)
class ImageInfo:
    problem: str | None
    size: tuple[int, int] | None  # (width, height)


def inspect_image(path: str) -> ImageInfo:
    """Found, an image, and decodable all through (the project's checks, data/retrieval_dataset.py and
    data/prepare_flickr30k.py), with its size."""
    if not os.path.isfile(path):
        return ImageInfo("not found", None)
    problem = image_file_problem(path)  # empty, unreadable, not an image format: in clear words
    if problem is not None:
        return ImageInfo(f"is not an image: {problem}", None)
    try:
        with Image.open(path) as image:
            size = image.size
    except Exception as exc:  # PIL raises many types for bad headers
        return ImageInfo(f"cannot be decoded ({type(exc).__name__}: {exc})", None)
    why = decode_problem(Path(path))  # reads every byte
    return ImageInfo(None if why is None else f"cannot be decoded: {why}", size)


def inspect_images(image_root: str, relatives: list[str]) -> dict[str, ImageInfo]:
    """Open every image once, from a few threads (PIL decodes without the GIL), with a progress bar."""
    paths = [os.path.join(image_root, relative) for relative in relatives]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        infos = list(tqdm(pool.map(inspect_image, paths), total=len(paths), desc="opening images", unit="img",
                          mininterval=1.0, disable=len(paths) < 500))
    return dict(zip(relatives, infos))


def image_problems(pairs: list[Pair], infos: dict[str, ImageInfo], image_root: str
                   ) -> tuple[list[Pair], list[Problem]]:
    """The pairs whose image is fine; one problem per source row whose image is not."""
    kept: list[Pair] = []
    problems: dict[int, Problem] = {}
    for pair in pairs:
        info = infos[pair.image]
        if info.problem is None:
            kept.append(pair)
        elif pair.index in problems:  # a row with a list of captions: one problem for the row
            problems[pair.index].captions += 1
        elif info.problem == "not found":
            problems[pair.index] = Problem(pair.index, pair.where, f"image {pair.written} not found under "
                                           f"--image-root {image_root}", "missing image")
        else:
            problems[pair.index] = Problem(pair.index, pair.where, f"image {pair.written} {info.problem}",
                                           "unreadable image")
    return kept, list(problems.values())


def duplicate_problems(pairs: list[Pair]) -> tuple[list[Pair], list[Problem]]:
    """The first of each (image, caption) kept; captions compare as the model reads them (cleaned)."""
    first: dict[tuple[str, str], Pair] = {}
    kept, problems = [], []
    for pair in pairs:
        seen = first.setdefault((pair.image, pre_caption(pair.caption, _NO_CUT)), pair)
        if seen is pair:
            kept.append(pair)
        else:
            problems.append(Problem(pair.index, pair.where, f"duplicate of {seen.ref}: image {pair.image}, caption "
                                    f"{pair.caption!r}", "duplicate"))
    return kept, problems


def split_conflicts(pairs: list[Pair]) -> list[Problem]:
    """An image in two splits would leak from training into evaluation."""
    first: dict[str, Pair] = {}
    problems = []
    for pair in pairs:
        seen = first.setdefault(pair.image, pair)
        if seen.split != pair.split:
            problems.append(Problem(pair.index, pair.where, f"image {pair.image} is in split {pair.split!r} here "
                                    f"but in {seen.split!r} on {seen.ref}: an image belongs to one split", ""))
    return problems


def listed(problems: list[Problem]) -> str:
    lines = [f"  {p.where}: {p.message}" for p in problems[:MAX_LISTED_PROBLEMS]]
    if len(problems) > MAX_LISTED_PROBLEMS:
        lines.append(f"  ... and {len(problems) - MAX_LISTED_PROBLEMS} more")
    return "\n".join(lines)


def dropped_counts(problems: list[Problem]) -> dict:
    kinds: dict[str, int] = {}
    for problem in problems:
        kinds[problem.kind] = kinds.get(problem.kind, 0) + 1
    return {"rows": len({p.index for p in problems}), "captions": sum(p.captions for p in problems),
            "by_problem": kinds}


# --------------------------------------------------------------------------- splits and records
def default_split_size(n_images: int) -> int:
    """1,000 images, or 5% of them for a small set (at least 1)."""
    return min(DEFAULT_SPLIT_IMAGES, max(1, int(n_images * DEFAULT_SPLIT_SHARE)))


def random_split(images: list[str], n_val: int, n_test: int, seed: int) -> dict[str, str]:
    """image -> split, by image (never by caption); depends only on the set of images and the seed."""
    order = sorted(images)
    shuffled = [order[i] for i in np.random.default_rng(seed).permutation(len(order))]
    split = {image: "test" for image in shuffled[:n_test]}
    split.update({image: "val" for image in shuffled[n_test:n_test + n_val]})
    split.update({image: "train" for image in shuffled[n_test + n_val:]})
    return split


def build_records(pairs: list[Pair], split_of: dict[str, str]) -> dict[str, list[dict]]:
    """BLIP's records: train one per caption with a numeric image_id, val/test one per image with its captions.

    Images are numbered and listed in the order they first appear in the source.
    """
    captions: dict[str, list[str]] = {}
    for pair in pairs:
        captions.setdefault(pair.image, []).append(pair.caption)
    records: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for image_id, (image, texts) in enumerate(captions.items()):
        if split_of[image] == "train":
            records["train"] += [{"image": image, "caption": text, "image_id": image_id} for text in texts]
        else:
            records[split_of[image]].append({"image": image, "caption": texts})
    return records


def split_stats(records: list[dict], split: str) -> dict:
    """Images, captions, captions per image and the chance R@1 of a random ranking (in %)."""
    if not records:
        return {"images": 0, "captions": 0}
    if split == "train":
        per_image: dict[int, int] = {}
        for record in records:
            per_image[record["image_id"]] = per_image.get(record["image_id"], 0) + 1
        counts = list(per_image.values())
    else:
        counts = [len(record["caption"]) for record in records]
    txt2img = dict(enumerate(np.repeat(np.arange(len(counts)), counts).tolist()))
    img2txt: dict[int, list[int]] = {}
    for text, image in txt2img.items():
        img2txt.setdefault(image, []).append(text)
    chance = chance_recall(txt2img, img2txt)
    return {"images": len(counts), "captions": int(sum(counts)),
            "captions_per_image": {"min": min(counts), "mean": round(sum(counts) / len(counts), 2),
                                   "max": max(counts)},
            "chance_r1": {"txt_r1": round(chance["txt_r1"], 4), "img_r1": round(chance["img_r1"], 4)}}


# --------------------------------------------------------------------------- warnings
def unk_rate(captions: list[str], tokenizer_name: str, max_words: int, seed: int) -> tuple[float, int] | str:
    """([UNK] share of the tokens, captions measured) under the config's tokenizer, or why it was not measured."""
    from models.tokenizer import TokenizerError, init_tokenizer
    if not os.path.exists(tokenizer_name) and tokenizer_name.endswith(".txt"):  # a missing file, not a Hub id
        return f"the tokenizer file {tokenizer_name} does not exist"
    try:
        tokenizer = init_tokenizer(tokenizer_name)
    except TokenizerError as error:
        return str(error)
    if len(captions) > UNK_SAMPLE:
        picked = np.random.default_rng(seed).choice(len(captions), UNK_SAMPLE, replace=False)
        captions = [captions[i] for i in sorted(picked)]
    tokens = [token for caption in captions for token in tokenizer.tokenize(pre_caption(caption, max_words))]
    return tokens.count(tokenizer.unk_token) / max(1, len(tokens)), len(captions)


def data_warnings(pairs: list[Pair], infos: dict[str, ImageInfo], config: dict, seed: int) -> list[str]:
    """What may hurt results without stopping the command: cut captions, [UNK] tokens, small images."""
    warnings = []
    max_words, image_size = config["max_words"], config["image_size"]
    lengths = [len(pre_caption(pair.caption, _NO_CUT).split()) for pair in pairs]
    long = sum(length > max_words for length in lengths)
    if long:
        warnings.append(f"{long} of {len(lengths)} captions ({100 * long / len(lengths):.1f}%) are longer than "
                        f"max_words={max_words} words and will be cut to it (the longest has {max(lengths)})")
    with open(config["med_config"], encoding="utf-8") as handle:
        vocab_size = json.load(handle).get("vocab_size", 0)
    if vocab_size < 1000:  # the demo's 55 words
        warnings.append(f"the base config's text encoder has a vocabulary of {vocab_size} tokens "
                        f"({os.path.basename(config['med_config'])}), made for the demo's captions, not yours: use "
                        f"{TINY_CONFIG} (a small model with bert-base-uncased's vocabulary) for a CPU trial")
    rate = unk_rate([pair.caption for pair in pairs], config["tokenizer"], max_words, seed)
    if isinstance(rate, str):
        warnings.append(f"the [UNK] rate was not measured: {rate}")
    elif rate[0] >= UNK_WARN_SHARE:
        demo = config["tokenizer"] != "bert-base-uncased"
        warnings.append(f"{100 * rate[0]:.1f}% of the tokens of {rate[1]} captions are [UNK] under tokenizer "
                        f"{config['tokenizer']!r}: the model cannot read those words. "
                        + (f"Use {TINY_CONFIG} (a small model with bert-base-uncased's vocabulary) or a BLIP "
                           "checkpoint's config (the demo's vocabulary knows only the demo's 55 words)" if demo else
                           "bert-base-uncased is an English vocabulary: other scripts and emoji become [UNK]"))
    sizes = {image: info.size for image, info in infos.items() if info.size is not None}
    small = {image: size for image, size in sizes.items() if min(size) < image_size}
    if small:
        smallest = min(small, key=lambda image: min(small[image]))
        width, height = small[smallest]
        warnings.append(f"{len(small)} of {len(sizes)} images ({100 * len(small) / len(sizes):.1f}%) are smaller than "
                        f"image_size={image_size} px on their short side (the smallest: {smallest}, {width}x{height}): "
                        "they are upscaled, which blurs them")
    return warnings


# --------------------------------------------------------------------------- config and commands
def fitted_queue_size(queue_size: int, batch_size: int, n_train_captions: int) -> int:
    """The base queue, at most the training captions (a longer queue holds stale copies of them), rounded down to
    a multiple of batch_size x 8 (1, 2, 4 or 8 processes), or of batch_size for a small set."""
    cap = min(queue_size, n_train_captions)
    step = batch_size * QUEUE_PROCESSES
    if cap >= step:
        return cap // step * step
    return max(batch_size, cap // batch_size * batch_size)


def from_repo_root(path: str) -> str:
    """``path`` as the commands, run from the repository root, name it."""
    absolute = os.path.abspath(path)
    inside = absolute.startswith(str(REPO_ROOT) + os.sep)
    return os.path.relpath(absolute, REPO_ROOT) if inside else absolute


def _option(key: str, value: Any) -> str:
    text = str(value)
    if not re.fullmatch(r"[\w./@:+-]*", text) or not text:
        text = yaml_quote(text)  # the override's value is read as YAML
    return shlex.quote(f"{key}={text}")


def run_commands(config_path: str, overrides: dict[str, Any], name: str, config: dict) -> dict[str, str | None]:
    """The fine-tune and evaluate commands, from the repository root. A custom small ViT (retrieval_tiny) is a
    CPU trial; BLIP's ViT-B/L run on a GPU (--nproc_per_node=N for N GPUs)."""
    cpu = isinstance(config["vit"], dict)
    launch = "python train_retrieval.py" if cpu else "torchrun --nproc_per_node=1 train_retrieval.py"
    device = " --device cpu" if cpu else ""
    run_dir = f"output/{name}"

    def command(output_dir: str, evaluate: bool, extra: dict[str, Any]) -> str:
        options = {**overrides, **extra}
        return (f"{launch} --config {shlex.quote(config_path)}{device}{' --evaluate' if evaluate else ''} "
                f"--output_dir {shlex.quote(output_dir)}"
                + (" --options " + " ".join(_option(k, v) for k, v in options.items()) if options else ""))

    return {
        "fine_tune": command(run_dir, False, {}),
        "evaluate_fine_tuned": command(f"{run_dir}_eval", True, {"pretrained": f"{run_dir}/checkpoint_best.pth"}),
        # zero-shot: the config's own checkpoint (none for a model trained from scratch)
        "evaluate_zero_shot": command(f"{run_dir}_zero_shot", True, {}) if config["pretrained"] else None,
    }


def config_text(base_path: str, values: dict[str, Any], argv: list[str], queue_note: str) -> str:
    text = Path(base_path).read_text(encoding="utf-8")
    header = (f"# Written by: python -m data.prepare_pairs {' '.join(shlex.quote(a) for a in argv)}\n"
              f"# From {base_path}, with dataset, image_root and ann_root set; {queue_note}.\n\n")
    quoted = {key: yaml_quote(value) if isinstance(value, str) else str(value) for key, value in values.items()}
    return header + set_config_lines(text, quoted)


def staged_config(path: str, text: str, values: dict[str, Any]) -> str:
    """Write the config beside ``path`` under a temporary name and check that it loads with ``values``."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        staging = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
        with open(staging, "w", encoding="utf-8") as handle:
            handle.write(text)
    except OSError as exc:
        raise BadInput(f"--write-config {path}: cannot write there ({exc.strerror or exc})") from None
    try:
        loaded = load_config(staging)
        wrong = {key: loaded[key] for key, value in values.items() if loaded[key] != value}
        if wrong:
            raise ConfigError(f"the edited lines read back as {wrong}")
    except ConfigError as error:
        os.remove(staging)
        raise BadInput(f"--write-config {path}: the config written from the base config is not valid ({error})"
                       ) from None
    return staging


# --------------------------------------------------------------------------- the command
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m data.prepare_pairs",
        description="Check your own image-caption pairs and write them as a BLIP retrieval dataset "
                    "(ANN_ROOT/NAME_{train,val,test}.json and NAME_summary.json). Exit code 2: bad input, "
                    "nothing written.")
    parser.add_argument("source", metavar="SOURCE",
                        help=".csv/.tsv with a header, .jsonl (one object per line), or .json (a list of objects, "
                             "or COCO captions: images + annotations)")
    parser.add_argument("--image-root", required=True, metavar="DIR", help="folder the image paths are relative to")
    parser.add_argument("--ann-root", required=True, metavar="DIR", help="folder for the annotation files")
    parser.add_argument("--name", required=True, help="dataset name: files NAME_{train,val,test}.json, "
                                                      "config key dataset: NAME")
    parser.add_argument("--image-column", default=None, metavar="NAME",
                        help="column (field) of the image path (default: image; COCO: file_name)")
    parser.add_argument("--caption-column", default="caption", metavar="NAME",
                        help="column of the caption, or of a JSON list of captions (default: caption)")
    parser.add_argument("--split-column", default=None, metavar="NAME",
                        help="column holding train, val or test (default: split, used when present; without it "
                             "the images are split at random)")
    parser.add_argument("--val", type=int, default=None, metavar="N",
                        help="val images without a split column (default: 1000, or 5%% of the images if fewer)")
    parser.add_argument("--test", type=int, default=None, metavar="N",
                        help="test images without a split column (same default); --test 0: train and val only")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random split (default 0)")
    parser.add_argument("--write-config", default=None, metavar="PATH",
                        help="write a train_retrieval.py config for the dataset here")
    parser.add_argument("--base-config", default=DEFAULT_BASE_CONFIG, metavar="PATH",
                        help=f"config the written one starts from (default {DEFAULT_BASE_CONFIG}; CPU trial: "
                             f"{TINY_CONFIG}); its max_words, image_size and tokenizer drive the warnings")
    parser.add_argument("--skip-bad-rows", action="store_true",
                        help="drop rows with a missing or undecodable image, an empty caption or a duplicate "
                             "(image, caption) instead of stopping")
    return parser.parse_args(argv)


def _check_arguments(args: argparse.Namespace) -> None:
    if not _NAME.match(args.name) or args.name in RESERVED_NAMES:
        raise BadInput(f"--name {args.name!r}: use letters, digits, '_', '.' or '-' (not a path), and not one of "
                       f"{', '.join(RESERVED_NAMES)}, which name datasets of their own")
    if not os.path.isdir(args.image_root):
        raise BadInput(f"--image-root {args.image_root} is not a folder")
    for flag in ("val", "test"):
        if getattr(args, flag) is not None and getattr(args, flag) < 0:
            raise BadInput(f"--{flag} {getattr(args, flag)}: a number of images, 0 or more")
    if os.path.exists(args.ann_root) and not os.path.isdir(args.ann_root):
        raise BadInput(f"--ann-root {args.ann_root} is a file; give a folder")


def _base_config(path: str) -> dict:
    candidate = path if os.path.isfile(path) or os.path.isabs(path) else os.path.join(REPO_ROOT, path)
    try:
        config = load_config(candidate)
    except ConfigError as error:
        raise BadInput(f"--base-config: {error}") from None
    config["path"] = candidate
    return config


def assign_splits(args: argparse.Namespace, pairs: list[Pair], split_in_use: bool, split_column: str
                  ) -> tuple[dict[str, str], str, list[str]]:
    """image -> split, how it was decided, and notes."""
    images = list(dict.fromkeys(pair.image for pair in pairs))
    if split_in_use:
        notes = [f"--{flag} {getattr(args, flag)} is ignored: the column {split_column!r} decides the splits"
                 for flag in ("val", "test") if getattr(args, flag) not in (None, 0)]
        return {pair.image: pair.split for pair in pairs}, f"column {split_column!r}", notes
    n_val = default_split_size(len(images)) if args.val is None else args.val
    n_test = default_split_size(len(images)) if args.test is None else args.test
    if n_val + n_test >= len(images):
        raise BadInput(f"{len(images)} images cannot give {n_val} val and {n_test} test images and still leave "
                       "training images; lower --val and --test")
    return random_split(images, n_val, n_test, args.seed), f"images at random, seed {args.seed}", []


def check_split_sizes(records: dict[str, list[dict]], args: argparse.Namespace, split_in_use: bool,
                      split_column: str) -> None:
    where = (f"no row has {split_column} = {{split}}" if split_in_use else "--{split} 0 was given")
    if not records["train"]:
        raise BadInput(f"split train has no images ({where.format(split='train')}); fine-tuning needs some")
    if not records["val"]:
        raise BadInput(f"split val has no images ({where.format(split='val')}): val picks the best checkpoint; "
                       "give it images (--test 0 prepares train and val only)")
    if not records["test"] and args.test != 0:
        raise BadInput(f"split test has no images ({where.format(split='test')}); pass --test 0 to prepare train "
                       "and val only")


def prepare(args: argparse.Namespace, argv: list[str]) -> dict:
    """Check everything, then write the files; returns the summary."""
    _check_arguments(args)
    image_root, ann_root = os.path.abspath(args.image_root), os.path.abspath(args.ann_root)
    config = _base_config(args.base_config)
    columns = {"image": args.image_column or "image", "caption": args.caption_column,
               "split": args.split_column or "split"}
    source = read_source(args.source, columns, args.image_column is not None)
    image_column = columns["image"] if source.format != "coco" or args.image_column else "file_name"
    for role, flag, name in (("image", "--image-column", image_column),
                             ("caption", "--caption-column", columns["caption"])):
        if name not in source.columns:
            raise BadInput(f"{source.path} has no {role} column {name!r} (it has: "
                           f"{', '.join(sorted(map(str, source.columns))) or 'none'}); name it with {flag}")
    split_in_use = columns["split"] in source.columns
    if args.split_column and not split_in_use:
        raise BadInput(f"{source.path} has no split column {args.split_column!r} (it has: "
                       f"{', '.join(sorted(map(str, source.columns)))})")

    pairs, problems = rows_to_pairs(source, image_root, {**columns, "image": image_column}, split_in_use)
    infos = inspect_images(image_root, list(dict.fromkeys(pair.image for pair in pairs)))
    pairs, found = image_problems(pairs, infos, image_root)
    pairs, duplicates = duplicate_problems(pairs)
    problems = sorted(problems + found + duplicates + (split_conflicts(pairs) if split_in_use else []),
                      key=lambda p: p.index)
    if any(not p.kind for p in problems) or (problems and not args.skip_bad_rows):
        fixable = all(p.kind for p in problems)
        raise BadInput(f"{len(problems)} problem(s) in {source.path}; nothing was written:\n{listed(problems)}\n"
                       + ("Fix them, or pass --skip-bad-rows to drop these rows." if fixable else
                          "Fix them (--skip-bad-rows drops bad rows, but not bad splits)."))
    dropped = dropped_counts(problems)
    if problems:
        _logger.warning("--skip-bad-rows: dropped %d row(s) (%d caption(s)): %s\n%s", dropped["rows"],
                        dropped["captions"], ", ".join(f"{n} {kind}" for kind, n in dropped["by_problem"].items()),
                        listed(problems))
    if not pairs:
        raise BadInput(f"{source.path} has no usable pair left; nothing was written")

    split_of, split_by, notes = assign_splits(args, pairs, split_in_use, columns["split"])
    records = build_records(pairs, split_of)
    check_split_sizes(records, args, split_in_use, columns["split"])
    used_images = {pair.image for pair in pairs}
    warnings = notes + data_warnings(pairs, {k: v for k, v in infos.items() if k in used_images}, config, args.seed)
    written = dict(records)
    if not records["test"]:  # --test 0: train_retrieval.py evaluates val and test, so test repeats val
        written["test"] = records["val"]
        warnings.append(f"--test 0: {args.name}_test.json repeats val so that train_retrieval.py runs; its test "
                        "recall is the val recall")

    for split in ("val", "test"):
        n = len(records[split])
        if 0 < n < SMALL_EVAL_IMAGES:  # 95% interval of a proportion near 50%: 1.96 * sqrt(0.25 / n)
            images = f"{n} image{'s' if n > 1 else ''}"
            warnings.append(f"{split} has {images}: its TR@1 is known to about +-{98 / n ** 0.5:.0f} points (95%), "
                            "so small differences mean nothing; 1,000 images give +-3 (README: how big val and "
                            "test should be)")
    n_train = len(records["train"])
    queue_size = fitted_queue_size(config["queue_size"], config["batch_size_train"], n_train)
    queue_note = (f"queue_size {queue_size}: at most the {n_train} training captions and a multiple of "
                  f"batch_size_train {config['batch_size_train']} x {QUEUE_PROCESSES} processes (or x 1)")
    if n_train < config["batch_size_train"]:
        warnings.append(f"only {n_train} training captions, fewer than batch_size_train={config['batch_size_train']}:"
                        " lower batch_size_train to fine-tune")
    values = {"dataset": args.name, "image_root": image_root, "ann_root": ann_root, "queue_size": queue_size}
    staging = None
    if args.write_config:
        staging = staged_config(args.write_config, config_text(config["path"], values, argv, queue_note), values)
        commands = run_commands(from_repo_root(args.write_config), {}, args.name, config)
    else:
        commands = run_commands(from_repo_root(config["path"]), values, args.name, config)

    lengths = np.array([len(pre_caption(pair.caption, _NO_CUT).split()) for pair in pairs])
    summary = {
        "name": args.name,
        "source": os.path.abspath(source.path),
        "format": source.format,
        "image_root": image_root,
        "ann_root": ann_root,
        "split_by": split_by,
        "recall_unit": "%",  # chance_r1 here, and recall in evaluate.txt and log.txt: 15.0 means 15%
        "splits": {split: split_stats(records[split], split) for split in SPLITS},
        "caption_words": {"p50": float(np.percentile(lengths, 50)), "p90": float(np.percentile(lengths, 90)),
                          "p99": float(np.percentile(lengths, 99)), "max": int(lengths.max()),
                          "max_words": config["max_words"]},
        "dropped": dropped,
        "warnings": warnings,
        "files": {split: annotation_file(ann_root, args.name, split) for split in SPLITS},
        "config": os.path.abspath(args.write_config) if args.write_config else None,
        "queue_size": queue_size,
        "commands": commands,
    }
    try:
        os.makedirs(ann_root, exist_ok=True)
        for split in SPLITS:
            atomic_write_text(summary["files"][split], json.dumps(written[split], ensure_ascii=False) + "\n")
        atomic_write_text(os.path.join(ann_root, f"{args.name}_summary.json"),
                                json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
        if staging:
            os.replace(staging, args.write_config)
    finally:
        if staging and os.path.exists(staging):
            os.remove(staging)
    return summary


def summary_text(summary: dict) -> str:
    splits = summary["splits"]
    lines = [f"{summary['name']}: {sum(s['images'] for s in splits.values()):,} images, "
             f"{sum(s['captions'] for s in splits.values()):,} captions from {summary['source']} "
             f"(split: {summary['split_by']})",
             f"  {'split':<6}{'images':>8}{'captions':>10}  captions/image   chance R@1 (TR / IR)"]
    for split, stats in splits.items():
        if not stats["images"]:
            lines.append(f"  {split:<6}{0:>8}{0:>10}")
            continue
        per = stats["captions_per_image"]
        lines.append(f"  {split:<6}{stats['images']:>8,}{stats['captions']:>10,}  {per['mean']:>5.2f} ({per['min']}-"
                     f"{per['max']}){'':<5}{stats['chance_r1']['txt_r1']:.2f}% / {stats['chance_r1']['img_r1']:.2f}%")
    words = summary["caption_words"]
    lines.append(f"  caption words: median {words['p50']:g}, 90th percentile {words['p90']:g}, 99th {words['p99']:g}, "
                 f"max {words['max']} (max_words {words['max_words']})")
    lines.append("  recall is in % (0-100) here, in evaluate.txt and in log.txt")
    if summary["dropped"]["rows"]:
        lines.append(f"  dropped {summary['dropped']['rows']} bad row(s) (--skip-bad-rows)")
    lines += [f"  warning: {warning}" for warning in summary["warnings"]]
    lines.append(f"  wrote {', '.join(summary['files'].values())} and {summary['name']}_summary.json"
                 + (f"; config {summary['config']}" if summary["config"] else ""))
    commands = summary["commands"]
    lines.append("Fine-tune (from the repository root):")
    lines.append(f"  {commands['fine_tune']}")
    if commands["evaluate_zero_shot"]:
        lines.append("Evaluate the config's checkpoint as it is (zero-shot):")
        lines.append(f"  {commands['evaluate_zero_shot']}")
    lines.append("Evaluate the fine-tune:")
    lines.append(f"  {commands['evaluate_fine_tuned']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        summary = prepare(args, argv)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return utils.EXIT_USER_ERROR
    print(summary_text(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
