"""What writing output_dir/report/ costs next to an evaluation, at the Flickr 1K test size, on the CPU.

No model and no dataset needed: score matrices of the real shape (1,000 images x 5,000 captions, the top
k_test of each row re-scored, the rest -100, as evaluation leaves them) and JPEGs of Flickr's usual size
(500 x 375) written into a temporary folder. Times the parts of `write_evaluation_report` for one split:
ranks and top-10 ids, plots, thumbnails (only the images the page shows), the whole report; and, for scale,
`evaluation.recall_metrics` on the same matrices (what every evaluation already spends).

    python benchmarks/bench_report.py                         # Flickr 1K test size
    python benchmarks/bench_report.py --images 100 --k_test 16  # the CPU demo's test split
"""
from __future__ import annotations

import argparse
import os
import sys
import shutil
import tempfile
import time
from types import SimpleNamespace

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from evaluation import SCORE_FILL, recall_metrics  # noqa: E402
from report import SplitScores, summarize, write_evaluation_report  # noqa: E402
from report.plots import rank_histogram_png, recall_curve_png  # noqa: E402
from report.thumbs import write_thumbnails  # noqa: E402
from report.writer import images_shown, pick_queries, thumb_name  # noqa: E402


def fake_split(n_images: int, per_image: int, k_test: int, seed: int) -> tuple[SplitScores, dict, dict]:
    """Matrices shaped as evaluation's: similarities correlated with the truth, top k_test re-scored."""
    rng = np.random.default_rng(seed)
    n_texts = n_images * per_image
    txt2img = {t: t // per_image for t in range(n_texts)}
    img2txt = {i: list(range(i * per_image, (i + 1) * per_image)) for i in range(n_images)}
    truth = np.arange(n_images)[:, None] == (np.arange(n_texts) // per_image)[None, :]
    sims = (rng.normal(0.3, 0.1, (n_images, n_texts)) + 0.25 * truth).astype(np.float32)

    def rescored(rows: np.ndarray) -> np.ndarray:
        k = min(k_test, rows.shape[1])
        top = np.argpartition(-rows, k - 1, axis=1)[:, :k]
        scores = np.full(rows.shape, SCORE_FILL, dtype=np.float32)
        logits = rng.normal(0.0, 1.0, top.shape).astype(np.float32)
        np.put_along_axis(scores, top, np.take_along_axis(rows, top, axis=1) + logits, axis=1)
        return scores
    i2t, t2i = rescored(sims), rescored(np.ascontiguousarray(sims.T))
    return SplitScores(i2t, t2i, sims, {}), txt2img, img2txt


def write_jpegs(folder: str, n_images: int, size: tuple[int, int], seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, 'images'), exist_ok=True)
    ramp = np.linspace(0, 1, size[0])[None, :, None] * np.linspace(0, 1, size[1])[:, None, None]
    paths = []
    for i in range(n_images):
        colour = rng.uniform(40, 215, 3)
        pixels = np.clip(colour * (0.6 + 0.8 * ramp) + rng.normal(0, 12, (size[1], size[0], 3)), 0, 255)
        relative = f'images/{i:06d}.jpg'
        Image.fromarray(pixels.astype(np.uint8)).save(os.path.join(folder, relative), quality=90)
        paths.append(relative)
    return paths


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--images', type=int, default=1000)
    parser.add_argument('--captions_per_image', type=int, default=5)
    parser.add_argument('--k_test', type=int, default=128)
    parser.add_argument('--image_px', default='500x375', help='width x height of the JPEGs')
    parser.add_argument('--queries', type=int, default=24, help='report_queries')
    parser.add_argument('--thumb_px', type=int, default=128, help='report_thumb_px')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--keep', metavar='DIR', help='copy the report written here, to look at it')
    args = parser.parse_args(argv)
    width, height = map(int, args.image_px.split('x'))
    scores, txt2img, img2txt = fake_split(args.images, args.captions_per_image, args.k_test, args.seed)
    with tempfile.TemporaryDirectory() as folder:
        began = time.perf_counter()
        paths = write_jpegs(folder, args.images, (width, height), args.seed)
        print(f'setup: {args.images} JPEGs of {width}x{height} in {time.perf_counter() - began:.1f} s (not counted)')
        began = time.perf_counter()
        scores.metrics = recall_metrics(scores.i2t, scores.t2i, txt2img, img2txt)
        metrics_s = time.perf_counter() - began
        dataset = SimpleNamespace(image=paths, text=[f'caption {t}' for t in txt2img], txt2img=txt2img,
                                  img2txt=img2txt, image_root=folder)

        began = time.perf_counter()
        summary = summarize('test', scores, dataset.image, dataset.text, txt2img, args.k_test)
        summary_s = time.perf_counter() - began
        began = time.perf_counter()
        recall_curve_png(summary.txt_recall_at_k, summary.img_recall_at_k, 'Recall@K')
        rank_histogram_png(summary.i2t_rank, summary.t2i_rank, 'ranks')
        plots_s = time.perf_counter() - began
        (t2i_w, t2i_s), (i2t_w, i2t_s) = pick_queries(summary.t2i_rank, args.queries), \
            pick_queries(summary.i2t_rank, args.queries)
        shown = images_shown(summary, t2i_w + t2i_s, i2t_w + i2t_s)
        began = time.perf_counter()
        write_thumbnails({thumb_name('test', i): os.path.join(folder, paths[i]) for i in shown},
                         os.path.join(folder, 'thumbs_only'), args.thumb_px)
        thumbs_s = time.perf_counter() - began

        config = {'k_test': args.k_test, 'report_queries': args.queries, 'report_thumb_px': args.thumb_px,
                  'pretrained': '', 'dataset': 'flickr'}
        out = os.path.join(folder, 'run')
        began = time.perf_counter()
        index = write_evaluation_report(out, {'test': scores}, {'test': dataset}, config)
        report_s = time.perf_counter() - began
        size = sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(os.path.dirname(index))
                   for name in names)
        if args.keep:
            shutil.copytree(os.path.dirname(index), args.keep, dirs_exist_ok=True)
    print(f'recall_metrics (every evaluation, for scale): {metrics_s:.2f} s')
    print(f'ranks and top-10 ids: {summary_s:.2f} s; plots: {plots_s:.2f} s; '
          f'thumbnails: {thumbs_s:.2f} s for {len(shown)} images ({1000 * thumbs_s / max(1, len(shown)):.1f} ms each)')
    print(f'report {report_s:.2f} s for one split of {args.images} images / {len(txt2img)} captions, '
          f'{size / 1e6:.2f} MB')


if __name__ == '__main__':
    main()
