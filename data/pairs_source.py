"""Reading the user's image-caption pairs for `python -m data.prepare_pairs`: CSV/TSV with a header, JSONL, a JSON
list or COCO captions, each row with the source line that messages name (`pairs.csv:4`)."""
from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from data.annotations import DataError

_WHITESPACE = re.compile(r"[ \t\n\r]*")


class BadInput(DataError):
    """The source, its images or the arguments cannot make a dataset; the message lists why."""


@dataclass
class Row:
    """One source row as read (fields None when absent)."""

    index: int  # position in the source, for ordering messages
    where: str  # "pairs.csv:4", "captions.json:1 (annotations[3])"
    ref: str  # the same without the file: "line 4"
    image: Any
    caption: Any
    split: Any
    problem: str | None = None  # the row cannot be read at all (bad JSON, wrong field count)


@dataclass
class Source:
    path: str
    format: str  # csv, tsv, jsonl, json, coco
    rows: list[Row]
    columns: set[str] = field(default_factory=set)


# --------------------------------------------------------------------------- reading the source
def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:  # -sig: spreadsheets write a BOM
            return handle.read()
    except UnicodeDecodeError as exc:
        raise BadInput(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}); save it as UTF-8") from None
    except OSError as exc:
        raise BadInput(f"cannot read {path} ({exc.strerror or exc})") from None


def _cell_captions(value: str) -> Any:
    """A cell holding a JSON list of captions becomes that list; any other text is one caption."""
    text = value.strip()
    if text.startswith("[") and text.endswith("]"):
        try:
            parsed = json.loads(text)
        except ValueError:
            return value
        if isinstance(parsed, list) and all(isinstance(item, str) for item in parsed):
            return parsed
    return value


def read_delimited(path: str, delimiter: str, columns: dict[str, str]) -> Source:
    """A CSV/TSV with a header (csv module: quoted fields may hold the delimiter and line breaks)."""
    reader = csv.reader(_read_text(path).splitlines(keepends=True), delimiter=delimiter)
    header: list[str] | None = None
    rows: list[Row] = []
    last_line = 0
    try:
        for cells in reader:
            line, last_line = last_line + 1, reader.line_num  # a quoted field may span lines: name the first
            if not any(cell.strip() for cell in cells):
                continue
            if header is None:
                header = [cell.strip() for cell in cells]
                continue
            values = dict(zip(header, cells))
            problem = None
            if len(cells) != len(header):
                problem = (f"{len(cells)} fields where the header has {len(header)}: quote a field that holds "
                           f"{'a tab' if delimiter == chr(9) else 'a comma'}, e.g. \"a dog, running\"")
            caption = values.get(columns["caption"])
            rows.append(Row(len(rows), f"{path}:{line}", f"line {line}", values.get(columns["image"]),
                            None if caption is None else _cell_captions(caption), values.get(columns["split"]),
                            problem))
    except csv.Error as exc:
        raise BadInput(f"{path}:{reader.line_num}: cannot be parsed ({exc})") from None
    if header is None:
        raise BadInput(f"{path} is empty; expected a header line naming the columns, e.g. image,caption")
    return Source(path, "tsv" if delimiter == "\t" else "csv", rows, set(header))


def read_jsonl(path: str, columns: dict[str, str]) -> Source:
    rows: list[Row] = []
    seen: set[str] = set()
    for line, text in enumerate(_read_text(path).splitlines(), start=1):
        if not text.strip():
            continue
        where, ref = f"{path}:{line}", f"line {line}"
        try:
            record = json.loads(text)
        except ValueError as exc:
            rows.append(Row(len(rows), where, ref, None, None, None, f"not valid JSON ({exc})"))
            continue
        if not isinstance(record, dict):
            rows.append(Row(len(rows), where, ref, None, None, None,
                            f"a JSON {type(record).__name__}, not an object"))
            continue
        seen.update(record)
        rows.append(Row(len(rows), where, ref, record.get(columns["image"]), record.get(columns["caption"]),
                        record.get(columns["split"])))
    if not rows:
        raise BadInput(f"{path} holds no rows; expected one JSON object per line")
    return Source(path, "jsonl", rows, seen)


# json.load gives values without positions; decoding a valid document item by item gives each one's offset (and
# so its line), which the messages name.
def _array_items(text: str, pos: int) -> Iterator[tuple[int, Any, int]]:
    """(index, value, offset) of the items of the JSON array at text[pos] == '['."""
    decoder = json.JSONDecoder()
    pos = _WHITESPACE.match(text, pos + 1).end()
    index = 0
    while text[pos] != "]":
        value, end = decoder.raw_decode(text, pos)
        yield index, value, pos
        pos = _WHITESPACE.match(text, end).end()
        if text[pos] == ",":
            pos = _WHITESPACE.match(text, pos + 1).end()
        index += 1


def _member_offsets(text: str, pos: int) -> dict[str, int]:
    """Offsets of the values of the JSON object at text[pos] == '{', by key."""
    decoder = json.JSONDecoder()
    offsets: dict[str, int] = {}
    pos = _WHITESPACE.match(text, pos + 1).end()
    while text[pos] != "}":
        key, pos = decoder.raw_decode(text, pos)
        pos = _WHITESPACE.match(text, _WHITESPACE.match(text, pos).end() + 1).end()  # past the ':'
        offsets[key] = pos
        _, pos = decoder.raw_decode(text, pos)
        pos = _WHITESPACE.match(text, pos).end()
        if text[pos] == ",":
            pos = _WHITESPACE.match(text, pos + 1).end()
    return offsets


class _LineCounter:
    """Line number of increasing offsets in one text, counted incrementally (a large file is scanned once)."""

    def __init__(self, text: str) -> None:
        self.text, self.pos, self.line = text, 0, 1

    def __call__(self, pos: int) -> int:
        self.line += self.text.count("\n", self.pos, pos)
        self.pos = pos
        return self.line


def read_json(path: str, columns: dict[str, str], image_column_given: bool) -> Source:
    """A list of row objects, or COCO captions: ``images`` [{id, file_name}] + ``annotations`` [{image_id, caption}]."""
    text = _read_text(path)
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise BadInput(f"{path} is not valid JSON ({exc}); for one object per line, name the file .jsonl") from None
    start = _WHITESPACE.match(text).end()
    line_of = _LineCounter(text)
    rows: list[Row] = []
    if isinstance(data, list):
        seen: set[str] = set()
        for index, record, pos in _array_items(text, start):
            line = line_of(pos)
            where, ref = f"{path}:{line} (item [{index}])", f"line {line} (item [{index}])"
            if not isinstance(record, dict):
                rows.append(Row(index, where, ref, None, None, None, f"a JSON {type(record).__name__}, not an object"))
                continue
            seen.update(record)
            rows.append(Row(index, where, ref, record.get(columns["image"]), record.get(columns["caption"]),
                            record.get(columns["split"])))
        if not rows:
            raise BadInput(f"{path} is an empty list; expected objects such as "
                           '{"image": "photos/1.jpg", "caption": "a dog on a beach"}')
        return Source(path, "json", rows, seen)

    if not (isinstance(data, dict) and isinstance(data.get("images"), list)
            and isinstance(data.get("annotations"), list)):
        raise BadInput(f"{path} is neither a list of objects nor COCO captions (an object with the lists 'images' "
                       "and 'annotations')")
    # COCO: the image path is `file_name` unless --image-column names another field of the images.
    image_key = columns["image"] if image_column_given else "file_name"
    images = {image["id"]: image for image in data["images"] if isinstance(image, dict) and "id" in image}
    fields = {key for image in images.values() for key in image}
    if image_key not in fields:
        raise BadInput(f"{path}: the COCO 'images' have no field {image_key!r} (they have: "
                       f"{', '.join(sorted(fields)) or 'none'}); pass --image-column NAME")
    caption_key, split_key = columns["caption"], columns["split"]
    seen = {image_key} | ({split_key} if split_key in fields else set())
    for index, annotation, pos in _array_items(text, _member_offsets(text, start)["annotations"]):
        line = line_of(pos)
        where, ref = f"{path}:{line} (annotations[{index}])", f"line {line} (annotations[{index}])"
        if not isinstance(annotation, dict):
            rows.append(Row(index, where, ref, None, None, None,
                            f"a JSON {type(annotation).__name__}, not an object"))
            continue
        seen.update(key for key in annotation if key in (caption_key, split_key))
        image = images.get(annotation.get("image_id"))
        if image is None:
            rows.append(Row(index, where, ref, None, None, None,
                            f"image_id {annotation.get('image_id')!r} is not the id of any entry of 'images'"))
            continue
        rows.append(Row(index, where, ref, image.get(image_key), annotation.get(caption_key),
                        image.get(split_key, annotation.get(split_key))))
    if not rows:
        raise BadInput(f"{path}: the COCO 'annotations' list is empty")
    return Source(path, "coco", rows, seen)


def read_source(path: str, columns: dict[str, str], image_column_given: bool) -> Source:
    if not os.path.isfile(path):
        raise BadInput(f"SOURCE {path} does not exist")
    suffix = Path(path).suffix.lower()
    if suffix in (".csv", ".tsv"):
        return read_delimited(path, "\t" if suffix == ".tsv" else ",", columns)
    if suffix == ".jsonl":
        return read_jsonl(path, columns)
    if suffix == ".json":
        return read_json(path, columns, image_column_given)
    raise BadInput(f"SOURCE {path}: unknown format {suffix or '(no extension)'!r}; give a .csv or .tsv with a "
                   "header, a .jsonl (one object per line) or a .json (a list of objects, or COCO captions)")
