"""search.py: text -> images over a folder (with its index) and image -> captions, on the shared demo checkpoint.

The folder holds demo test images (the demo's generator, never trained on) whose captions are known; the
ranking is checked against a brute-force computation with the model's public methods, one pair at a time.
"""
from __future__ import annotations

import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch

from conftest import DEMO_CONFIG

import search
import utils
from config import load_config
from data import pre_caption
from data.image_folder import open_rgb, scan_images
from models import model_from_config
from transform import build_eval_transform

N_IMAGES = 16


def demo_test_images(demo_run, count: int, start: int = 0) -> list[tuple[str, list[str]]]:
    """(image file, its five captions) of demo test images start..start+count."""
    with open(demo_run['data'] / 'annotation' / 'demo_test.json') as f:
        records = json.load(f)[start:start + count]
    return [(str(demo_run['data'] / r['image']), r['caption']) for r in records]


@pytest.fixture
def photos(tmp_path, demo_run):
    """A folder of N_IMAGES demo test images, every third in a subfolder (the search is recursive)."""
    folder = tmp_path / 'photos'
    (folder / 'holiday').mkdir(parents=True)
    truth = {}
    for i, (image, captions) in enumerate(demo_test_images(demo_run, N_IMAGES)):
        relative = f'{"holiday/" if i % 3 == 0 else ""}{os.path.basename(image)}'
        shutil.copyfile(image, folder / relative)
        truth[relative] = captions
    return folder, truth


def options(demo_run, *extra) -> list[str]:
    return ['--options', f'pretrained={demo_run["checkpoint"]}', f'tokenizer={demo_run["vocab"]}', *extra]


def run_search(demo_run, tmp_path, *args, extra_options=()) -> tuple[int, list]:
    out = tmp_path / 'hits.json'
    code = search.main(['--config', DEMO_CONFIG, '--device', 'cpu', '--json', str(out), *args,
                        *options(demo_run, *extra_options)])
    return code, (json.loads(out.read_text()) if code == 0 else None)


def demo_model(demo_run, *extra):
    config = load_config(DEMO_CONFIG, [f'pretrained={demo_run["checkpoint"]}', f'tokenizer={demo_run["vocab"]}',
                                       *extra])
    return model_from_config(config).eval(), config


@torch.no_grad()
def brute_force(model, config, image_files: list[str], texts: list[str], top: int, k_test: int, image_queries: bool):
    """Per query (a text, or an image with `texts` its candidates): every candidate encoded on its own, ITC top
    `top`, the first min(top, k_test) re-scored with match_logits on the image tokens; (candidate, score, sim)."""
    transform = build_eval_transform(config['image_size'])
    images = [model.encode_image(transform(open_rgb(path)).unsqueeze(0)) for path in image_files]
    ids, mask = model.tokenize([pre_caption(t, config['max_words']) for t in texts])
    text_feat = model.encode_text(ids, mask)
    itm_ids = ids.clone()
    itm_ids[:, 0] = model.enc_token_id
    answers = []
    queries = range(len(images)) if image_queries else range(len(texts))
    for q in queries:
        if image_queries:
            sims = [float(images[q][1][0] @ text_feat[c]) for c in range(len(texts))]
        else:
            sims = [float(images[c][1][0] @ text_feat[q]) for c in range(len(images))]
        ranked = sorted(range(len(sims)), key=lambda c: -sims[c])[:top]
        k = min(top, k_test)
        scored = []
        for c in ranked[:k]:
            image, text = (q, c) if image_queries else (c, q)
            logit = model.match_logits(itm_ids[text:text + 1], mask[text:text + 1], image_embeds=images[image][0])
            scored.append((c, float(logit[0, 1]) + sims[c], sims[c]))
        scored.sort(key=lambda r: -r[1])
        answers.append(scored + [(c, None, sims[c]) for c in ranked[k:]])
    return answers


def assert_same_results(got: list[dict], want: list[tuple], label) -> None:
    assert [label(r) for r in got] == [c for c, _, _ in want]
    for r, (_, score, sim) in zip(got, want):
        assert r['sim'] == pytest.approx(sim, rel=1e-5, abs=1e-5)
        if score is None:
            assert r['score'] is None and r['itm'] is None
        else:  # score = matching logit + similarity
            assert r['score'] == pytest.approx(score, rel=1e-5, abs=1e-5)
            assert r['itm'] == pytest.approx(score - sim, rel=1e-5, abs=1e-5)


# ---------------------------------------------------------------------------------------------- must show 3
def test_each_caption_finds_its_image_and_the_ranking_equals_brute_force(demo_run, photos, tmp_path):
    folder, truth = photos
    queries = [captions[0] for captions in truth.values()]
    (tmp_path / 'queries.txt').write_text('\n'.join(queries) + '\n')
    html_out = tmp_path / 'page' / 'hits.html'
    code, hits = run_search(demo_run, tmp_path, '--images', str(folder), '--queries', str(tmp_path / 'queries.txt'),
                            '--top', '5', '--html', str(html_out), extra_options=['k_test=3'])
    assert code == 0
    assert [entry['query'] for entry in hits] == queries and all(len(e['results']) == 5 for e in hits)
    assert all(set(r) == {'path', 'score', 'sim', 'itm'} for e in hits for r in e['results'])
    # The first min(top, k_test) = 3 are re-ranked (score = itm + sim), the other 2 keep the ITC order.
    assert all(r['score'] is not None for e in hits for r in e['results'][:3])
    assert all(r['score'] is None for e in hits for r in e['results'][3:])

    found = [os.path.relpath(entry['results'][0]['path'], folder) == relative
             for entry, relative in zip(hits, truth)]
    # Measured: 14 of 16 at rank 1 (the demo checkpoint: 5 epochs, seed 42); chance is 1 in 16.
    assert sum(found) > len(found) / 2, found

    model, config = demo_model(demo_run)
    files = [str(folder / relative) for relative in sorted(truth)]  # the index's order: sorted paths
    want = brute_force(model, config, files, queries, top=5, k_test=3, image_queries=False)
    for entry, expected in zip(hits, want):
        assert_same_results(entry['results'], expected, lambda r: files.index(r['path']))

    assert (folder.parent / 'photos.blip_index.npz').is_file()  # next to the folder
    page = html_out.read_text()
    assert page.count('class="query t2i"') == len(queries) and page.count('<img src="hits_thumbs/') == 5 * len(queries)
    assert all((html_out.parent / 'hits_thumbs' / name).is_file() for name in os.listdir(html_out.parent / 'hits_thumbs'))


def test_index_reencodes_only_new_and_changed_files(demo_run, photos, tmp_path):
    folder, truth = photos
    model, config = demo_model(demo_run)
    encoded = []
    encode_image = model.encode_image
    model.encode_image = lambda image: encoded.append(image.shape[0]) or encode_image(image)
    encoder = search.ImageEncoder(model, config, torch.device('cpu'), None)
    identity = search.checkpoint_identity(config)
    index_path = str(tmp_path / 'photos.idx.npz')

    first, unreadable, count = search.update_index(encoder, str(folder), index_path, identity)
    assert sum(encoded) == count == N_IMAGES and not unreadable and first.paths == sorted(truth)
    written = os.stat(index_path).st_mtime_ns
    encoded.clear()
    again, _, count = search.update_index(encoder, str(folder), index_path, identity)
    assert sum(encoded) == count == 0 and os.stat(index_path).st_mtime_ns == written  # nothing to do
    np.testing.assert_array_equal(again.features, first.features)

    # Two images added (one in a new subfolder), one deleted: exactly the two new ones are encoded.
    added = demo_test_images(demo_run, 2, start=N_IMAGES)
    shutil.copyfile(added[0][0], folder / 'new_a.jpg')
    (folder / 'more').mkdir()
    shutil.copyfile(added[1][0], folder / 'more' / 'new_b.jpg')
    deleted = sorted(truth)[1]
    os.remove(folder / deleted)
    encoded.clear()
    updated, _, count = search.update_index(encoder, str(folder), index_path, identity)
    assert sum(encoded) == count == 2
    assert updated.paths == sorted(set(truth) - {deleted} | {'new_a.jpg', 'more/new_b.jpg'}) == list(scan_images(str(folder)))
    for path in set(truth) - {deleted}:  # the others keep their stored features, bit for bit
        np.testing.assert_array_equal(updated.features[updated.paths.index(path)], first.features[first.paths.index(path)])
    with torch.no_grad():
        direct = encode_image(encoder.transform(open_rgb(str(folder / 'new_a.jpg'))).unsqueeze(0))[1][0].numpy()
    np.testing.assert_allclose(updated.features[updated.paths.index('new_a.jpg')], direct, rtol=1e-5, atol=1e-6)
    assert search.ImageIndex.load(index_path).paths == updated.paths  # what was saved

    # A file rewritten (new size and mtime) is encoded again; another checkpoint re-encodes everything.
    shutil.copyfile(added[0][0], folder / sorted(truth)[0])
    encoded.clear()
    assert search.update_index(encoder, str(folder), index_path, identity)[2] == 1 == sum(encoded)
    encoded.clear()
    other = identity.replace('"mtime_ns": ', '"mtime_ns": 1')
    assert search.update_index(encoder, str(folder), index_path, other)[2] == len(updated.paths) == sum(encoded)


def test_unreadable_files_are_listed_and_skipped(demo_run, tmp_path, capsys):
    folder = tmp_path / 'mixed'
    folder.mkdir()
    for image, _ in demo_test_images(demo_run, 3):
        shutil.copyfile(image, folder / os.path.basename(image))
    (folder / 'broken.jpg').write_bytes(b'\xff\xd8\xff\xe0 this is not really a jpeg')
    (folder / 'empty.png').write_bytes(b'')
    (folder / 'notes.txt').write_text('not an image: ignored')
    code, hits = run_search(demo_run, tmp_path, '--images', str(folder), '--query', 'a red circle', '--top', '10')
    assert code == 0
    err = capsys.readouterr().err
    assert f'skipped unreadable file {folder / "broken.jpg"}' in err and f'skipped unreadable file {folder / "empty.png"}' in err
    paths = [os.path.basename(r['path']) for r in hits[0]['results']]
    assert len(paths) == 3 and not {'broken.jpg', 'empty.png', 'notes.txt'} & set(paths)


def test_a_folder_without_images_gives_a_clear_message(demo_run, tmp_path, capsys):
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'empty' / 'readme.txt').write_text('no pictures here')
    code, _ = run_search(demo_run, tmp_path, '--images', str(tmp_path / 'empty'), '--query', 'a red circle')
    err = capsys.readouterr().err.strip().splitlines()
    assert code == utils.EXIT_USER_ERROR and not (tmp_path / 'empty.blip_index.npz').exists()
    assert err[-1] == (f'error: --images {tmp_path / "empty"}: no images found (JPEG, PNG or WebP files, searched '
                       'recursively); point --images at a folder that holds some')
    code, _ = run_search(demo_run, tmp_path, '--images', str(tmp_path / 'nowhere'), '--query', 'a red circle')
    assert code == utils.EXIT_USER_ERROR and 'no such folder' in capsys.readouterr().err


def test_query_words_the_vocabulary_lacks_are_named_in_one_warning(demo_run, photos, tmp_path, caplog):
    folder, _ = photos
    model, _ = demo_model(demo_run)
    ids = model.tokenizer('a crimson dodecahedron')['input_ids']  # the demo's vocabulary: colours and shapes
    assert ids.count(model.tokenizer.unk_token_id) == 2 and model.tokenizer.unk_token == '[UNK]'
    with caplog.at_level(logging.WARNING, logger='search'):
        code, hits = run_search(demo_run, tmp_path, '--images', str(folder), '--query', 'A crimson dodecahedron!',
                                'a red circle', 'crimson', '--top', '2')
    assert code == 0 and len(hits) == 3  # results all the same, now with a word about them
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == ["Query words that the model's vocabulary does not have, each read as [UNK] (the model does "
                        "not see which word it was): 'crimson', 'dodecahedron'"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger='search'):
        assert run_search(demo_run, tmp_path, '--images', str(folder), '--query', 'a red circle')[0] == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_image_to_captions_ranks_its_own_captions_first(demo_run, tmp_path):
    (image, own), (_, other) = demo_test_images(demo_run, 2)
    captions = own + other
    (tmp_path / 'captions.txt').write_text('\n'.join(captions) + '\n')
    code, hits = run_search(demo_run, tmp_path, '--image', image, '--captions', str(tmp_path / 'captions.txt'),
                            '--top', '8', '--html', str(tmp_path / 'captions.html'))
    assert code == 0 and len(hits) == 1 and hits[0]['image'] == image
    results = hits[0]['results']
    assert all(set(r) == {'caption', 'score', 'sim', 'itm'} for r in results) and len(results) == 8
    assert results[0]['caption'] in own
    model, config = demo_model(demo_run)
    (want,) = brute_force(model, config, [image], captions, top=8, k_test=config['k_test'], image_queries=True)[:1]
    assert_same_results(results, want, lambda r: captions.index(r['caption']))
    assert 'class="query i2t"' in (tmp_path / 'captions.html').read_text()
    assert (tmp_path / 'captions_thumbs' / 'query.jpg').is_file()


def test_k_test_0_ranks_by_similarity_alone(demo_run, photos, tmp_path):
    """The contrastive-only protocol: the ITC order of brute force, no score, in both directions."""
    (image, own), (_, other) = demo_test_images(demo_run, 2)
    captions = own + other
    (tmp_path / 'captions.txt').write_text('\n'.join(captions) + '\n')
    code, hits = run_search(demo_run, tmp_path, '--image', image, '--captions', str(tmp_path / 'captions.txt'),
                            '--top', '8', extra_options=['k_test=0'])
    assert code == 0 and all(r['score'] is None and r['itm'] is None for r in hits[0]['results'])
    model, config = demo_model(demo_run)
    (want,) = brute_force(model, config, [image], captions, top=8, k_test=0, image_queries=True)
    assert_same_results(hits[0]['results'], want, lambda r: captions.index(r['caption']))
    code, hits = run_search(demo_run, tmp_path, '--images', str(photos[0]), '--query', captions[0], '--top', '3',
                            extra_options=['k_test=0'])
    assert code == 0 and len(hits[0]['results']) == 3 and all(r['score'] is None for r in hits[0]['results'])
    sims = [r['sim'] for r in hits[0]['results']]
    assert sims == sorted(sims, reverse=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_search_on_a_gpu_equals_the_cpu(demo_run, photos, tmp_path):
    folder, truth = photos
    queries = [captions[0] for captions in list(truth.values())[:4]]
    results = {}
    for device in ('cpu', 'cuda'):
        out = tmp_path / f'{device}.json'
        assert search.main(['--config', DEMO_CONFIG, '--device', device, '--images', str(folder), '--query', *queries,
                            '--index', str(tmp_path / f'{device}.npz'), '--json', str(out), *options(demo_run)]) == 0
        results[device] = json.loads(out.read_text())
    for cpu, gpu in zip(results['cpu'], results['cuda']):
        assert [r['path'] for r in gpu['results']] == [r['path'] for r in cpu['results']]
        for a, b in zip(cpu['results'], gpu['results']):
            assert b['score'] == pytest.approx(a['score'], abs=1e-3) and b['sim'] == pytest.approx(a['sim'], abs=1e-3)
