"""Download, unpack, check and configure Flickr30k for retrieval in one command.

    python -m data.prepare_flickr30k --root DATA_DIR [--zip PATH] [--split-file PATH]
        [--write-config [CONFIG_PATH]] [--skip-verify]

Steps, each skipped when its result is already there:

1. download ``adityajn105/flickr30k`` with the Kaggle API (or use ``--zip``);
2. unpack it member by member into DATA_DIR (resumable, crash safe);
3. fetch the BLIP annotation files into DATA_DIR/annotation, or build them
   from a Karpathy split file (``--split-file dataset_flickr30k.json``);
4. check that every image the annotations name exists and decodes;
5. print (or write into the config) the ``image_root`` / ``ann_root`` lines.

Every failure is one :class:`DataError` whose message names the file and the fix.

Over 500 lines on purpose: the whole of one command, its steps in the order they run; the pieces other commands
use live elsewhere (the full-decode image check in data.image_folder, annotation reading in data.annotations).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import logging
import os
import re
import shutil
import sys
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable

from tqdm import tqdm

from atomic import atomic_file, atomic_write_text
from config import set_config_lines, yaml_quote
from data.annotations import DataError, annotation_file, annotation_url, ensure_annotations, load_annotation
from data.image_folder import decode_problem
from data.retrieval_dataset import ImagePathResolver


_logger = logging.getLogger(__name__)

KAGGLE_DATASET = "adityajn105/flickr30k"
ZIP_NAME = "flickr30k.zip"
ANNOTATION_DIR = "annotation"
SPLITS = ("train", "val", "test")
# Karpathy split as used by BLIP: (images, captions) per split.
EXPECTED_COUNTS = {"train": (29_000, 145_000), "val": (1_014, 5_070), "test": (1_000, 5_000)}
# Folders (relative to image_root) in the order the project's image resolver tries them.
KNOWN_IMAGE_DIRS = ("flickr30k-images", "Images", "flickr30k_images/flickr30k_images", "flickr30k_images")
CAPTION_FILE_NAMES = ("captions.txt", "results.csv", "results_20130124.token")
UNPACKED_MARKER = ".flickr30k_unpacked.json"
PROBLEMS_FILE = "flickr30k_problems.txt"
MAX_LISTED_PROBLEMS = 20
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "retrieval_flickr.yaml"

CREDENTIALS_HELP = (
    "Kaggle credentials not found, so {dataset} cannot be downloaded.\n"
    "  Fix one of:\n"
    "  - create an API token at https://www.kaggle.com/settings (section API) and save the\n"
    "    downloaded kaggle.json as ~/.kaggle/kaggle.json (then: chmod 600 ~/.kaggle/kaggle.json),\n"
    "    or in the folder named by the KAGGLE_CONFIG_DIR environment variable;\n"
    "  - or set the environment variables KAGGLE_USERNAME and KAGGLE_KEY\n"
    "    (newer kaggle versions also accept KAGGLE_API_TOKEN, or run: kaggle auth login);\n"
    "  - or download the zip elsewhere (kaggle datasets download {dataset}) and pass --zip PATH."
)


def _credentials_error(exc: BaseException) -> DataError:
    """The credentials help, with what kaggle itself said when it said something."""
    detail = "" if isinstance(exc, SystemExit) or not str(exc) else f"\n  (kaggle said: {exc})"
    return DataError(CREDENTIALS_HELP.format(dataset=KAGGLE_DATASET) + detail)


# --------------------------------------------------------------------------- Kaggle


def _kaggle_import_error(exc: ImportError) -> DataError:
    """'kaggle' not installed, or installed but one of its own imports failing (kaggle 2.2.5 imports six without
    declaring it): say which, with the exception and the fix."""
    missing = getattr(exc, "name", None) or "?"
    fallback = " Or download the zip elsewhere (kaggle datasets download adityajn105/flickr30k) and pass --zip PATH."
    if missing == "kaggle" or missing.startswith("kaggle."):
        return DataError(f"the 'kaggle' package is not installed ({type(exc).__name__}: {exc}); install it with: "
                         "pip install -r requirements.txt." + fallback)
    return DataError(f"the 'kaggle' package is installed but fails to import: importing {missing!r} failed "
                     f"({type(exc).__name__}: {exc}); install it with: pip install {missing.split('.')[0]} "
                     "(or pip install -r requirements.txt, which declares it)." + fallback)


def _authenticated_kaggle_api():
    """Return an authenticated ``KaggleApi``; raise :class:`DataError` without credentials."""
    # Importing kaggle authenticates at import time: old versions raise, new ones print
    # help and swallow SystemExit. Keep its output quiet and decide ourselves below.
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            from kaggle.api.kaggle_api_extended import KaggleApi
        except ImportError as exc:
            raise _kaggle_import_error(exc) from None
        except (Exception, SystemExit) as exc:  # older kaggle raises on import without credentials
            raise _credentials_error(exc) from None
        api = KaggleApi()
        try:
            api.authenticate()
        except (Exception, SystemExit) as exc:  # kaggle 2.x prints help and calls exit(1)
            raise _credentials_error(exc) from None
    return api


def kaggle_download(dataset: str, dest_dir: str) -> str:
    """Download ``dataset`` from Kaggle as a zip into ``dest_dir``; return the zip path.

    This is the only network call to Kaggle (tests replace it).
    """
    api = _authenticated_kaggle_api()
    _logger.info("downloading %s from Kaggle into %s (about 4.3 GB)", dataset, dest_dir)
    try:
        api.dataset_download_files(dataset, path=dest_dir, quiet=False, unzip=False)
    except (Exception, SystemExit) as exc:
        if "401" in str(exc) or "Unauthorized" in str(exc):
            raise DataError(f"Kaggle rejected the credentials ({exc}); replace them:\n"
                            + CREDENTIALS_HELP.format(dataset=dataset).split("\n", 1)[1]) from None
        raise DataError(
            f"downloading {dataset} from Kaggle failed ({exc}). Re-run to resume, or download it"
            f" elsewhere (kaggle datasets download {dataset}) and pass --zip PATH"
        ) from None
    return os.path.join(dest_dir, dataset.split("/")[-1] + ".zip")


def download_zip(root: Path) -> Path:
    """Download the Kaggle zip; it only appears at ``root/flickr30k.zip`` once complete."""
    staging = root / ".kaggle_download"  # kaggle resumes partial files here
    staging.mkdir(parents=True, exist_ok=True)
    try:
        downloaded = Path(kaggle_download(KAGGLE_DATASET, str(staging)))
    except DataError:
        with contextlib.suppress(OSError):
            staging.rmdir()  # only when empty: a partial download stays for the next run to resume
        raise
    if not downloaded.is_file():
        raise DataError(f"the Kaggle download finished but {downloaded} is missing; re-run, or pass --zip PATH")
    target = root / ZIP_NAME
    os.replace(downloaded, target)
    shutil.rmtree(staging, ignore_errors=True)
    return target


# --------------------------------------------------------------------------- unpacking


@dataclass(frozen=True)
class ZipPlan:
    """Which zip members to unpack, and where (relative to DATA_DIR)."""

    images: list[tuple[zipfile.ZipInfo, str]]
    captions: tuple[zipfile.ZipInfo, str] | None


def _is_junk(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return "__MACOSX" in parts or PurePosixPath(name).name.startswith("._")


def _image_target_dir(zip_dir: PurePosixPath) -> str:
    """Where a zip's image folder goes, keeping the names the resolver knows, any prefix dropped."""
    parts = zip_dir.parts
    if parts[-2:] == ("flickr30k_images", "flickr30k_images"):
        return "flickr30k_images/flickr30k_images"
    if parts and parts[-1] in ("Images", "flickr30k-images"):
        return parts[-1]
    return "Images"


def plan_zip(infos: Iterable[zipfile.ZipInfo], zip_path: Path) -> ZipPlan:
    """Detect the layout inside the zip, whatever folder it is wrapped in."""
    jpgs_by_dir: dict[PurePosixPath, list[zipfile.ZipInfo]] = {}
    caption_members: list[zipfile.ZipInfo] = []
    for info in infos:
        if info.is_dir() or _is_junk(info.filename):
            continue
        path = PurePosixPath(info.filename)
        if path.suffix.lower() in (".jpg", ".jpeg"):
            jpgs_by_dir.setdefault(path.parent, []).append(info)
        elif path.name in CAPTION_FILE_NAMES:
            caption_members.append(info)
    if not jpgs_by_dir:
        raise DataError(
            f"{zip_path} holds no .jpg images. Expected the Kaggle {KAGGLE_DATASET} archive"
            " (Images/<id>.jpg + captions.txt), the flickr30k_images/flickr30k_images/<id>.jpg mirror"
            " or flickr30k-images/<id>.jpg; pass --zip with one of those"
        )
    image_dir = max(jpgs_by_dir, key=lambda d: len(jpgs_by_dir[d]))
    target_dir = _image_target_dir(image_dir)
    if target_dir == "Images" and image_dir.name != "Images":
        _logger.info("unpacking the images of %s/ into Images/", image_dir)
    images = [(info, f"{target_dir}/{PurePosixPath(info.filename).name}") for info in jpgs_by_dir[image_dir]]
    captions = None
    if caption_members:
        member = min(caption_members, key=lambda i: (len(PurePosixPath(i.filename).parts), i.filename))
        captions = (member, PurePosixPath(member.filename).name)
    return ZipPlan(images=images, captions=captions)


def _extract_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path) -> bool:
    """Extract one member via a temp name; return False when it was already complete."""
    if target.is_file() and target.stat().st_size == info.file_size:
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    # zipfile checks the CRC at the end of the stream, so a bad member raises here. A crash never leaves a
    # truncated file under the final name; the next run overwrites the fixed temp name and checks the sizes.
    with archive.open(info) as src, atomic_file(target, temp=target.with_name(f".{target.name}.partial"),
                                                durable=False) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    return True


def _read_marker(root: Path) -> dict | None:
    try:
        return json.loads((root / UNPACKED_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def unpack_zip(zip_path: Path, root: Path) -> int:
    """Unpack the images and captions file of ``zip_path`` into ``root``; return files written."""
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(
            f"{zip_path} is not a readable zip archive ({exc}); it is probably an incomplete download."
            " Delete it and re-run, or pass --zip with a complete copy"
        ) from None
    with archive:
        plan = plan_zip(archive.infolist(), zip_path)
        members = plan.images + ([plan.captions] if plan.captions else [])
        written = 0
        for info, relative in tqdm(members, desc="unpacking", unit="file", mininterval=1.0):
            try:
                written += _extract_member(archive, info, root / relative)
            except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
                raise DataError(
                    f"{zip_path} member {info.filename} is corrupt ({exc}); delete {zip_path} and"
                    " re-run to download it again, or pass --zip with a good copy"
                ) from None
    marker = {"zip": str(zip_path), "zip_size": zip_path.stat().st_size, "files": len(members)}
    (root / UNPACKED_MARKER).write_text(json.dumps(marker, indent=1), encoding="utf-8")
    _logger.info("unpacked %d files (%d already complete) into %s", len(members), len(members) - written, root)
    return written


# --------------------------------------------------------------------------- finding images


@dataclass(frozen=True)
class ImageLayout:
    """Where the unpacked dataset lies."""

    image_root: Path  # the folder to set as image_root in the config
    image_dir: Path  # the folder that holds <id>.jpg
    captions_file: Path | None


def _has_jpg(folder: Path) -> bool:
    return folder.is_dir() and any(p.suffix.lower() == ".jpg" for p in folder.iterdir())


def find_layout(root: Path) -> ImageLayout | None:
    """Find an unpacked Flickr30k under ``root`` or one folder below it."""
    candidates = [root] + sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    for image_root in candidates:
        for relative in KNOWN_IMAGE_DIRS:
            image_dir = image_root / relative
            if _has_jpg(image_dir):
                captions = _find_captions_file(image_root, image_dir, image_dir.parent, root)
                return ImageLayout(image_root, image_dir, captions)
    return None


def _find_captions_file(*folders: Path) -> Path | None:
    for folder in folders:
        for name in CAPTION_FILE_NAMES:
            if (folder / name).is_file():
                return folder / name
    return None


def obtain_images(root: Path, zip_path: Path | None) -> ImageLayout:
    """Make sure the images are unpacked under ``root``: skip, unpack, or download then unpack."""
    layout = find_layout(root)
    marker = _read_marker(root)
    if zip_path is not None and not zip_path.is_file():
        raise DataError(f"--zip {zip_path} does not exist; pass the path of the downloaded {KAGGLE_DATASET} zip")
    if zip_path is None and (root / ZIP_NAME).is_file():
        zip_path = root / ZIP_NAME
    same_zip = zip_path is None or (marker or {}).get("zip_size") == zip_path.stat().st_size
    if layout is not None and marker is not None and same_zip:
        _logger.info("images already unpacked in %s (found %s); skipping extraction", layout.image_dir, UNPACKED_MARKER)
        return layout
    if zip_path is None and layout is not None:
        _logger.info("using the images already in %s", layout.image_dir)
        return layout
    if zip_path is None:
        zip_path = download_zip(root)
    unpack_zip(zip_path, root)
    layout = find_layout(root)
    if layout is None:  # unpack_zip always writes a known folder; this guards against surprises
        raise DataError(f"unpacking {zip_path} left no images under {root}; pass --zip with the Kaggle archive")
    return layout


# --------------------------------------------------------------------------- captions files


def parse_captions_file(path: Path) -> dict[str, list[str]]:
    """Read captions.txt (CSV ``image,caption``), results.csv (``|`` separated) or a ``.token`` file.

    Returns image file name -> captions, in file order.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read the captions file {path} ({exc}); unpack the dataset again") from None
    lines = text.splitlines()
    if not lines:
        raise DataError(f"the captions file {path} is empty; unpack the dataset again")
    header = lines[0]
    captions: dict[str, list[str]] = {}

    def add(image: str, caption: str) -> None:
        captions.setdefault(image.strip(), []).append(caption.strip())

    if "|" in header:  # image_name| comment_number| comment (captions are never quoted here)
        for number, row in enumerate(csv.reader(lines[1:], delimiter="|", quoting=csv.QUOTE_NONE), start=2):
            if len(row) == 3:
                add(row[0], row[2])
            elif len(row) == 2 and re.match(r"\s*\d+\s+\S", row[1]):  # a known row lacks its 2nd '|'
                add(row[0], row[1].strip().split(maxsplit=1)[1])
            elif any(field.strip() for field in row):
                _logger.warning("%s line %d: cannot parse %r; skipped", path, number, "|".join(row))
    elif "\t" in header:  # original Flickr30k: <image>#<n>\t<caption>
        for line in lines:
            key, _, caption = line.partition("\t")
            if caption:
                add(key.split("#", 1)[0], caption)
    else:  # Kaggle captions.txt: CSV with header image,caption; commas inside quotes
        reader = csv.reader(lines)
        first = next(reader)
        if [f.strip().lower() for f in first] != ["image", "caption"]:
            raise DataError(f"{path} does not start with the header 'image,caption'; unpack the dataset again")
        for number, row in enumerate(reader, start=2):
            if len(row) == 2:
                add(row[0], row[1])
            elif row:
                _logger.warning("%s line %d: expected 2 fields, got %d; skipped", path, number, len(row))
    return captions


def consistency_report(layout: ImageLayout) -> list[str]:
    """Compare the captions file with the image folder; return warning lines."""
    if layout.captions_file is None:
        return ["no captions file (captions.txt / results.csv) found next to the images"]
    captions = parse_captions_file(layout.captions_file)
    files = {p.name for p in layout.image_dir.iterdir() if p.suffix.lower() == ".jpg"}
    notes = []
    without_file = sorted(set(captions) - files)
    without_captions = sorted(files - set(captions))
    odd_counts = sorted(name for name, caps in captions.items() if len(caps) != 5)
    if without_file:
        notes.append(f"{len(without_file)} images have captions but no file, e.g. {', '.join(without_file[:5])}")
    if without_captions:
        notes.append(f"{len(without_captions)} image files have no captions, e.g. {', '.join(without_captions[:5])}")
    if odd_counts:
        notes.append(f"{len(odd_counts)} images do not have exactly 5 captions, e.g. {', '.join(odd_counts[:5])}")
    return notes


# --------------------------------------------------------------------------- annotations


def annotation_path(ann_root: Path, split: str) -> Path:
    return Path(annotation_file(str(ann_root), "flickr", split))


def ensure_blip_annotations(ann_root: Path) -> None:
    """Download the three BLIP annotation files into ``ann_root`` unless present."""
    try:
        ensure_annotations(str(ann_root), "flickr", SPLITS)
    except DataError:  # offline: say what to copy where, and the --split-file way out
        missing = [split for split in SPLITS if not annotation_path(ann_root, split).is_file()]
        lines = ["cannot download the BLIP Flickr30k annotation files. Copy them by hand:"]
        lines += [f"    {annotation_url('flickr', split)} -> {annotation_path(ann_root, split)}" for split in missing]
        lines.append(
            "  or build them from the Karpathy split file with --split-file dataset_flickr30k.json"
            " (in caption_datasets.zip from https://cs.stanford.edu/people/karpathy/deepimagesent/)"
        )
        raise DataError("\n".join(lines)) from None


def build_annotations_from_split(
    split_file: Path, captions: dict[str, list[str]] | None = None
) -> dict[str, list[dict]]:
    """Build BLIP-format records per split from a Karpathy ``dataset_flickr30k.json``.

    train: one record per caption ``{"image", "caption", "image_id"}``;
    val/test: one record per image ``{"image", "caption": [captions]}``.
    ``captions`` (from captions.txt) fills in images that have no sentences.
    """
    try:
        data = json.loads(split_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(
            f"cannot read the split file {split_file} ({exc}); pass the Karpathy dataset_flickr30k.json"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{split_file} has no 'images' list; pass the Karpathy dataset_flickr30k.json")
    records: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for index, entry in enumerate(data["images"]):
        try:
            filename, split = entry["filename"], entry["split"]
        except (KeyError, TypeError):
            raise DataError(
                f"{split_file}: images[{index}] lacks 'filename' or 'split'; pass the Karpathy split file"
            ) from None
        split = "train" if split == "restval" else split
        if split not in records:
            raise DataError(
                f"{split_file}: images[{index}] ({filename}) has unknown split {split!r};"
                " expected train/restval/val/test"
            )
        try:
            texts = [sentence["raw"].strip() for sentence in entry.get("sentences", [])]
        except (KeyError, TypeError, AttributeError):
            raise DataError(f"{split_file}: images[{index}] ({filename}) has a sentence without 'raw'") from None
        if not texts and captions:
            texts = captions.get(filename, [])
        if not texts:
            raise DataError(f"{split_file}: images[{index}] ({filename}) has no captions; fix the split file")
        image = f"flickr30k-images/{filename}"
        if split == "train":
            image_id = PurePosixPath(filename).stem
            records["train"].extend({"image": image, "caption": text, "image_id": image_id} for text in texts)
        else:
            records[split].append({"image": image, "caption": texts})
    for split, split_records in records.items():
        if not split_records:
            raise DataError(f"{split_file} has no images in split {split!r}; pass the full Karpathy split file")
    return records


def write_annotations(records: dict[str, list[dict]], ann_root: Path) -> None:
    ann_root.mkdir(parents=True, exist_ok=True)
    for split, split_records in records.items():
        path = annotation_path(ann_root, split)
        atomic_write_text(path, json.dumps(split_records))
        _logger.info("wrote %s (%d records)", path, len(split_records))


def read_annotations(ann_root: Path) -> dict[str, list[dict]]:
    """Load and validate the three annotation files."""
    return {split: load_annotation(str(annotation_path(ann_root, split)), split) for split in SPLITS}


# --------------------------------------------------------------------------- verification


@dataclass
class SplitCounts:
    images: int
    captions: int


def count_split(records: list[dict]) -> SplitCounts:
    images = {record["image"] for record in records}
    captions = sum(len(r["caption"]) if isinstance(r["caption"], list) else 1 for r in records)
    return SplitCounts(images=len(images), captions=captions)


@dataclass(frozen=True)
class ImageProblem:
    annotation_image: str  # the path as the annotation names it
    path: Path  # where it was read, or where it was expected
    why: str


def verify_images(
    annotations: dict[str, list[dict]], layout: ImageLayout, decode: bool = True, workers: int | None = None
) -> list[ImageProblem]:
    """Check every image named by the annotations, found the way training finds it."""
    resolver = ImagePathResolver(str(layout.image_root))
    names = sorted({record["image"] for records in annotations.values() for record in records})
    problems: list[ImageProblem] = []
    to_decode: list[tuple[str, Path]] = []
    for name in names:
        found = resolver.resolve(name)
        if found is None:
            problems.append(ImageProblem(name, layout.image_dir / PurePosixPath(name).name, "missing"))
        elif decode:
            to_decode.append((name, Path(found)))
    if to_decode:
        # PIL decodes without the GIL, so threads use every core.
        with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
            results = pool.map(decode_problem, [path for _, path in to_decode])
            for (name, path), why in tqdm(
                zip(to_decode, results), total=len(to_decode), desc="verifying", unit="img", mininterval=1.0
            ):
                if why:
                    problems.append(ImageProblem(name, path, why))
    return sorted(problems, key=lambda p: p.annotation_image)


def report_problems(problems: list[ImageProblem], layout: ImageLayout, root: Path) -> str:
    """Write all problems to a file in ``root``; return an error message listing the first ones."""
    problems_file = root / PROBLEMS_FILE
    problems_file.write_text("".join(f"{p.path}\t{p.why}\n" for p in problems), encoding="utf-8")
    shown = problems[:MAX_LISTED_PROBLEMS]
    lines = [f"{len(problems)} images named by the annotations are missing or unreadable under {layout.image_root}:"]
    lines += [f"    {p.path}: {p.why}" for p in shown]
    if len(problems) > len(shown):
        lines.append(f"    ... and {len(problems) - len(shown)} more")
    lines.append(f"  full list: {problems_file}")
    lines.append(
        f"  fix: delete the unreadable files, then re-run with the zip ({root / ZIP_NAME} or --zip PATH) to"
        " unpack them again; if they stay unreadable the zip is damaged: delete it and download it again"
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------- config


def config_lines(image_root: Path, ann_root: Path) -> dict[str, str]:
    return {"image_root": yaml_quote(str(image_root)), "ann_root": yaml_quote(str(ann_root))}


def update_config(config_path: Path, values: dict[str, str]) -> None:
    """Set top-level keys in a YAML file by editing only their lines (comments stay)."""
    try:
        text = config_path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DataError(
            f"cannot read the config {config_path} ({exc}); pass --write-config PATH to an existing YAML file"
        ) from None
    atomic_write_text(config_path, set_config_lines(text, values))


# --------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m data.prepare_flickr30k",
        description="Download, unpack and check Flickr30k (Kaggle adityajn105/flickr30k) for retrieval.",
    )
    parser.add_argument("--root", type=Path, required=True, metavar="DATA_DIR", help="folder for the images and annotation/")
    parser.add_argument("--zip", type=Path, metavar="PATH", help="use this already-downloaded Kaggle zip instead of downloading")
    parser.add_argument(
        "--split-file", type=Path, metavar="PATH", help="build the annotation files from a Karpathy dataset_flickr30k.json"
    )
    parser.add_argument(
        "--write-config", nargs="?", const=DEFAULT_CONFIG, type=Path, metavar="CONFIG_PATH",
        help="write image_root/ann_root into this YAML (default configs/retrieval_flickr.yaml)",
    )
    parser.add_argument(
        "--skip-verify", action="store_true", help="only check that the images exist, do not decode them"
    )
    return parser.parse_args(argv)


def _print_counts(annotations: dict[str, list[dict]]) -> None:
    for split in SPLITS:
        counts = count_split(annotations[split])
        want_images, want_captions = EXPECTED_COUNTS[split]
        print(
            f"{split:>5}: {counts.images:,} images (expected {want_images:,}), "
            f"{counts.captions:,} captions (expected {want_captions:,})"
        )
        if (counts.images, counts.captions) != (want_images, want_captions):
            _logger.warning("%s differs from the Karpathy split BLIP reports results on", split)


def run(args: argparse.Namespace) -> int:
    root = args.root.expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    ann_root = root / ANNOTATION_DIR

    layout = obtain_images(root, args.zip.expanduser().resolve() if args.zip else None)
    for note in consistency_report(layout):
        _logger.warning("%s", note)

    if args.split_file is not None:
        captions = parse_captions_file(layout.captions_file) if layout.captions_file else None
        write_annotations(build_annotations_from_split(args.split_file.expanduser(), captions), ann_root)
    else:
        ensure_blip_annotations(ann_root)
    annotations = read_annotations(ann_root)
    _print_counts(annotations)

    if args.skip_verify:
        _logger.warning("--skip-verify: checking only that the images exist, not that they decode")
    problems = verify_images(annotations, layout, decode=not args.skip_verify)
    if problems:
        # The extraction is not complete after all: let the next run re-check every zip member.
        (root / UNPACKED_MARKER).unlink(missing_ok=True)
        raise DataError(report_problems(problems, layout, root))
    (root / PROBLEMS_FILE).unlink(missing_ok=True)
    n_images = len({record["image"] for records in annotations.values() for record in records})
    print(f"all {n_images:,} annotated images are present and readable")

    values = config_lines(layout.image_root, ann_root)
    if args.write_config is not None:
        update_config(args.write_config, values)
        print(f"wrote image_root and ann_root into {args.write_config}")
    else:
        print("set these lines in configs/retrieval_flickr.yaml:")
    for key, value in values.items():
        print(f"{key}: {value}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        return run(args)
    except DataError as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    sys.exit(main())
