"""The fast evaluation path against the straightforward one, on the same weights; bf16 against fp32."""
from __future__ import annotations

import os

import numpy as np
import torch

from conftest import REPO, VOCAB

import evaluation
import utils
from models import BLIP_Retrieval


def _recall(scores, txt2img, img2txt):
    return evaluation.recall_metrics(scores[0], scores[1], txt2img, img2txt)


def test_fast_equals_reference_on_a_base_size_model():
    """ViT-B / BERT-base at 384 px with random weights: 3 images, 9 captions of mixed lengths, k_test 4."""
    torch.manual_seed(0)
    model = BLIP_Retrieval(med_config=os.path.join(REPO, 'configs', 'med_config.json'), image_size=384, vit='base',
                           queue_size=8, tokenizer=VOCAB).eval()
    captions = ['a dog', 'two dogs play in the snow near a red fence', 'a man riding a bike down a steep hill',
                'people', 'a small child in a blue coat holds a balloon at the fair', 'a cat sleeping',
                'the skyline at night', 'three women laughing around a table full of food and drinks', 'a boat']
    images = torch.randn(3, 3, 384, 384, generator=torch.Generator().manual_seed(0))
    loader = [(images, None)]
    txt2img = {t: t // 3 for t in range(9)}
    img2txt = {i: [3 * i, 3 * i + 1, 3 * i + 2] for i in range(3)}
    fast = evaluation.evaluate_scores(model, loader, captions, {'k_test': 4, 'eval_pair_batch': 16}, torch.device('cpu'))
    ref = evaluation.evaluate_scores(model, loader, captions, {'k_test': 4, 'eval_mode': 'reference'},
                                     torch.device('cpu'))
    np.testing.assert_allclose(fast[0], ref[0], atol=1e-4)
    np.testing.assert_allclose(fast[1], ref[1], atol=1e-4)
    assert (fast[0] > -100).sum() == 3 * 4 and (fast[1] > -100).sum() == 9 * 3
    assert _recall(fast, txt2img, img2txt) == _recall(ref, txt2img, img2txt)


def test_bf16_evaluation_keeps_golden_recall(tiny_model, golden):
    loader = [(torch.tensor(golden['images']), None)]
    txt2img = {int(k): v for k, v in golden['txt2img'].items()}
    img2txt = {int(k): v for k, v in golden['img2txt'].items()}
    config = {'k_test': golden['k_test']}
    fp32 = evaluation.evaluate_scores(tiny_model, loader, golden['captions'], config, torch.device('cpu'))
    autocast = utils.configure_precision('bf16', torch.device('cpu'))
    bf16 = evaluation.evaluate_scores(tiny_model, loader, golden['captions'], config, torch.device('cpu'), autocast)
    utils.configure_precision('fp32', torch.device('cpu'))
    assert _recall(bf16, txt2img, img2txt) == _recall(fp32, txt2img, img2txt) == golden['itm_eval']
    # Entries re-scored in both precisions differ by bf16 rounding only (the largest seen: 5.3e-3).
    both = (bf16[1] > -100) & (fp32[1] > -100)
    assert np.abs(bf16[1] - fp32[1])[both].max() < 0.02
