"""Normalisation and the CIFAR training augmentation, on whole batches of tensors.

The augmentation is the usual one for CIFAR (He et al. 2016, Sec. 4.2; docs/method.md
section 4): pad 4 pixels on each side, take a random 32x32 crop, flip it
horizontally with probability 1/2. :func:`crop_flip` does it for given offsets
and flips with one gather over the batch; :func:`random_crop_flip` draws those
from an explicit ``torch.Generator`` so a run can be repeated.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from bbdrop import validate

__all__ = [
    "RandomCropFlip",
    "channel_stats",
    "crop_flip",
    "normalize_channels",
    "random_crop_flip",
]

Fill = float | Sequence[float] | Tensor


def channel_stats(images: Tensor, pixel_max: float = 255.0) -> tuple[Tensor, Tensor]:
    """Per-channel mean and (population) standard deviation of ``images / pixel_max``
    over all images and pixels; ``images`` is (N, C, H, W). Float64 for exactness."""
    _check_batch(images)
    x = images.to(torch.float64).div_(pixel_max).transpose(0, 1).reshape(images.shape[1], -1)
    return x.mean(dim=1), x.std(dim=1, correction=0)


def normalize_channels(
    images: Tensor,
    pixel_max: float = 255.0,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Tensor:
    """Float32 ``images / pixel_max``, then ``(x - mean[c]) / std[c]`` per channel if given."""
    _check_batch(images)
    x = images.to(torch.float32).div_(pixel_max)
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std, or neither")
    if mean is not None and std is not None:
        c = images.shape[1]
        if len(mean) != c or len(std) != c or any(s <= 0 for s in std):
            raise ValueError(
                f"mean and std need {c} values (std > 0) for {c} channels, "
                f"got mean={tuple(mean)!r}, std={tuple(std)!r}"
            )
        x.sub_(torch.tensor(mean, dtype=x.dtype).view(1, c, 1, 1))
        x.div_(torch.tensor(std, dtype=x.dtype).view(1, c, 1, 1))
    return x


def crop_flip(
    x: Tensor, dy: Tensor, dx: Tensor, flip: Tensor, padding: int, fill: Fill = 0.0
) -> Tensor:
    """Crop image n of ``x`` (N, C, H, W) at offset ``(dy[n], dx[n])`` of its padded
    copy, then mirror it left-right where ``flip[n]``.

    The padded copy has ``padding`` pixels of ``fill`` (a scalar or one value per
    channel) on each side, so offset ``padding`` is no shift. Offsets are in
    ``[0, 2 * padding]``.
    """
    _check_batch(x)
    n = x.shape[0]
    validate.whole("padding", padding, lo=0)
    for name, t in (("dy", dy), ("dx", dx), ("flip", flip)):
        if t.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
    if n and (min(dy.min(), dx.min()) < 0 or max(dy.max(), dx.max()) > 2 * padding):
        raise ValueError(f"offsets must lie in [0, {2 * padding}] for padding {padding}")
    return _crop_flip(x, dy, dx, flip, padding, fill)


def _crop_flip(x: Tensor, dy: Tensor, dx: Tensor, flip: Tensor, padding: int, fill: Fill) -> Tensor:
    n, c, h, w = x.shape
    hp, wp = h + 2 * padding, w + 2 * padding
    padded = x.new_empty(n, c, hp, wp)
    padded.copy_(_fill_tensor(fill, c, x).expand(n, c, hp, wp))
    padded[:, :, padding : padding + h, padding : padding + w] = x
    dy, dx, flip = dy.to(x.device), dx.to(x.device), flip.to(x.device, torch.bool)
    rows = dy[:, None] + torch.arange(h, device=x.device)  # (N, H) rows of the padded image
    cols = dx[:, None] + torch.arange(w, device=x.device)  # (N, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    index = (rows[:, :, None] * wp + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
    return padded.view(n, c, hp * wp).gather(2, index).view(n, c, h, w)  # (N, C, H, W)


def random_crop_flip(
    x: Tensor,
    padding: int = 4,
    *,
    flip: bool = True,
    fill: Fill = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Random crop of the ``padding``-padded batch ``x`` (N, C, H, W) and, if ``flip``,
    a random horizontal flip, drawn independently per image from ``generator``.

    One call handles the whole batch. Draws happen on the generator's device
    (the CPU when ``generator`` is None, using torch's global generator).
    """
    _check_batch(x)
    validate.whole("padding", padding, lo=0)
    n = x.shape[0]
    device = generator.device if generator is not None else torch.device("cpu")
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=device)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=device)
    if flip:
        flips = torch.randint(0, 2, (n,), generator=generator, device=device).bool()
    else:
        flips = torch.zeros(n, dtype=torch.bool, device=device)
    return _crop_flip(x, dy, dx, flips, padding, fill)


class RandomCropFlip:
    """:func:`random_crop_flip` as a per-batch transform holding its settings.

    Called as ``t(x)`` it draws from its own ``generator``; called as
    ``t(x, generator)`` (the training loop's convention) from the one given.
    """

    def __init__(
        self,
        padding: int = 4,
        *,
        flip: bool = True,
        fill: Fill = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        validate.whole("padding", padding, lo=0)
        self.padding = padding
        self.flip = flip
        self.fill = fill
        self.generator = generator

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return random_crop_flip(
            x,
            self.padding,
            flip=self.flip,
            fill=self.fill,
            generator=generator if generator is not None else self.generator,
        )

    def __repr__(self) -> str:
        return f"RandomCropFlip(padding={self.padding}, flip={self.flip}, fill={self.fill!r})"


def _fill_tensor(fill: Fill, channels: int, like: Tensor) -> Tensor:
    t = torch.as_tensor(fill, dtype=like.dtype, device=like.device)
    if t.dim() == 0:
        return t.view(1, 1, 1, 1)
    if t.shape != (channels,):
        raise ValueError(
            f"fill must be a scalar or have one value per channel ({channels}), "
            f"got shape {tuple(t.shape)}"
        )
    return t.view(1, channels, 1, 1)


def _check_batch(x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"expected a batch of images (N, C, H, W), got {shape}")
