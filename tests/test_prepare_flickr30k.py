"""Tests for data/prepare_flickr30k.py (no network: Kaggle and HTTP are replaced at their boundary)."""

from __future__ import annotations

import io
import json
import shutil
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from data import prepare_flickr30k as prep

# Captions in the Kaggle style: leading space, commas inside double quotes.
_CAPTION_TEMPLATES = (
    "A dog runs in the park number {i} .",
    "Two young , White males are outside near bush {i} .",
    "A man in a blue shirt , standing in garden {i} .",
    "A child plays with ball {i} .",
    "Friends enjoy time , spent together {i} .",
)


@dataclass
class FakeKaggleZip:
    """What :func:`make_fake_kaggle_zip` built."""

    zip_path: Path
    image_names: list[str]  # every image the captions name, also those left out of the zip
    captions: dict[str, list[str]]  # image file name -> its five captions


def fake_image_bytes(index: int) -> bytes:
    """A small deterministic JPEG (same index -> same bytes)."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 12), color=(40 * index % 256, 90, 160)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def make_fake_kaggle_zip(
    tmp_path: Path,
    n_images: int,
    *,
    prefix: str = "",
    leave_out: tuple[str, ...] = (),
    corrupt: tuple[str, ...] = (),
    name: str = "flickr30k.zip",
) -> FakeKaggleZip:
    """Build a zip laid out like Kaggle's adityajn105/flickr30k: Images/<id>.jpg + captions.txt.

    ``prefix`` wraps everything in an extra folder, ``leave_out`` names images kept out of the zip
    (their captions stay), ``corrupt`` names images stored truncated.
    """
    image_names = [f"{1000 + i}.jpg" for i in range(n_images)]
    captions = {n: [t.format(i=i) for t in _CAPTION_TEMPLATES] for i, n in enumerate(image_names)}
    lines = ["image,caption"]
    for image in image_names:
        for caption in captions[image]:
            text = f" {caption}"
            lines.append(f'{image},"{text}"' if "," in text else f"{image},{text}")
    zip_path = tmp_path / "kaggle_source" / name
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(zip_path, "w") as archive:
        for index, image in enumerate(image_names):
            if image in leave_out:
                continue
            data = fake_image_bytes(index)
            archive.writestr(f"{prefix}Images/{image}", data[: len(data) // 2] if image in corrupt else data)
        archive.writestr(f"{prefix}captions.txt", "\n".join(lines) + "\n")
    return FakeKaggleZip(zip_path=zip_path, image_names=image_names, captions=captions)


def split_of(image_names: list[str]) -> dict[str, str]:
    """All but the last two images train; then one val, one test."""
    splits = {name: "train" for name in image_names[:-2]}
    splits[image_names[-2]] = "val"
    splits[image_names[-1]] = "test"
    return splits


def write_blip_annotations(ann_root: Path, fake: FakeKaggleZip) -> None:
    """Write flickr30k_{train,val,test}.json in BLIP's format for ``fake``'s images."""
    ann_root.mkdir(parents=True, exist_ok=True)
    records: dict[str, list] = {"train": [], "val": [], "test": []}
    for image, split in split_of(fake.image_names).items():
        texts = fake.captions[image]
        if split == "train":
            records["train"] += [
                {"image": f"flickr30k-images/{image}", "caption": t, "image_id": image[:-4]} for t in texts
            ]
        else:
            records[split].append({"image": f"flickr30k-images/{image}", "caption": texts})
    for split, split_records in records.items():
        (ann_root / f"flickr30k_{split}.json").write_text(json.dumps(split_records), encoding="utf-8")


def prepare_fake_flickr30k(tmp_path: Path, n_images: int = 6) -> dict[str, Path]:
    """Run the whole preparation offline on a fake Kaggle zip; return image_root and ann_root.

    For tests that go on to train or evaluate on the prepared data.
    """
    fake = make_fake_kaggle_zip(tmp_path, n_images)
    root = tmp_path / "flickr30k_data"
    write_blip_annotations(root / "annotation", fake)
    if prep.main(["--root", str(root), "--zip", str(fake.zip_path)]) != 0:
        raise AssertionError("preparing the fake Flickr30k failed")
    return {"image_root": root, "ann_root": root / "annotation"}


@pytest.fixture
def offline(monkeypatch):
    """No HTTP: fetching the annotation files fails as it does without internet."""

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)


@pytest.fixture
def fake_kaggle(monkeypatch):
    """Replace only the Kaggle network call; return the list of its calls and a setter for the zip."""
    calls: list[tuple[str, str]] = []
    source: dict[str, Path] = {}

    def fake_download(dataset: str, dest_dir: str) -> str:
        calls.append((dataset, dest_dir))
        target = Path(dest_dir) / "flickr30k.zip"
        shutil.copy(source["zip"], target)
        return str(target)

    monkeypatch.setattr(prep, "kaggle_download", fake_download)
    return calls, source


def mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.iterdir())}


def error_text(excinfo) -> str:
    return str(excinfo.value.code)


CONFIG_TEXT = """\
# Flickr30k retrieval fine-tuning
image_root: '/export/share/datasets/vision/flickr30k/'  # folder that holds the images
ann_root: 'annotation'
dataset: 'flickr'

# optimizer
init_lr: 1e-5
"""


def test_full_run_downloads_unpacks_verifies_and_writes_config(tmp_path, fake_kaggle, offline, capsys):
    calls, source = fake_kaggle
    fake = make_fake_kaggle_zip(tmp_path, 6)
    source["zip"] = fake.zip_path
    root = tmp_path / "data"
    write_blip_annotations(root / "annotation", fake)
    config = tmp_path / "retrieval_flickr.yaml"
    config.write_text(CONFIG_TEXT, encoding="utf-8")

    assert prep.main(["--root", str(root), "--write-config", str(config)]) == 0

    assert calls == [("adityajn105/flickr30k", str(root / ".kaggle_download"))]
    assert (root / "flickr30k.zip").is_file() and not (root / ".kaggle_download").exists()
    assert sorted(p.name for p in (root / "Images").iterdir()) == fake.image_names
    assert (root / "Images" / "1003.jpg").read_bytes() == fake_image_bytes(3)
    assert prep.parse_captions_file(root / "captions.txt") == fake.captions
    out = capsys.readouterr().out
    assert "train: 4 images (expected 29,000), 20 captions (expected 145,000)" in out
    assert "  val: 1 images (expected 1,014), 5 captions (expected 5,070)" in out
    assert f"image_root: '{root}'" in out and f"ann_root: '{root / 'annotation'}'" in out
    assert config.read_text(encoding="utf-8") == CONFIG_TEXT.replace(
        "'/export/share/datasets/vision/flickr30k/'", f"'{root}'"
    ).replace("ann_root: 'annotation'", f"ann_root: '{root / 'annotation'}'")

    # A second run finds everything done: no download, no extraction.
    before = mtimes(root / "Images")
    assert prep.main(["--root", str(root)]) == 0
    assert len(calls) == 1
    assert mtimes(root / "Images") == before


def test_extra_top_level_folder_in_zip_is_stripped(tmp_path, offline, capsys):
    fake = make_fake_kaggle_zip(tmp_path, 4, prefix="flickr30k/")
    root = tmp_path / "data"
    write_blip_annotations(root / "annotation", fake)

    assert prep.main(["--root", str(root), "--zip", str(fake.zip_path)]) == 0

    assert sorted(p.name for p in (root / "Images").iterdir()) == fake.image_names
    assert (root / "captions.txt").is_file() and not (root / "flickr30k").exists()
    assert f"image_root: '{root}'" in capsys.readouterr().out


def test_other_mirror_layout_is_planned_under_resolver_names(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("flickr30k_images/flickr30k_images/1.jpg", fake_image_bytes(1))
        archive.writestr("flickr30k_images/flickr30k_images/2.jpg", fake_image_bytes(2))
        archive.writestr("flickr30k_images/results.csv", "image_name| comment_number| comment\n")
        archive.writestr("__MACOSX/flickr30k_images/._1.jpg", b"junk")
        infos = archive.infolist()
    plan = prep.plan_zip(infos, Path("mirror.zip"))
    assert [target for _, target in plan.images] == [
        "flickr30k_images/flickr30k_images/1.jpg",
        "flickr30k_images/flickr30k_images/2.jpg",
    ]
    assert plan.captions[1] == "results.csv"


def test_missing_image_is_named_and_rerun_with_full_zip_only_adds_it(tmp_path, offline):
    fake = make_fake_kaggle_zip(tmp_path, 6, leave_out=("1002.jpg",), name="partial.zip")
    root = tmp_path / "data"
    write_blip_annotations(root / "annotation", fake)

    with pytest.raises(SystemExit) as excinfo:
        prep.main(["--root", str(root), "--zip", str(fake.zip_path)])
    message = error_text(excinfo)
    assert message.startswith("error: 1 images named by the annotations are missing or unreadable")
    assert f"{root / 'Images' / '1002.jpg'}: missing" in message
    assert str(root / prep.PROBLEMS_FILE) in message
    assert (root / prep.PROBLEMS_FILE).read_text() == f"{root / 'Images' / '1002.jpg'}\tmissing\n"
    assert not (root / prep.UNPACKED_MARKER).exists()  # the next run re-checks the zip

    before = mtimes(root / "Images")
    full = make_fake_kaggle_zip(tmp_path, 6)
    assert prep.main(["--root", str(root), "--zip", str(full.zip_path)]) == 0
    after = mtimes(root / "Images")
    assert set(after) - set(before) == {"1002.jpg"}
    assert {name: after[name] for name in before} == before  # finished files were not rewritten
    assert not (root / prep.PROBLEMS_FILE).exists()


def test_corrupt_jpeg_is_named_and_rerun_replaces_only_it(tmp_path, offline):
    fake = make_fake_kaggle_zip(tmp_path, 5, corrupt=("1001.jpg",), name="bad.zip")
    root = tmp_path / "data"
    write_blip_annotations(root / "annotation", fake)

    with pytest.raises(SystemExit) as excinfo:
        prep.main(["--root", str(root), "--zip", str(fake.zip_path)])
    message = error_text(excinfo)
    assert f"{root / 'Images' / '1001.jpg'}: unreadable" in message
    assert "truncated" in message.lower()
    assert "1000.jpg" not in message

    before = mtimes(root / "Images")
    good = make_fake_kaggle_zip(tmp_path, 5)
    assert prep.main(["--root", str(root), "--zip", str(good.zip_path)]) == 0
    after = mtimes(root / "Images")
    assert after["1001.jpg"] != before["1001.jpg"]
    assert {k: v for k, v in after.items() if k != "1001.jpg"} == {
        k: v for k, v in before.items() if k != "1001.jpg"
    }
    assert (root / "Images" / "1001.jpg").read_bytes() == fake_image_bytes(1)


def test_interrupted_extraction_resumes_without_redoing_finished_files(tmp_path, offline):
    fake = make_fake_kaggle_zip(tmp_path, 5)
    root = tmp_path / "data"
    write_blip_annotations(root / "annotation", fake)
    # A crash mid-way: two files done, one temp file half written, no completion marker.
    (root / "Images").mkdir(parents=True)
    for index in (0, 1):
        (root / "Images" / f"100{index}.jpg").write_bytes(fake_image_bytes(index))
    (root / "Images" / ".1002.jpg.partial").write_bytes(fake_image_bytes(2)[:10])
    before = mtimes(root / "Images")

    assert prep.main(["--root", str(root), "--zip", str(fake.zip_path)]) == 0

    after = mtimes(root / "Images")
    assert after["1000.jpg"] == before["1000.jpg"] and after["1001.jpg"] == before["1001.jpg"]
    assert sorted(n for n in after if not n.startswith(".")) == fake.image_names
    assert not (root / "Images" / ".1002.jpg.partial").exists()
    assert json.loads((root / prep.UNPACKED_MARKER).read_text())["files"] == 6


def test_skip_verify_checks_existence_but_not_decoding(tmp_path, offline):
    fake = make_fake_kaggle_zip(tmp_path, 4, corrupt=("1001.jpg",))
    root = tmp_path / "data"
    write_blip_annotations(root / "annotation", fake)
    assert prep.main(["--root", str(root), "--zip", str(fake.zip_path), "--skip-verify"]) == 0

    (root / "Images" / "1003.jpg").unlink()
    with pytest.raises(SystemExit) as excinfo:
        prep.main(["--root", str(root), "--skip-verify"])
    assert f"{root / 'Images' / '1003.jpg'}: missing" in error_text(excinfo)


def test_folder_unpacked_by_hand_is_used_without_download(tmp_path, monkeypatch, offline, capsys):
    def no_download(dataset, dest_dir):
        raise AssertionError("must not download when the images are already unpacked")

    monkeypatch.setattr(prep, "kaggle_download", no_download)
    fake = make_fake_kaggle_zip(tmp_path, 4)
    root = tmp_path / "data"
    image_dir = root / "flickr30k_images" / "flickr30k_images"  # the other mirror's layout
    image_dir.mkdir(parents=True)
    for index, image in enumerate(fake.image_names):
        (image_dir / image).write_bytes(fake_image_bytes(index))
    (root / "flickr30k_images" / "results.csv").write_text(
        "image_name| comment_number| comment\n"
        + "".join(f"{image}| {k}| {c}\n" for image in fake.image_names for k, c in enumerate(fake.captions[image])),
        encoding="utf-8",
    )
    write_blip_annotations(root / "annotation", fake)

    assert prep.main(["--root", str(root)]) == 0
    assert f"image_root: '{root}'" in capsys.readouterr().out
    layout = prep.find_layout(root)
    assert layout.captions_file == root / "flickr30k_images" / "results.csv"
    assert prep.consistency_report(layout) == []


def test_truncated_zip_says_to_delete_it(tmp_path, offline):
    fake = make_fake_kaggle_zip(tmp_path, 3)
    broken = tmp_path / "broken.zip"
    broken.write_bytes(fake.zip_path.read_bytes()[:200])
    with pytest.raises(SystemExit) as excinfo:
        prep.main(["--root", str(tmp_path / "data"), "--zip", str(broken)])
    message = error_text(excinfo)
    assert str(broken) in message and "Delete it and re-run" in message and "--zip" in message


def test_missing_kaggle_credentials_say_where_they_go(tmp_path, monkeypatch, offline):
    for variable in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "home" / ".config"))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "kaggle_config"))
    root = tmp_path / "data"

    with pytest.raises(SystemExit) as excinfo:
        prep.main(["--root", str(root)])  # the real kaggle_download: fails before any network use
    message = error_text(excinfo)
    assert message.startswith("error: Kaggle credentials not found")
    for needed in ("~/.kaggle/kaggle.json", "chmod 600", "KAGGLE_CONFIG_DIR", "KAGGLE_USERNAME", "KAGGLE_KEY",
                   "KAGGLE_API_TOKEN", "--zip PATH"):
        assert needed in message
    assert not (root / "Images").exists() and not (root / ".kaggle_download").exists()

    # Fixed by downloading elsewhere: the same command with --zip completes.
    fake = make_fake_kaggle_zip(tmp_path, 4)
    write_blip_annotations(root / "annotation", fake)
    assert prep.main(["--root", str(root), "--zip", str(fake.zip_path)]) == 0


def test_prepare_fake_flickr30k_gives_a_dataset_the_resolver_finds(tmp_path):
    from data.retrieval_dataset import resolve_image_path

    paths = prepare_fake_flickr30k(tmp_path, 4)
    test_records = json.loads((paths["ann_root"] / "flickr30k_test.json").read_text())
    found = resolve_image_path(str(paths["image_root"]), test_records[0]["image"])
    assert found == str(paths["image_root"] / "Images" / "1003.jpg")


def test_rejected_kaggle_credentials_say_how_to_replace_them(tmp_path, monkeypatch):
    class RejectingApi:
        def dataset_download_files(self, *args, **kwargs):
            raise RuntimeError("401 Client Error: Unauthorized for url")

    monkeypatch.setattr(prep, "_authenticated_kaggle_api", RejectingApi)
    with pytest.raises(SystemExit) as excinfo:
        prep.main(["--root", str(tmp_path / "data")])
    message = error_text(excinfo)
    assert message.startswith("error: Kaggle rejected the credentials (401 Client Error")
    assert "~/.kaggle/kaggle.json" in message and "KAGGLE_USERNAME" in message


def test_offline_annotations_say_what_to_copy_then_split_file_builds_them(tmp_path, offline):
    fake = make_fake_kaggle_zip(tmp_path, 4)
    root = tmp_path / "data"

    with pytest.raises(SystemExit) as excinfo:
        prep.main(["--root", str(root), "--zip", str(fake.zip_path)])
    message = error_text(excinfo)
    for split in ("train", "val", "test"):
        url = f"https://storage.googleapis.com/sfr-vision-language-research/datasets/flickr30k_{split}.json"
        assert f"{url} -> {root / 'annotation' / f'flickr30k_{split}.json'}" in message
    assert "--split-file dataset_flickr30k.json" in message
    assert not list((root / "annotation").glob("*.json"))  # no split invented

    before = mtimes(root / "Images")
    split_file = tmp_path / "dataset_flickr30k.json"
    split_file.write_text(json.dumps(karpathy_split(fake)), encoding="utf-8")
    assert prep.main(["--root", str(root), "--zip", str(fake.zip_path), "--split-file", str(split_file)]) == 0
    assert mtimes(root / "Images") == before  # extraction was not redone
    assert len(json.loads((root / "annotation" / "flickr30k_train.json").read_text())) == 10


def karpathy_split(fake: FakeKaggleZip) -> dict:
    """A Karpathy dataset_flickr30k.json for ``fake``; the first train image is 'restval'."""
    images = []
    for index, (image, split) in enumerate(split_of(fake.image_names).items()):
        sentences = [{"raw": text, "tokens": text.lower().split(), "sentid": 5 * index + k}
                     for k, text in enumerate(fake.captions[image])]
        images.append({"filename": image, "imgid": index, "split": "restval" if index == 0 else split,
                       "sentences": sentences, "sentids": [s["sentid"] for s in sentences]})
    return {"images": images, "dataset": "flickr30k"}


def test_split_file_gives_blip_records(tmp_path):
    split_file = tmp_path / "dataset_flickr30k.json"
    sentences = lambda *texts: [{"raw": t, "tokens": t.split()} for t in texts]  # noqa: E731
    split_file.write_text(json.dumps({"images": [
        {"filename": "1000092795.jpg", "split": "train", "sentences": sentences("Two young guys.", "A yard.")},
        {"filename": "10002456.jpg", "split": "restval", "sentences": sentences("Four men.")},
        {"filename": "1007129816.jpg", "split": "test", "sentences": sentences(*"abcde")},
        {"filename": "1009434119.jpg", "split": "val", "sentences": sentences(" A dog. ", "b", "c", "d", "e")},
    ]}), encoding="utf-8")

    records = prep.build_annotations_from_split(split_file)

    assert records["train"] == [
        {"image": "flickr30k-images/1000092795.jpg", "caption": "Two young guys.", "image_id": "1000092795"},
        {"image": "flickr30k-images/1000092795.jpg", "caption": "A yard.", "image_id": "1000092795"},
        {"image": "flickr30k-images/10002456.jpg", "caption": "Four men.", "image_id": "10002456"},
    ]
    assert records["test"] == [{"image": "flickr30k-images/1007129816.jpg", "caption": list("abcde")}]
    assert records["val"] == [{"image": "flickr30k-images/1009434119.jpg", "caption": ["A dog.", "b", "c", "d", "e"]}]


def test_split_file_with_unknown_split_names_it(tmp_path):
    split_file = tmp_path / "split.json"
    split_file.write_text(json.dumps({"images": [{"filename": "1.jpg", "split": "dev", "sentences": []}]}))
    with pytest.raises(prep.DataError, match=r"images\[0\] \(1.jpg\) has unknown split 'dev'"):
        prep.build_annotations_from_split(split_file)


def test_captions_txt_with_quoted_commas(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_text(
        "image,caption\n"
        "1000092795.jpg, Two young guys with shaggy hair look at their hands while hanging out in the yard .\n"
        '1000092795.jpg," Two young , White males are outside near many bushes ."\n'
        '10002456.jpg," Workers look down from up above , on a piece of equipment ."\n',
        encoding="utf-8",
    )
    assert prep.parse_captions_file(path) == {
        "1000092795.jpg": [
            "Two young guys with shaggy hair look at their hands while hanging out in the yard .",
            "Two young , White males are outside near many bushes .",
        ],
        "10002456.jpg": ["Workers look down from up above , on a piece of equipment ."],
    }


def test_results_csv_with_pipes(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text(
        "image_name| comment_number| comment\n"
        "1000092795.jpg| 0| Two young guys , with shaggy hair .\n"
        '1000092795.jpg| 1| A man says "hi" .\n'
        "2199200615.jpg| 4 A dog runs across the grass .\n",  # the mirror's one row without its 2nd '|'
        encoding="utf-8",
    )
    assert prep.parse_captions_file(path) == {
        "1000092795.jpg": ["Two young guys , with shaggy hair .", 'A man says "hi" .'],
        "2199200615.jpg": ["A dog runs across the grass ."],
    }


def test_update_config_keeps_comments_and_appends_missing_keys(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("# top\nimage_root: 'old'   # keep me\nother: 1\n", encoding="utf-8")
    prep.update_config(config, {"image_root": "'/new/it''s'", "ann_root": "'/ann'"})
    assert config.read_text() == "# top\nimage_root: '/new/it''s'   # keep me\nother: 1\nann_root: '/ann'\n"


def test_prepared_kaggle_download_is_evaluated_by_train_retrieval(tmp_path, fake_kaggle, offline, golden_checkpoint):
    """Kaggle replaced only at its network call; then `train_retrieval.py --evaluate` on the written config."""
    import shutil as _shutil

    import train_retrieval
    from conftest import REPO, TINY_MED_CONFIG, VOCAB, recall_fields

    calls, source = fake_kaggle
    fake = make_fake_kaggle_zip(tmp_path, 8)
    source["zip"] = fake.zip_path
    root = tmp_path / "data"
    write_blip_annotations(root / "annotation", fake)
    config = tmp_path / "retrieval_flickr.yaml"
    _shutil.copy(Path(REPO) / "configs" / "retrieval_flickr.yaml", config)
    assert prep.main(["--root", str(root), "--write-config", str(config)]) == 0
    assert calls and (root / "Images").is_dir()

    options = {"pretrained": golden_checkpoint, "vit": "{embed_dim: 64, depth: 2, num_heads: 2}",
               "med_config": TINY_MED_CONFIG, "tokenizer": VOCAB, "image_size": 32, "embed_dim": 16,
               "queue_size": 16, "batch_size_train": 8, "k_test": 128, "num_workers": 0}
    out = tmp_path / "eval"
    argv = ["--config", str(config), "--device", "cpu", "--evaluate", "--output_dir", str(out),
            "--options"] + [f"{k}={v}" for k, v in options.items()]
    assert train_retrieval.main(argv) == 0
    record = json.loads((out / "evaluate.txt").read_text())
    # Every metric of both splits is there; with one image per split each is 100 by construction.
    metrics = ("txt_r1", "txt_r5", "txt_r10", "txt_r_mean", "img_r1", "img_r5", "img_r10", "img_r_mean", "r_mean")
    assert recall_fields(record) == {f"{split}_{m}": 100.0 for split in ("val", "test") for m in metrics}
    assert record["recall_unit"] == "%" and record["dataset"] == "flickr" and record["images"] == {"val": 1, "test": 1}
