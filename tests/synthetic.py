"""A small learnable retrieval dataset in the BLIP annotation format, written by the tests themselves."""
from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

# Colour words that are single WordPiece tokens in bert-base-uncased.
COLOURS = {'red': (220, 30, 30), 'green': (30, 170, 40), 'blue': (40, 70, 230), 'yellow': (240, 225, 30),
           'purple': (140, 40, 170), 'orange': (250, 140, 20), 'white': (245, 245, 245), 'black': (10, 10, 10),
           'pink': (250, 150, 200), 'brown': (120, 70, 20), 'gray': (128, 128, 128), 'cyan': (0, 220, 220)}
NOUNS = ('picture', 'photo', 'image', 'square', 'frame')


def write_colour_dataset(root: str, n_train: int = 48, n_val: int = 8, n_test: int = 8, size: int = 32,
                         seed: int = 0, dataset: str = 'flickr') -> dict:
    """Images filled with one of 12 colours plus noise; five captions that name the colour.

    Layout as the real Flickr30k files: `flickr30k-images/<id>.jpg`, annotation/flickr30k_{split}.json.
    """
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    image_dir = os.path.join(root, 'flickr30k-images')
    ann_root = os.path.join(root, 'annotation')
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(ann_root, exist_ok=True)
    prefix = {'flickr': 'flickr30k', 'coco': 'coco_karpathy'}.get(dataset, dataset)
    counter = 0
    for split, count in (('train', n_train), ('val', n_val), ('test', n_test)):
        records = []
        for i in range(count):
            colour = names[(i + {'train': 0, 'val': 3, 'test': 7}[split]) % len(names)]
            pixels = np.array(COLOURS[colour], dtype=np.float32) + rng.normal(0, 12, (size, size, 3))
            name = f'{split}{i:04d}'
            relative = f'flickr30k-images/{name}.jpg'
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(os.path.join(root, relative), quality=95)
            captions = [f'a {colour} {noun}.' for noun in NOUNS]
            if split == 'train':
                # Images of one colour share an id: they are positives of each other, so the matching head's
                # hard negatives always show another colour and there is something to learn.
                records += [{'image': relative, 'caption': c, 'image_id': colour} for c in captions]
            else:
                records.append({'image': relative, 'caption': captions})
            counter += 1
        with open(os.path.join(ann_root, f'{prefix}_{split}.json'), 'w') as f:
            json.dump(records, f)
    return {'image_root': root, 'ann_root': ann_root}
