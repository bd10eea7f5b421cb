"""Public pretraining for the default imaging backbone: synthetic, hospital-free images.

A real imaging base is a model pretrained on public data; fedlora's default backbone
(the demo ViT, also what ``fedlora model init dicom-classification`` makes without
``--from``) gets the same treatment from public synthetic images. They live in
``common`` because both the simulation and the coordinator's ``model init`` build that
backbone, and ``common`` may import neither ``simulations`` nor ``client``.

The drawing (a body outline, bright round blobs, noise) is the same as the synthetic
hospitals' (``simulations/generators/dicom.py``), so the backbone learns what a bright
focal structure looks like without ever seeing a site's images or labels; a test keeps
the two drawings identical.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import torch

logger = logging.getLogger(__name__)

NOISE_SD = 0.025
LESION_CONTRAST = 0.75  # display units: +300 HU on a 400 HU wide CT window
TISSUE_LEVEL = 0.5
SOURCE_SIDE = 64
"""Side the images are drawn at before box-averaging down to the model's side."""
PRETEXT_CLASSES = 3
"""The pretext label: 0, 1 or 2 blobs."""
PRETEXT_BATCH = 64

Progress = Callable[[int, int], None]
"""Called with (steps done, steps in all) while pretraining."""


def _grid(size: int) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Pixel-centre coordinates in [0, 1)."""
    axis = (np.arange(size, dtype=np.float64) + 0.5) / size
    yy, xx = np.meshgrid(axis, axis, indexing="ij")
    return yy, xx


def anatomy(rng: np.random.Generator, size: int, outside: float) -> npt.NDArray[np.float64]:
    """A noiseless body: an ellipse of soft tissue with a few smooth, faint structures."""
    yy, xx = _grid(size)
    cy, cx = 0.5 + rng.normal(0, 0.02, size=2)
    ay, ax = rng.uniform(0.36, 0.46), rng.uniform(0.38, 0.47)
    radius = np.sqrt(((yy - cy) / ay) ** 2 + ((xx - cx) / ax) ** 2)
    body = 1.0 / (1.0 + np.exp((radius - 1.0) / 0.03))
    tissue = np.full_like(yy, TISSUE_LEVEL)
    for _ in range(int(rng.integers(2, 5))):
        by, bx = rng.uniform(0.25, 0.75, size=2)
        sigma = rng.uniform(0.06, 0.18)
        amplitude = rng.uniform(-0.09, 0.09)
        tissue += amplitude * np.exp(-((yy - by) ** 2 + (xx - bx) ** 2) / (2 * sigma**2))
    image: npt.NDArray[np.float64] = outside + (tissue - outside) * body
    return image


def lesion(rng: np.random.Generator, size: int) -> npt.NDArray[np.float64]:
    """A bright, roughly round blob (radius 10-15 % of the side) in the central region."""
    yy, xx = _grid(size)
    cy, cx = rng.uniform(0.32, 0.68, size=2)
    base_radius = rng.uniform(0.10, 0.15)
    theta = np.arctan2(yy - cy, xx - cx)
    wobble = 1.0 + 0.08 * np.sin(3 * theta + rng.uniform(0, 2 * math.pi))
    distance = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
    edge: npt.NDArray[np.float64] = 1.0 / (1.0 + np.exp((distance - base_radius * wobble) / 0.012))
    return LESION_CONTRAST * edge


def public_pretext_images(
    count: int, *, seed: int, image_size: int = 32, source_size: int | None = None
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """A public, hospital-free image set for pretraining the default imaging backbone.

    Body-like images with 0, 1 or 2 bright blobs of varied contrast; the label is the
    number of blobs. It stands in for the public data a real imaging foundation model is
    pretrained on: it teaches the backbone what a bright focal structure looks like,
    without ever seeing a site's images or its labels. Arrays are in the demo loader's
    output space (model-ready, [-1, 1], shape [N, 1, S, S]).

    Images are drawn at ``source_size`` (default: the largest multiple of
    ``image_size`` up to 64, at least ``image_size``) and box-averaged down.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    source = source_size or image_size * max(1, SOURCE_SIDE // image_size)
    if source % image_size:
        raise ValueError(f"source_size {source} is not a multiple of image_size {image_size}")
    factor = source // image_size
    rng = np.random.default_rng(seed)
    images = np.empty((count, 1, image_size, image_size), dtype=np.float32)
    labels = rng.integers(0, PRETEXT_CLASSES, size=count).astype(np.int64)
    for index, blobs in enumerate(labels):
        clean = anatomy(rng, source, outside=0.0)
        for _ in range(int(blobs)):
            clean = clean + lesion(rng, source) * rng.uniform(0.4, 1.2)
        noisy = np.clip(clean + rng.normal(0.0, NOISE_SD, clean.shape), 0.0, 1.0)
        pooled = noisy.reshape(image_size, factor, image_size, factor).mean(axis=(1, 3))
        images[index, 0] = (pooled - 0.5) / 0.5
    return images, labels


def pretrain_imaging_backbone(
    model: torch.nn.Module,
    image_size: int,
    seed: int,
    images: int = 3000,
    epochs: int = 3,
    progress: Progress | None = None,
) -> float:
    """Non-private pretraining on public synthetic images (blob counting, so ``model``
    needs a 3-output head); returns the pretext accuracy on held-out public images.
    No site data is involved. ``progress`` hears of every optimiser step."""
    inputs, labels = public_pretext_images(images, seed=seed + 1, image_size=image_size)
    test_inputs, test_labels = public_pretext_images(500, seed=seed + 2, image_size=image_size)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    steps = epochs * math.ceil(images / PRETEXT_BATCH)
    done = 0
    model.train()
    for _ in range(epochs):
        order = torch.randperm(images, generator=generator)
        for start in range(0, images, PRETEXT_BATCH):
            batch = order[start : start + PRETEXT_BATCH]
            logits = model(pixel_values=torch.from_numpy(inputs[batch])).logits
            loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels[batch]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            done += 1
            if progress is not None:
                progress(done, steps)
    model.eval()
    with torch.no_grad():
        predicted = model(pixel_values=torch.from_numpy(test_inputs)).logits.argmax(-1)
    accuracy = float((predicted.numpy() == test_labels).mean())
    logger.info("imaging base model: public pretext accuracy %.3f", accuracy)
    return accuracy
