"""Tests for data/: caption cleaning, annotations, datasets, samplers and loaders."""
from __future__ import annotations

import json
import os
import random
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import data.annotations as annotations
import data.retrieval_dataset as retrieval_dataset
from data import (
    DataError,
    ResumableDistributedSampler,
    RetrievalEvalDataset,
    RetrievalTrainDataset,
    annotation_file,
    annotation_url,
    create_datasets,
    create_eval_loader,
    create_train_loader,
    ensure_annotations,
    find_missing_images,
    load_annotation,
    pre_caption,
    resolve_image_path,
    set_loader_epoch,
    shard_range,
)
from transform import build_eval_transform, build_train_transform

FIXTURES = Path(__file__).parent / "fixtures"


# --------------------------------------------------------------------------- helpers
def _write_jpeg(path: Path, seed: int, size: tuple[int, int] = (40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def _write_json(path: Path, content) -> Path:
    path.write_text(json.dumps(content), encoding="utf-8")
    return path


@pytest.fixture
def image_root(tmp_path) -> Path:
    """Three images in the annotation layout (``flickr30k-images/<name>.jpg``)."""
    root = tmp_path / "flickr30k"
    for k in range(3):
        _write_jpeg(root / "flickr30k-images" / f"{k}.jpg", seed=k)
    return root


def _train_records() -> list[dict]:
    # image ids deliberately not in 0..N-1 order, with repeats
    ids = ["900", "900", "17", "5", "17", "900"]
    images = {"900": 0, "17": 1, "5": 2}
    return [
        {"image": f"flickr30k-images/{images[i]}.jpg", "caption": f"A Caption number {n}.", "image_id": i}
        for n, i in enumerate(ids)
    ]


def _eval_records() -> list[dict]:
    return [
        {"image": f"flickr30k-images/{k}.jpg", "caption": [f"Image {k}, caption {c}!" for c in range(5)]}
        for k in range(3)
    ]


# --------------------------------------------------------------------------- captions
def test_pre_caption_matches_golden_captions():
    golden = json.loads((FIXTURES / "tiny_golden.json").read_text(encoding="utf-8"))
    assert len(golden["raw_captions"]) == 8
    for raw, cleaned in zip(golden["raw_captions"], golden["captions"]):
        assert pre_caption(raw) == cleaned


def test_pre_caption_truncates_to_max_words_and_strips():
    assert pre_caption("One two three four five\n", max_words=3) == "one two three"
    assert pre_caption("  (Hello)   World!  ") == "hello world"


# --------------------------------------------------------------------------- annotation files
def test_annotation_names_and_urls():
    assert annotation_file("ann", "flickr", "train") == os.path.join("ann", "flickr30k_train.json")
    assert annotation_file("ann", "coco", "val") == os.path.join("ann", "coco_karpathy_val.json")
    assert annotation_file("ann", "mine", "test") == os.path.join("ann", "mine_test.json")
    assert annotation_url("flickr", "test") == (
        "https://storage.googleapis.com/sfr-vision-language-research/datasets/flickr30k_test.json"
    )
    assert annotation_url("mine", "test") is None


def test_load_annotation_accepts_valid_files(tmp_path):
    train = load_annotation(str(_write_json(tmp_path / "t.json", _train_records())), "train")
    val = load_annotation(str(_write_json(tmp_path / "v.json", _eval_records())), "val")
    assert len(train) == 6 and len(val) == 3


@pytest.mark.parametrize(
    "split, records, message",
    [
        ("train", [{"image": "a.jpg", "caption": "x", "image_id": 1}, {"image": "b.jpg", "caption": "y"}],
         r"record 1: field 'image_id' is missing"),
        ("train", [{"caption": "x", "image_id": 1}], r"record 0: field 'image'"),
        ("val", [{"image": "a.jpg", "caption": ["x"]}, {"image": "b.jpg", "caption": "not a list"}],
         r"record 1: field 'caption' .*list of strings"),
        ("test", [{"image": "a.jpg", "caption": []}], r"record 0: field 'caption'"),
        ("train", {"image": "a.jpg"}, r"is a JSON dict; expected a JSON list"),
        ("val", [], r"is an empty list"),
    ],
)
def test_load_annotation_errors_name_file_record_and_format(tmp_path, split, records, message):
    path = _write_json(tmp_path / "bad.json", records)
    with pytest.raises(DataError, match=message) as info:
        load_annotation(str(path), split)
    assert str(path) in str(info.value)
    assert '"image"' in str(info.value)  # the expected format is spelled out


def test_load_annotation_bad_json_names_file_and_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"image": "a.jpg",\n  "caption": oops}\n]', encoding="utf-8")
    with pytest.raises(DataError, match=r"broken\.json is not valid JSON \(line 3"):
        load_annotation(str(path), "train")


def test_load_annotation_missing_file_points_to_ensure_annotations(tmp_path):
    with pytest.raises(DataError, match="does not exist.*ensure_annotations"):
        load_annotation(str(tmp_path / "nope.json"), "train")


def test_ensure_annotations_without_network_lists_paths_and_urls(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    ann_root = tmp_path / "annotation"
    with pytest.raises(DataError) as info:
        ensure_annotations(str(ann_root), "flickr")
    message = str(info.value)
    for split in ("train", "val", "test"):
        assert os.path.join(str(ann_root), f"flickr30k_{split}.json") in message
        assert annotation_url("flickr", split) in message
    assert "copy them into" in message and "ann_root" in message
    assert os.listdir(ann_root) == []  # no partial downloads left behind


def test_ensure_annotations_downloads_only_missing_files(tmp_path, monkeypatch):
    ann_root = tmp_path / "annotation"
    ann_root.mkdir()
    _write_json(ann_root / "coco_karpathy_val.json", _eval_records())
    fetched = []

    def fake_download(url: str, dest: str) -> None:
        fetched.append(url)
        Path(dest).write_text("[]", encoding="utf-8")

    monkeypatch.setattr(annotations, "_download_file", fake_download)
    paths = ensure_annotations(str(ann_root), "coco")
    assert set(paths) == {"train", "val", "test"}
    assert all(os.path.isfile(p) for p in paths.values())
    assert sorted(fetched) == sorted(annotation_url("coco", s) for s in ("train", "test"))


def test_ensure_annotations_unknown_dataset_explains_expected_files(tmp_path):
    with pytest.raises(DataError, match="no download URL") as info:
        ensure_annotations(str(tmp_path), "mydata", splits=("train", "test"))
    message = str(info.value)
    assert "mydata_train.json" in message and "mydata_test.json" in message
    assert '"caption": ["<text>"' in message


# --------------------------------------------------------------------------- image paths
def test_resolve_image_path_annotation_layout(image_root):
    expected = os.path.join(str(image_root), "flickr30k-images", "1.jpg")
    assert resolve_image_path(str(image_root), "flickr30k-images/1.jpg") == expected
    assert resolve_image_path(str(image_root), "flickr30k-images/99.jpg") is None


def test_resolve_image_path_kaggle_layouts(tmp_path):
    _write_jpeg(tmp_path / "kaggle" / "Images" / "123.jpg", seed=0)
    _write_jpeg(tmp_path / "nested" / "flickr30k_images" / "flickr30k_images" / "123.jpg", seed=0)
    assert resolve_image_path(str(tmp_path / "kaggle"), "flickr30k-images/123.jpg") == str(
        tmp_path / "kaggle" / "Images" / "123.jpg")
    assert resolve_image_path(str(tmp_path / "nested"), "flickr30k-images/123.jpg") == str(
        tmp_path / "nested" / "flickr30k_images" / "flickr30k_images" / "123.jpg")


def test_resolver_tries_the_remembered_layout_first(tmp_path, monkeypatch):
    for k in range(3):
        _write_jpeg(tmp_path / "Images" / f"{k}.jpg", seed=k)
    resolver = retrieval_dataset.ImagePathResolver(str(tmp_path))
    assert resolver.resolve("flickr30k-images/0.jpg") is not None
    checked = []
    real_isfile = os.path.isfile
    monkeypatch.setattr(retrieval_dataset.os.path, "isfile", lambda p: checked.append(p) or real_isfile(p))
    assert resolver.resolve("flickr30k-images/2.jpg") == os.path.join(str(tmp_path), "Images", "2.jpg")
    assert len(checked) == 1


def test_find_missing_images_reports_missing_and_corrupt(image_root):
    (image_root / "flickr30k-images" / "bad.jpg").write_bytes(b"not a jpeg")
    paths = ["flickr30k-images/0.jpg", "flickr30k-images/bad.jpg", "flickr30k-images/gone.jpg"]
    assert find_missing_images(str(image_root), paths) == ["flickr30k-images/gone.jpg"]
    assert find_missing_images(str(image_root), paths, check_open=True) == [
        "flickr30k-images/bad.jpg", "flickr30k-images/gone.jpg"]


# --------------------------------------------------------------------------- datasets
def _train_dataset(image_root: Path, seed: int = 0) -> RetrievalTrainDataset:
    return RetrievalTrainDataset(_train_records(), build_train_transform(16), str(image_root), seed=seed)


def test_train_dataset_remaps_image_ids_in_order_of_appearance(image_root):
    dataset = _train_dataset(image_root)
    assert len(dataset) == 6
    assert [dataset[i][2] for i in range(6)] == [0, 0, 1, 2, 1, 0]
    image, caption, _ = dataset[3]
    assert caption == "a caption number 3"
    assert image.shape == (3, 16, 16)
    assert dataset.image_paths() == ["flickr30k-images/0.jpg", "flickr30k-images/1.jpg", "flickr30k-images/2.jpg"]


def _all_images(dataset: Dataset, num_workers: int) -> torch.Tensor:
    loader = DataLoader(dataset, batch_size=2, shuffle=False, num_workers=num_workers)
    return torch.cat([images for images, _, _ in loader])


def test_train_augmentation_depends_only_on_seed_epoch_index(image_root):
    dataset = _train_dataset(image_root, seed=3)
    dataset.set_epoch(1)
    serial = _all_images(dataset, num_workers=0)
    parallel = _all_images(dataset, num_workers=2)
    assert torch.equal(serial, parallel)
    assert torch.equal(dataset[4][0], serial[4])
    # samples 0 and 1 share an image but get their own augmentation
    assert not torch.equal(serial[0], serial[1])
    dataset.set_epoch(2)
    assert not torch.equal(dataset[4][0], serial[4])
    other_seed = _train_dataset(image_root, seed=4)
    other_seed.set_epoch(1)
    assert not torch.equal(other_seed[4][0], serial[4])


def test_train_dataset_leaves_global_rngs_untouched(image_root):
    dataset = _train_dataset(image_root)
    torch.manual_seed(11)
    random.seed(11)
    np.random.seed(11)
    torch_state, python_state, numpy_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    dataset[0]
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == python_state
    assert np.array_equal(np.random.get_state()[1], numpy_state[1])


def test_train_dataset_missing_or_corrupt_image_names_file(image_root):
    records = _train_records()
    records[0]["image"] = "flickr30k-images/missing.jpg"
    records[1]["image"] = "flickr30k-images/corrupt.jpg"
    (image_root / "flickr30k-images" / "corrupt.jpg").write_bytes(b"\xff\xd8 truncated")
    dataset = RetrievalTrainDataset(records, build_train_transform(16), str(image_root))
    with pytest.raises(DataError, match=r"missing\.jpg.*not found.*image_root"):
        dataset[0]
    with pytest.raises(DataError, match=r"cannot read image .*corrupt\.jpg"):
        dataset[1]


def test_eval_dataset_index_maps(image_root):
    dataset = RetrievalEvalDataset(_eval_records(), build_eval_transform(16), str(image_root))
    assert len(dataset) == 3 and len(dataset.text) == 15
    assert dataset.text[7] == "image 1, caption 2"
    assert dataset.image == [f"flickr30k-images/{k}.jpg" for k in range(3)]
    assert dataset.img2txt == {0: [0, 1, 2, 3, 4], 1: [5, 6, 7, 8, 9], 2: [10, 11, 12, 13, 14]}
    assert dataset.txt2img == {t: t // 5 for t in range(15)}
    image, index = dataset[2]
    assert index == 2 and image.shape == (3, 16, 16)
    assert torch.equal(image, dataset[2][0])


def test_create_datasets_from_config(tmp_path, image_root):
    ann_root = tmp_path / "annotation"
    ann_root.mkdir()
    _write_json(ann_root / "flickr30k_train.json", _train_records())
    _write_json(ann_root / "flickr30k_val.json", _eval_records())
    config = {"image_root": str(image_root), "ann_root": str(ann_root), "dataset": "flickr", "image_size": 24}
    datasets = create_datasets(config, splits=("train", "val"))
    assert isinstance(datasets["train"], RetrievalTrainDataset)
    assert isinstance(datasets["val"], RetrievalEvalDataset)
    assert datasets["train"][0][0].shape == (3, 24, 24)
    expected = build_eval_transform(24)(Image.open(image_root / "flickr30k-images" / "1.jpg").convert("RGB"))
    assert torch.equal(datasets["val"][1][0], expected)
    with pytest.raises(DataError, match="flickr30k_test.json does not exist"):
        create_datasets(config, splits=("test",))


# --------------------------------------------------------------------------- samplers and loaders
class _IndexDataset(Dataset):
    """Items shaped like training samples, made from their index; records the epoch it was set to."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.epoch = None
        self.name = "the index set"

    def __len__(self) -> int:
        return self.n

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, int]:
        return torch.full((1,), float(index)), f"caption {index}", index


@pytest.mark.parametrize("n, world_size", [(23, 1), (23, 4), (24, 3)])
def test_sampler_matches_torch_distributed_sampler(n, world_size):
    dataset = _IndexDataset(n)
    for epoch in (0, 5):
        shares = []
        for rank in range(world_size):
            ours = ResumableDistributedSampler(dataset, world_size=world_size, rank=rank, seed=7)
            ours.set_epoch(epoch)
            theirs = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=7,
                                        drop_last=True)
            theirs.set_epoch(epoch)
            assert list(ours) == list(theirs)
            assert len(ours) == len(theirs)
            shares.append(list(ours))
        union = [i for share in shares for i in share]
        assert len(union) == len(set(union)) == n - n % world_size


def test_sampler_shuffles_and_is_deterministic_per_epoch():
    sampler = ResumableDistributedSampler(_IndexDataset(50), world_size=1, rank=0, seed=1)
    first = list(sampler)
    assert first != list(range(50)) and sorted(first) == list(range(50))
    assert list(sampler) == first
    sampler.set_epoch(1)
    assert list(sampler) != first


def test_sampler_start_batch_gives_the_tail_of_the_epoch():
    sampler = ResumableDistributedSampler(_IndexDataset(40), world_size=2, rank=1, seed=0)
    sampler.set_epoch(3)
    full = list(sampler)
    sampler.set_start_batch(2, batch_size=4)
    assert list(sampler) == full[8:] and len(sampler) == 12
    sampler.set_epoch(4)  # a new epoch starts from its first batch
    assert len(list(sampler)) == 20
    with pytest.raises(ValueError, match="start batch 6"):
        sampler.set_start_batch(6, batch_size=4)


def test_accum_steps_loader_gives_each_virtual_rank_the_batches_of_that_rank():
    """2 processes x accum_steps 2: micro-batch j of step s of process p is batch s of rank 2p + j of 4 ranks;
    a resumed epoch starts at a step (all micro-batches of it)."""
    dataset = _IndexDataset(43)  # 10 per rank, 2 batches of 4 and 2 left over
    ranks = [[idx.tolist() for _, _, idx in create_train_loader(dataset, 4, 0, rank=r, world_size=4, seed=3,
                                                                 epoch=1)] for r in range(4)]
    for process in range(2):
        loader = create_train_loader(dataset, 4, 0, rank=process, world_size=2, seed=3, epoch=1, accum_steps=2)
        micro = [idx.tolist() for _, _, idx in loader]
        assert len(loader) == len(micro) == 4
        assert micro == [ranks[2 * process + j][step] for step in range(2) for j in range(2)]
        set_loader_epoch(loader, 1, start_batch=1)
        assert [idx.tolist() for _, _, idx in loader] == micro[2:]


def test_train_loader_resume_yields_remaining_batches():
    dataset = _IndexDataset(30)
    full = [idx.tolist() for _, _, idx in create_train_loader(dataset, 4, 0, rank=0, world_size=2, seed=5, epoch=2)]
    assert dataset.epoch == 2
    assert len(full) == 3  # 15 samples per rank, drop_last
    resumed_loader = create_train_loader(dataset, 4, 0, rank=0, world_size=2, seed=5, epoch=2, start_batch=1)
    assert len(resumed_loader) == 2
    assert [idx.tolist() for _, _, idx in resumed_loader] == full[1:]
    set_loader_epoch(resumed_loader, 3)
    assert dataset.epoch == 3 and len(resumed_loader) == 3
    assert [idx.tolist() for _, _, idx in resumed_loader] != full


def test_train_loader_rejects_batch_larger_than_dataset():
    with pytest.raises(ValueError, match=r"batch size 8 x 2 processes is larger than the 10 training samples in "
                                         r"the index set"):
        create_train_loader(_IndexDataset(10), 8, 0, rank=0, world_size=2, seed=0)


@pytest.mark.parametrize("n, world_size", [(10, 3), (2, 4), (9, 1), (0, 2)])
def test_shard_ranges_cover_everything_once(n, world_size):
    ranges = [shard_range(n, rank, world_size) for rank in range(world_size)]
    covered = [i for start, end in ranges for i in range(start, end)]
    assert covered == list(range(n))
    sizes = [end - start for start, end in ranges]
    assert max(sizes) - min(sizes) <= 1


def test_eval_loader_gives_each_rank_its_contiguous_shard():
    dataset = _IndexDataset(10)
    per_rank = []
    for rank in range(3):
        loader = create_eval_loader(dataset, batch_size=3, num_workers=0, rank=rank, world_size=3)
        assert loader.dataset is dataset
        per_rank.append([i for _, _, idx in loader for i in idx.tolist()])
    assert per_rank == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]


def test_train_batches_collate_to_tensors_and_strings(image_root):
    loader = create_train_loader(_train_dataset(image_root), batch_size=3, num_workers=0, rank=0, world_size=1,
                                 seed=0)
    images, captions, idx = next(iter(loader))
    assert images.shape == (3, 3, 16, 16)
    assert isinstance(captions, list) and all(isinstance(c, str) for c in captions)
    assert idx.dtype == torch.int64 and idx.shape == (3,)
