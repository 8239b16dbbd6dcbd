"""The CUDA path (skipped without a GPU): golden numbers, fast == reference evaluation, bf16, host syncs, torchrun."""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, TINY_KWARGS, assert_close, run_torchrun
from synthetic import write_colour_dataset

import evaluation
import utils
from models import blip_retrieval
from models.tokenizer import with_enc_token

sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
from common import count_host_syncs  # noqa: E402  (the benchmarks' counter, shared)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
CUDA = torch.device('cuda')


def t(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype, device=CUDA)


@pytest.fixture
def cuda_model(golden_checkpoint):
    utils.configure_precision('fp32', CUDA)
    return blip_retrieval(golden_checkpoint, **TINY_KWARGS).to(CUDA).eval()


def test_golden_features_and_scores_on_cuda(cuda_model, golden):
    with torch.no_grad():
        image_embeds, image_feat = cuda_model.encode_image(t(golden['images']))
        ids, mask = cuda_model.tokenize(golden['captions'])
        text_feat = cuda_model.encode_text(ids, mask)
    assert_close(image_feat, t(golden['image_feat']), 5)  # the original's outputs, other kernels (fp32 on the GPU)
    assert_close(text_feat, t(golden['text_feat']), 5)
    loader = [(t(golden['images']), None)]
    for mode in ('fast', 'reference'):
        i2t, t2i = evaluation.evaluate_scores(cuda_model, loader, golden['captions'], {'k_test': 3, 'eval_mode': mode},
                                              CUDA)
        assert_close(i2t, np.array(golden['score_matrix_i2t']), 5, mode)
        assert_close(t2i, np.array(golden['score_matrix_t2i']), 5, mode)


def test_golden_training_step_on_cuda(cuda_model, golden):
    ref = golden['train_forward_eval_mode']
    cuda_model.sample_hard_negatives = lambda a, b: (t(ref['neg_image_idx_for_text'], torch.long),
                                                     t(ref['neg_text_idx_for_image'], torch.long))
    batch = golden['train_batch']
    ids, mask = cuda_model.tokenize([golden['captions'][i] for i in batch['caption_rows']])
    out = cuda_model.forward_train(t(golden['images'])[batch['image_rows']], ids, mask, batch['alpha'],
                                   t(batch['idx'], torch.long))
    assert out.loss_ita.item() == pytest.approx(ref['loss_ita'], rel=1e-5)
    assert out.loss_itm.item() == pytest.approx(ref['loss_itm'], rel=1e-5)


def test_bf16_evaluation_keeps_recall(cuda_model, golden):
    loader = [(t(golden['images']), None)]
    txt2img = {int(k): v for k, v in golden['txt2img'].items()}
    img2txt = {int(k): v for k, v in golden['img2txt'].items()}
    config = {'k_test': golden['k_test']}
    autocast = utils.configure_precision('bf16', CUDA)
    i2t, t2i = evaluation.evaluate_scores(cuda_model, loader, golden['captions'], config, CUDA, autocast)
    utils.configure_precision('fp32', CUDA)
    i2t_32, t2i_32 = evaluation.evaluate_scores(cuda_model, loader, golden['captions'], config, CUDA)
    both = (t2i > -100) & (t2i_32 > -100)
    print('bf16 max score difference', np.abs(t2i - t2i_32)[both].max())
    assert evaluation.recall_metrics(i2t, t2i, txt2img, img2txt) == golden['itm_eval']


def test_fast_evaluation_waits_for_the_gpu_a_fixed_number_of_times(cuda_model, golden):
    """The plan is made on the host before scoring: one pair per batch (about 20 batches) must not add waits."""
    with torch.no_grad():
        image_embeds, image_feat = cuda_model.encode_image(t(golden['images']))
        ids, mask = cuda_model.tokenize(golden['captions'])
        text_feat = cuda_model.encode_text(ids, mask)
    itm_ids = with_enc_token(ids, cuda_model.enc_token_id)
    count = {pair_batch: count_host_syncs(lambda b=pair_batch: evaluation.fast_scores(
        cuda_model, image_embeds, image_feat, text_feat, itm_ids, mask, 3, pair_batch=b), CUDA)
        for pair_batch in (1, 1024)}
    print('host syncs of fast_scores by pair batch', count)
    assert count[1] == count[1024]


def test_torchrun_evaluate_on_one_gpu_gives_the_computed_recall(tmp_path, golden_checkpoint):
    """fp32: the recall of scores computed pair by pair on the CPU, exactly; bf16: within one query of it."""
    from test_train_retrieval import direct_scores
    from data import create_datasets
    data = write_colour_dataset(str(tmp_path / 'data'), n_train=8, n_val=6, n_test=6)
    options = {'image_root': data['image_root'], 'ann_root': data['ann_root'], 'pretrained': golden_checkpoint,
               'vit': '{embed_dim: 64, depth: 2, num_heads: 2}', 'med_config': TINY_KWARGS['med_config'],
               'tokenizer': TINY_KWARGS['tokenizer'], 'image_size': 32, 'embed_dim': 16, 'queue_size': 16,
               'k_test': 4, 'num_workers': 2}
    records = {}
    for precision in ('fp32', 'bf16'):
        out = tmp_path / precision
        args = [os.path.join(REPO, 'train_retrieval.py'), '--config',
                os.path.join(REPO, 'configs', 'retrieval_flickr.yaml'), '--evaluate', '--output_dir', str(out),
                '--options'] + [f'{k}={v}' for k, v in {**options, 'precision': precision}.items()]
        result = run_torchrun(args, nproc=1)
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]  # our errors are logged to stdout
        (line,) = (out / 'evaluate.txt').read_text().splitlines()
        records[precision] = json.loads(line)

    model = blip_retrieval(golden_checkpoint, **TINY_KWARGS).eval()
    datasets = create_datasets({'image_root': data['image_root'], 'ann_root': data['ann_root'], 'dataset': 'flickr',
                                'image_size': 32}, ('val', 'test'))
    for split, dataset in datasets.items():
        want = evaluation.recall_metrics(*direct_scores(model, dataset, k_test=4), dataset.txt2img, dataset.img2txt)
        for precision, record in records.items():
            got = {key: record[f'{split}_{key}'] for key in want if f'{split}_{key}' in record}
            assert got.keys() == want.keys(), precision
            if precision == 'fp32':
                assert got == pytest.approx(want), split
            else:  # bf16 may reorder a near-tie: one query's worth of recall at most
                one_query = {k: 100 / (len(dataset.text) if k.startswith('img') else len(dataset)) for k in want}
                assert all(abs(got[k] - want[k]) <= one_query[k] + 1e-9 for k in want
                           if k.startswith(('txt_r', 'img_r'))), (split, got, want)
