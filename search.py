"""Search your own images with a BLIP retrieval checkpoint: text -> images over a folder, or image -> captions.

    python search.py --config configs/retrieval_flickr.yaml --images ~/photos --query "a dog running on the beach"
    python search.py --config CONFIG --images DIR --queries queries.txt --top 20 --json hits.json --html hits.html
    python search.py --config CONFIG --image photo.jpg --captions captions.txt

The model comes from the config exactly as in train_retrieval.py (`pretrained`: URL or path, `--options`
overrides). The folder is read recursively (JPEG, PNG, WebP); its contrastive (ITC) image features are kept in
an index file, by default next to the folder (`DIR.blip_index.npz`), with the checkpoint's identity and every
file's size and mtime: a later run encodes only new or changed files and drops deleted ones.
A query is cleaned like a caption, ranked against every image by ITC similarity (a dense matmul: right at
tens of thousands of images), and its first min(top, k_test) results are re-ranked as in evaluation:
score = matching logit (itm) + similarity, on evaluation's fast path (`evaluation.fast_scores`). Results beyond
k_test keep their ITC order, with score and itm null (all of them with `k_test: 0`).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional, Sequence
from urllib.parse import urlparse

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

import evaluation
import utils
from atomic import atomic_write_bytes, atomic_write_text
from config import ConfigError, load_config
from data import DataError, pre_caption
from data.loaders import default_num_workers
from data.image_folder import ImageFileDataset, open_rgb, scan_images
from models import model_from_config
from models.checkpoint import CheckpointError, fetch_checkpoint
from models.tokenizer import TokenizerError
import report.html as html
from report.files import npz_bytes
from report.html import Hit
from report.thumbs import write_thumbnails
from transform import build_eval_transform

_logger = logging.getLogger('search')

INDEX_SUFFIX = '.blip_index.npz'
INDEX_VERSION = 1
# Image tokens kept between queries for the re-rank (each image's are needed by every query that ranks it).
EMBED_CACHE_IMAGES = 1024


class SearchError(RuntimeError):
    """Bad input to the search (folder, files, queries); the message says what to do."""


# ---------------------------------------------------------------------------------------------- the index
@dataclass
class ImageIndex:
    """ITC features of a folder's images, with what they were computed from."""
    identity: str               # JSON: checkpoint and the config keys that change image features
    paths: list[str]            # relative to the folder, with '/', sorted
    sizes: np.ndarray           # (N,) int64
    mtimes_ns: np.ndarray       # (N,) int64
    features: np.ndarray        # (N, embed_dim) float32, normalized

    def save(self, path: str) -> None:
        atomic_write_bytes(path, npz_bytes({
            'version': np.array(INDEX_VERSION), 'identity': np.array(self.identity), 'paths': np.array(self.paths, dtype=str),
            'sizes': self.sizes, 'mtimes_ns': self.mtimes_ns, 'features': self.features}))

    @classmethod
    def load(cls, path: str) -> Optional['ImageIndex']:
        """The index at `path`, or None when it is missing or not one (it is then rebuilt)."""
        if not os.path.exists(path):
            return None
        try:
            with np.load(path, allow_pickle=False) as archive:
                if int(archive['version']) != INDEX_VERSION:
                    return None
                return cls(str(archive['identity']), [str(p) for p in archive['paths']], archive['sizes'],
                           archive['mtimes_ns'], archive['features'].astype(np.float32))
        except Exception as error:  # a broken or foreign file: rebuild rather than fail
            _logger.warning('Ignoring the unreadable index %s (%s); rebuilding it', path, error)
            return None


def default_index_path(images_dir: str) -> str:
    """`photos/` -> `photos.blip_index.npz`, next to the folder."""
    return os.path.normpath(os.path.abspath(images_dir)) + INDEX_SUFFIX


def checkpoint_identity(config: dict) -> str:
    """What the image features depend on: the weights (file path, size and mtime) and the image-side config."""
    pretrained = config['pretrained']
    if not pretrained:
        weights = {'random_init_seed': config['seed']}
    else:
        path = fetch_checkpoint(pretrained)  # already fetched by the model: the cached or local file
        stat = os.stat(path)
        is_url = urlparse(pretrained).scheme in ('http', 'https')
        weights = {'pretrained': pretrained if is_url else os.path.abspath(pretrained),
                   'size': stat.st_size, 'mtime_ns': stat.st_mtime_ns}
    return json.dumps({'weights': weights, **{key: config[key] for key in
                                              ('vit', 'image_size', 'embed_dim', 'precision')}}, sort_keys=True)


class ImageEncoder:
    """Batches of the folder's images through `model.encode_image` (the eval transform, as evaluation)."""

    def __init__(self, model, config: dict, device: torch.device, autocast: Optional[Callable]):
        self.model, self.device, self.autocast = model, device, autocast
        self.transform = build_eval_transform(config['image_size'])
        self.image_size, self.batch_size = config['image_size'], config['batch_size_test']
        self.num_workers = default_num_workers(1) if config['num_workers'] is None else config['num_workers']

    def batches(self, folder: str, relative_paths: Sequence[str], unreadable: dict[str, str],
                desc: Optional[str] = None):
        """Yield (positions in `relative_paths`, image tokens, features) of the readable files, in batches;
        the unreadable ones go into `unreadable` with their problem. `desc`: show a progress bar (with ETA)."""
        dataset = ImageFileDataset(folder, list(relative_paths), self.transform, self.image_size)
        loader = DataLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers, shuffle=False)
        progress = tqdm(total=len(dataset), desc=desc, unit='img', disable=desc is None, file=sys.stderr)
        with progress, torch.no_grad():
            for images, positions, problems in loader:
                ok = [i for i, problem in enumerate(problems) if not problem]
                unreadable.update((dataset.relative_paths[int(positions[i])], problem)
                                  for i, problem in enumerate(problems) if problem)
                if ok:
                    with utils.autocast_context(self.autocast):
                        embeds, feats = self.model.encode_image(images[ok].to(self.device))
                    yield positions[ok].tolist(), embeds, feats.float()
                progress.update(len(problems))


def update_index(encoder: ImageEncoder, folder: str, index_path: str, identity: str
                 ) -> tuple[ImageIndex, dict[str, str], int]:
    """(the index of `folder`, its unreadable files with their problem, how many images were encoded).

    Files whose size and mtime match the stored index keep their features; new or changed ones are encoded;
    deleted ones are dropped. The index file is rewritten (atomically) only when something changed.
    """
    if not os.path.isdir(folder):
        raise SearchError(f'--images {folder}: no such folder')
    files = scan_images(folder)
    if not files:
        raise SearchError(f'--images {folder}: no images found (JPEG, PNG or WebP files, searched recursively); '
                          'point --images at a folder that holds some')
    old = ImageIndex.load(index_path)
    if old is not None and old.identity != identity:
        _logger.info('%s was built with another checkpoint or image config: encoding every image again', index_path)
        old = None
    known = {} if old is None else {p: i for i, p in enumerate(old.paths)}
    features: dict[str, np.ndarray] = {}
    for path, stamp in files.items():
        i = known.get(path)
        if i is not None and (int(old.sizes[i]), int(old.mtimes_ns[i])) == (stamp.size, stamp.mtime_ns):
            features[path] = old.features[i]
    todo = [path for path in files if path not in features]
    unreadable: dict[str, str] = {}  # not stored: tried again on the next run
    for positions, _, feats in encoder.batches(folder, todo, unreadable, desc='Indexing' if todo else None):
        for position, feat in zip(positions, feats.cpu().numpy()):
            features[todo[position]] = feat
    paths = [path for path in files if path in features]
    if not paths:
        raise SearchError(f'--images {folder}: none of its {len(files)} image files could be read '
                          f'(e.g. {next(iter(unreadable.items()), ("", ""))[0]}: '
                          f'{next(iter(unreadable.values()), "")}); replace or remove the broken files')
    embed_dim = encoder.model.vision_proj.out_features
    index = ImageIndex(identity, paths, np.array([files[p].size for p in paths], dtype=np.int64),
                       np.array([files[p].mtime_ns for p in paths], dtype=np.int64),
                       np.stack([features[p] for p in paths]).astype(np.float32).reshape(len(paths), embed_dim))
    encoded = len(todo) - len(unreadable)
    dropped = 0 if old is None else len(set(old.paths) - set(files))
    if old is None or encoded or old.paths != index.paths:
        try:
            index.save(index_path)
        except OSError as error:
            raise SearchError(f'cannot write the index {index_path} ({error}); pass --index PATH in a writable '
                              'folder') from None
    _logger.info('Index %s: %d images (%d encoded, %d unchanged, %d dropped, %d unreadable)', index_path, len(paths),
                 encoded, len(paths) - encoded, dropped, len(unreadable))
    return index, unreadable, encoded


# ---------------------------------------------------------------------------------------------- ranking
@dataclass
class Result:
    index: int                 # candidate: image position in the index, or caption number
    sim: float
    score: Optional[float]     # None beyond the re-ranked first k_test
    label: str                 # path or caption

    @property
    def itm(self) -> Optional[float]:
        return None if self.score is None else self.score - self.sim

    def as_json(self, key: str) -> dict:
        return {key: self.label, 'score': self.score, 'sim': self.sim, 'itm': self.itm}


def rerank(model, image_embeds, image_feat, text_feat, text_ids, text_mask, config: dict, autocast
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i2t scores, t2i scores, similarities) of every candidate pair, through evaluation's fast path.

    With one query (one text, or one image) every candidate is in the query's top k_test, so every pair is
    scored once, exactly as evaluation scores it.
    """
    k = max(image_feat.shape[0], text_feat.shape[0])
    i2t, t2i = evaluation.fast_scores(model, image_embeds, image_feat, text_feat, text_ids, text_mask, k, autocast=autocast,
                                      pair_batch=config['eval_pair_batch'], log_every=10 ** 9)
    sims = image_feat @ text_feat.t()  # the same product fast_scores added to the logits
    return i2t.cpu().numpy(), t2i.cpu().numpy(), sims.cpu().numpy()


def warn_unknown_words(tokenizer, texts: list[str], what: str) -> list[str]:
    """Name, in one warning, the words of the cleaned `texts` that the tokenizer reads as [UNK] (else a query like
    "a crimson dodecahedron" gets results without a word). Returns them, in order of appearance, each once."""
    unknown = list(dict.fromkeys(word for text in texts for word in text.split()
                                 if tokenizer.unk_token in tokenizer.tokenize(word)))
    if unknown:
        _logger.warning("%s that the model's vocabulary does not have, each read as %s (the model does not see which "
                        'word it was): %s', what, tokenizer.unk_token, ', '.join(map(repr, unknown)))
    return unknown


def _order(scores: np.ndarray) -> np.ndarray:
    """Best first, ties as evaluation ranks them (`np.argsort(score)[::-1]`)."""
    return np.argsort(scores)[::-1]


def search_images(model, encoder: ImageEncoder, folder: str, index: ImageIndex, queries: list[str], top: int,
                  config: dict) -> list[list[Result]]:
    """Each query's `top` images: ITC ranking over the index, the first min(top, k_test) re-ranked."""
    device, autocast = encoder.device, encoder.autocast
    cleaned = [pre_caption(q, config['max_words']) for q in queries]
    warn_unknown_words(model.tokenizer, cleaned, 'Query words')
    text_feat, text_ids, text_mask = evaluation.text_features(model, cleaned, device, autocast)
    features = torch.from_numpy(index.features).to(device)
    top = min(top, len(index.paths))
    top_sims, top_ids = (text_feat @ features.t()).topk(top, dim=1)
    k = min(top, config['k_test'])
    cache: OrderedDict[int, torch.Tensor] = OrderedDict()
    answers = []
    for q in tqdm(range(len(queries)), desc='Re-ranking', unit='query', disable=len(queries) < 2 or not k,
                  file=sys.stderr):
        if not k:  # k_test 0 (protocol itc): the similarity order, nothing re-ranked
            answers.append([Result(c, s, None, index.paths[c]) for c, s in zip(top_ids[q].tolist(),
                                                                                top_sims[q].tolist())])
            continue
        candidates = top_ids[q, :k].tolist()
        missing, unreadable = [c for c in candidates if c not in cache], {}
        for positions, embeds, _ in encoder.batches(folder, [index.paths[c] for c in missing], unreadable):
            for position, embed in zip(positions, embeds):
                cache[missing[position]] = embed
        if unreadable:
            raise SearchError(f'{", ".join(unreadable)} became unreadable since it was indexed; run the search again')
        embeds = torch.stack([cache[c] for c in candidates])
        _, t2i, sims = rerank(model, embeds, features[candidates], text_feat[q:q + 1], text_ids[q:q + 1],
                              text_mask[q:q + 1], config, autocast)
        results = [Result(candidates[o], float(sims[o, 0]), float(t2i[0, o]), index.paths[candidates[o]])
                   for o in _order(t2i[0])]
        results += [Result(c, float(s), None, index.paths[c])
                    for c, s in zip(top_ids[q, k:].tolist(), top_sims[q, k:].tolist())]
        answers.append(results)
        while len(cache) > max(EMBED_CACHE_IMAGES, k):
            cache.popitem(last=False)
    return answers


def search_captions(model, encoder: ImageEncoder, image_path: str, captions: list[str], top: int, config: dict
                    ) -> list[Result]:
    """The image's `top` captions: ITC ranking, the first min(top, k_test) re-ranked."""
    device, autocast = encoder.device, encoder.autocast
    try:
        image = encoder.transform(open_rgb(image_path)).unsqueeze(0).to(device)
    except (OSError, ValueError) as error:
        raise SearchError(f'--image {image_path}: cannot read it as an image ({error})') from None
    with torch.no_grad(), utils.autocast_context(autocast):
        image_embeds, image_feat = model.encode_image(image)
    image_feat = image_feat.float()
    cleaned = [pre_caption(c, config['max_words']) for c in captions]
    warn_unknown_words(model.tokenizer, cleaned, 'Caption words')
    text_feat, text_ids, text_mask = evaluation.text_features(model, cleaned, device, autocast)
    top = min(top, len(captions))
    top_sims, top_ids = (image_feat @ text_feat.t())[0].topk(top)
    k = min(top, config['k_test'])
    candidates = top_ids[:k].tolist()
    if not k:  # k_test 0 (protocol itc): the similarity order, nothing re-ranked
        return [Result(c, float(s), None, captions[c]) for c, s in zip(top_ids.tolist(), top_sims.tolist())]
    i2t, _, sims = rerank(model, image_embeds, image_feat, text_feat[candidates], text_ids[candidates],
                          text_mask[candidates], config, autocast)
    results = [Result(candidates[o], float(sims[0, o]), float(i2t[0, o]), captions[candidates[o]])
               for o in _order(i2t[0])]
    return results + [Result(c, float(s), None, captions[c]) for c, s in zip(top_ids[k:].tolist(),
                                                                             top_sims[k:].tolist())]


# ---------------------------------------------------------------------------------------------- output
def _print(title: str, results: list[Result]) -> None:
    print(title)
    for rank, r in enumerate(results, 1):
        score = '-' if r.score is None else f'{r.score:.4f}'
        itm = '-' if r.itm is None else f'{r.itm:.4f}'
        print(f'{rank:4d}. score {score:>8}  sim {r.sim:.4f}  itm {itm:>8}  {r.label}')


def write_html(out: str, title: str, sources: dict[str, str], blocks: list[Callable[[dict], str]],
               thumb_px: int) -> None:
    """`out` and the thumbnails of `sources` in `<out stem>_thumbs/` beside it (the page opens offline)."""
    folder = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    subdir = os.path.splitext(os.path.basename(out))[0] + '_thumbs'
    thumbs = write_thumbnails(sources, folder, thumb_px, subdir=subdir)
    body = f'<h1>{html.esc(title)}</h1>\n' + '\n'.join(block(thumbs) for block in blocks)
    atomic_write_text(out, html.page(title, body))


def images_page(out: str, title: str, queries: list[str], answers: list[list[Result]], thumb_px: int) -> None:
    """Each query with its images (labels are the images' paths)."""
    def block(query: str, results: list[Result]) -> Callable[[dict], str]:
        return lambda thumbs: html.t2i_query(None, query, [
            Hit(rank, r.index, r.sim, r.score, thumb=thumbs.get(f'{r.index:06d}.jpg'), text=r.label)
            for rank, r in enumerate(results)])
    sources = {f'{r.index:06d}.jpg': r.label for results in answers for r in results}
    write_html(out, title, sources, [block(q, results) for q, results in zip(queries, answers)], thumb_px)


def captions_page(out: str, image_path: str, results: list[Result], thumb_px: int) -> None:
    hits = [Hit(rank, r.index, r.sim, r.score, text=r.label) for rank, r in enumerate(results)]
    block = lambda thumbs: html.i2t_query(None, thumbs.get('query.jpg'), hits, note=image_path)
    write_html(out, f'Captions for {image_path}', {'query.jpg': image_path}, [block], thumb_px)


# ---------------------------------------------------------------------------------------------- command line
def read_lines(path: str, what: str) -> list[str]:
    try:
        with open(path, encoding='utf-8') as f:
            lines = [line.strip() for line in f]
    except OSError as error:
        raise SearchError(f'{what} {path}: cannot read it ({error.strerror or error})') from None
    lines = [line for line in lines if line]
    if not lines:
        raise SearchError(f'{what} {path} holds no text: write one per line')
    return lines


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', required=True, help='YAML config naming the model (as for train_retrieval.py)')
    parser.add_argument('--images', help='folder of images to search (recursive: JPEG, PNG, WebP)')
    parser.add_argument('--query', nargs='+', default=[], metavar='TEXT', help='one or more text queries')
    parser.add_argument('--queries', metavar='FILE', help='text queries, one per line')
    parser.add_argument('--image', metavar='PATH', help='the other direction: rank --captions for this image')
    parser.add_argument('--captions', metavar='FILE', help='candidate captions for --image, one per line')
    parser.add_argument('--top', type=int, default=10, help='results per query (default 10); the first '
                        'min(top, k_test) are re-ranked by the matching head')
    parser.add_argument('--index', metavar='PATH', help=f'index file (default: next to the folder, DIR{INDEX_SUFFIX})')
    parser.add_argument('--json', metavar='OUT', help='also write the results as JSON')
    parser.add_argument('--html', metavar='OUT', help='also write a gallery page (thumbnails beside it)')
    parser.add_argument('--device', choices=('cpu', 'cuda'), default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--options', nargs='+', default=[], metavar='KEY=VALUE', help='override config keys')
    args = parser.parse_args(argv)
    text_search = bool(args.query or args.queries)
    if args.image or args.captions:
        if not (args.image and args.captions) or args.images or text_search:
            parser.error('image -> text search takes --image PATH and --captions FILE (and no --images/--query)')
    elif not (args.images and text_search):
        parser.error('text search takes --images DIR and --query TEXT ... or --queries FILE')
    if args.query and args.queries:
        parser.error('pass --query or --queries, not both')
    if args.top < 1:
        parser.error('--top must be at least 1')
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format='%(levelname)s %(name)s: %(message)s')
    quiet = {name: logging.getLogger(name).level for name in ('evaluation', 'utils')}
    for name in quiet:  # the evaluation machinery's progress lines, once per query
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        config = load_config(args.config, args.options)
        config['seed'] = 42 if config['seed'] is None else config['seed']  # train_retrieval's default --seed
        if args.device == 'cuda' and not torch.cuda.is_available():
            raise SearchError('--device cuda: CUDA is not available here; use --device cpu')
        device = torch.device(args.device)
        utils.seed_everything(config['seed'])  # `pretrained: ''`: the same random weights on every run
        model = model_from_config(config).to(device).eval()
        autocast = utils.configure_precision(config['precision'], device)
        encoder = ImageEncoder(model, config, device, autocast)
        if args.image:
            captions = read_lines(args.captions, '--captions')
            results = search_captions(model, encoder, args.image, captions, args.top, config)
            _print(f'image: {args.image}', results)
            output = [{'image': args.image, 'results': [r.as_json('caption') for r in results]}]
            if args.html:
                captions_page(args.html, args.image, results, config['report_thumb_px'])
        else:
            queries = args.query or read_lines(args.queries, '--queries')
            index_path = args.index or default_index_path(args.images)
            index, unreadable, _ = update_index(encoder, args.images, index_path, checkpoint_identity(config))
            for path, problem in unreadable.items():
                print(f'skipped unreadable file {os.path.join(args.images, path)}: {problem}', file=sys.stderr)
            answers = search_images(model, encoder, args.images, index, queries, args.top, config)
            for number, (query, results) in enumerate(zip(queries, answers), 1):
                for r in results:
                    r.label = os.path.join(args.images, r.label)
                _print(f'query {number}: {query}', results)
            output = [{'query': q, 'results': [r.as_json('path') for r in results]} for q, results in zip(queries, answers)]
            if args.html:
                images_page(args.html, f'Search in {args.images}', queries, answers, config['report_thumb_px'])
        if args.json:
            atomic_write_text(args.json, json.dumps(output, indent=1) + '\n')
        if args.html:
            print(f'html: {args.html}')
    except (SearchError, ConfigError, DataError, CheckpointError, TokenizerError) as error:
        print(f'error: {error}', file=sys.stderr)
        return utils.EXIT_USER_ERROR
    finally:
        for name, level in quiet.items():
            logging.getLogger(name).setLevel(level)
    return 0


if __name__ == '__main__':
    sys.exit(main())
