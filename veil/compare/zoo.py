"""The model zoo: the published architectures that the seed documents quote latencies
for, plus the CIFAR ResNet-20 that HE papers benchmark on.

The ImageNet models are the unmodified ``torchvision.models`` constructors with
``weights=None``: nothing is downloaded. No package on the registries this project
can use ships torchvision's ImageNet weights for offline use (torchvision, timm,
pytorchcv and pretrainedmodels all fetch them from a hub at run time), so the
weights are torchvision's own random initialisation under a fixed seed, and the
batch-norm statistics are *calibrated* on representative inputs (photos, not noise)
so that every layer sees activations in the range a trained network's would have and
the logits are not degenerate. That is what the frontend, the compiler's range
estimates and the backends' precision need; it is not what accuracy needs, and no
accuracy is claimed for these models.

torch, torchvision and scikit-learn (for its two sample photos) are development
dependencies, imported only when a model or an image is asked for.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..errors import InputError

__all__ = ["ZOO", "ZooEntry", "build", "resnet20", "sample_images", "IMAGENET_MEAN",
           "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ZooEntry:
    """One zoo model.

    ``claimed_he_ms`` is the encrypted single-image latency the seed documents (seed
    003) claim for it, in milliseconds, quoted as a claim to check, never as a result;
    None where the seeds claim nothing.
    """

    name: str
    constructor: Callable[[], Any]
    input_shape: tuple[int, int, int]
    claimed_he_ms: float | None
    source: str


def _torchvision(name: str) -> Callable[[], Any]:
    def construct() -> Any:
        import torchvision

        return getattr(torchvision.models, name)(weights=None)
    construct.__name__ = name
    return construct


def resnet20(num_classes: int = 10) -> Any:
    """ResNet-20 for (3, 32, 32) inputs (He et al. 2016, Sec. 4.2; projection shortcuts).

    See :mod:`veil.compare.resnet20` for the definition.
    """
    from .resnet20 import ResNet20

    return ResNet20(num_classes)


_IMAGENET = (3, 224, 224)
ZOO: dict[str, ZooEntry] = {e.name: e for e in (
    ZooEntry("resnet18", _torchvision("resnet18"), _IMAGENET, 9.8, "torchvision.models"),
    ZooEntry("resnet50", _torchvision("resnet50"), _IMAGENET, None, "torchvision.models"),
    ZooEntry("vgg16", _torchvision("vgg16"), _IMAGENET, 24.3, "torchvision.models"),
    ZooEntry("mobilenet_v2", _torchvision("mobilenet_v2"), _IMAGENET, 4.1,
             "torchvision.models"),
    ZooEntry("efficientnet_b0", _torchvision("efficientnet_b0"), _IMAGENET, 2.9,
             "torchvision.models"),
    ZooEntry("resnet20", resnet20, (3, 32, 32), None, "He et al. 2016, Sec. 4.2"),
)}


def _entry(name: str) -> ZooEntry:
    if name not in ZOO:
        raise InputError(f"no zoo model {name!r}; the zoo has {', '.join(ZOO)}")
    return ZOO[name]


def build(name: str, seed: int = 0, calibration_images: int = 16,
          batch_size: int | None = None) -> Any:
    """An eval-mode ``nn.Module`` of zoo model ``name``, deterministic for ``seed``.

    Weights start as the architecture's own random initialisation under ``torch``
    seed ``seed``, then are calibrated on ``calibration_images`` photos from
    :func:`sample_images` in batches of ``batch_size`` (default: all at once, which
    makes the eval-mode statistics exactly those the train-mode pass normalised with)
    in a data-dependent initialisation, as LSUV (Mishkin and Matas 2016) does for
    training:

    1. every convolution and linear layer is scaled so that its output has unit
       standard deviation on four of the photos (VGG has no batch norm, and torchvision's
       init shrinks its logits to ~0.01);
    2. batch-norm running statistics are recomputed on the photos
       (:func:`calibrate_batchnorm`);
    3. the classifier's bias is centred on the photos' mean logits and the layer
       scaled to unit logit standard deviation, so the predicted class depends on the
       image, not on the random bias.

    Raises:
        InputError: unknown ``name`` or a non-positive image count.
    """
    import torch

    entry = _entry(name)
    batch_size = calibration_images if batch_size is None else batch_size
    if calibration_images < 1 or batch_size < 1:
        raise InputError("calibration_images and batch_size must be positive")
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = entry.constructor()
    finally:
        torch.random.set_rng_state(state)  # leave the caller's global RNG as it was
    images = sample_images(entry.input_shape, calibration_images, seed=seed + 1)
    _unit_scale(model, images[:4])  # a global std per layer: a few photos suffice
    calibrate_batchnorm(model, images, batch_size)
    _centre_classifier(model, images, 4)  # eval mode: any batching gives the same logits
    return model.eval()


def _affine_layers(model: Any) -> list[Any]:
    from torch import nn

    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _unit_scale(model: Any, images: np.ndarray) -> None:
    """One eval pass in which each conv/linear layer, in execution order, divides its
    weight and bias by its output's standard deviation and passes the rescaled output
    on, so later layers are measured on already rescaled inputs."""
    import torch

    def rescale(module: Any, args: Any, output: Any) -> Any:
        std = float(output.std())
        if not std > 0:
            return output
        module.weight.div_(std)
        if module.bias is not None:
            module.bias.div_(std)
        return output / std

    model.eval()
    hooks = [m.register_forward_hook(rescale) for m in _affine_layers(model)]
    try:
        with torch.no_grad():
            model(torch.from_numpy(np.ascontiguousarray(images)))
    finally:
        for hook in hooks:
            hook.remove()


def _centre_classifier(model: Any, images: np.ndarray, batch_size: int) -> None:
    """Centre the last linear layer's outputs on ``images`` and scale them to unit
    standard deviation."""
    import torch

    head = _affine_layers(model)[-1]
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(torch.from_numpy(np.ascontiguousarray(
            images[i:i + batch_size]))) for i in range(0, len(images), batch_size)])
        centred = logits - logits.mean(dim=0)
        std = float(centred.std())
        head.bias.sub_(logits.mean(dim=0))
        if std > 0:
            head.weight.div_(std)
            head.bias.div_(std)


def calibrate_batchnorm(model: Any, images: np.ndarray, batch_size: int = 16) -> Any:
    """Recompute every batch norm's running mean and variance on ``images``.

    Each batch norm is reset and put in train mode with ``momentum=None`` (a
    cumulative average over the batches), every other module in eval mode; the
    forward passes run without gradients. With several batches, later layers are
    normalised with per-batch statistics during the pass but with their average
    afterwards, so one batch is the most faithful. Returns ``model`` in eval mode.
    """
    import torch
    from torch import nn

    model.eval()
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:  # VGG: nothing to calibrate, and the pass would cost 2 GB
        return model
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            model(torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])))
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    return model.eval()


def sample_images(shape: tuple[int, ...], n: int, seed: int = 0) -> np.ndarray:
    """``n`` images of per-sample ``shape`` (C, H, W), float32, ImageNet-normalised.

    Random crops (a quarter to all of the shorter side, random position, random
    horizontal flip) of scikit-learn's two sample photos, resized to (H, W)
    bilinearly, scaled to [0, 1] and normalised with the ImageNet mean and standard
    deviation (their average for C = 1). Deterministic for ``seed``.

    Raises:
        InputError: ``shape`` is not (1 or 3, H, W) with positive sizes, or ``n < 1``.
    """
    shape = tuple(int(d) for d in shape)
    if len(shape) != 3 or shape[0] not in (1, 3) or min(shape) < 1 or n < 1:
        raise InputError(f"sample_images needs a (1 or 3, H, W) shape and n >= 1, got "
                         f"{shape} and n={n}")
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    c, h, w = shape
    out = np.empty((n, c, h, w), dtype=np.float32)
    for i in range(n):
        photo = photos[int(rng.integers(len(photos)))]
        ph, pw = photo.shape[:2]
        side = int(rng.uniform(0.25, 1.0) * min(ph, pw))
        top, left = int(rng.integers(ph - side + 1)), int(rng.integers(pw - side + 1))
        crop = photo[top:top + side, left:left + side]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        img = Image.fromarray(np.ascontiguousarray(crop)).resize((w, h), Image.BILINEAR)
        arr = np.asarray(img, dtype=np.float32) / 255.0
        if c == 1:
            arr = arr.mean(axis=2, keepdims=True)
        mean = np.asarray(IMAGENET_MEAN if c == 3 else [np.mean(IMAGENET_MEAN)], np.float32)
        std = np.asarray(IMAGENET_STD if c == 3 else [np.mean(IMAGENET_STD)], np.float32)
        out[i] = ((arr - mean) / std).transpose(2, 0, 1)
    return out
