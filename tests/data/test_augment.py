from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datafiles import write_cifar

from bbdrop.data import (
    RandomCropFlip,
    channel_stats,
    crop_flip,
    load_dataset,
    normalize_channels,
    random_crop_flip,
)
from bbdrop.data.datasets import CIFAR10_MEAN, CIFAR10_STD


def _reference(x, dy, dx, flip, padding, fill):
    """One image at a time: pad with ``fill`` per channel, slice, maybe mirror."""
    out = []
    for n in range(x.shape[0]):
        img = F.pad(x[n], (padding,) * 4, value=0.0)
        fill_t = torch.as_tensor(fill, dtype=x.dtype).reshape(-1, 1, 1).expand_as(img)
        border = torch.ones_like(img, dtype=torch.bool)
        border[:, padding : padding + x.shape[2], padding : padding + x.shape[3]] = False
        img = torch.where(border, fill_t, img)
        crop = img[:, int(dy[n]) : int(dy[n]) + x.shape[2], int(dx[n]) : int(dx[n]) + x.shape[3]]
        out.append(crop.flip(-1) if flip[n] else crop)
    return torch.stack(out)


def _batch(n: int = 6, c: int = 3, h: int = 8, w: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed))


def test_offset_equal_to_padding_without_flip_is_the_identity() -> None:
    x = _batch()
    n = x.shape[0]
    four = torch.full((n,), 4)
    out = crop_flip(x, four, four, torch.zeros(n, dtype=torch.bool), padding=4, fill=-7.0)
    torch.testing.assert_close(out, x, rtol=0, atol=0)


def test_flip_alone_mirrors_left_right() -> None:
    x = _batch()
    flips = torch.tensor([True, False, True, True, False, False])
    four = torch.full((6,), 4)
    out = crop_flip(x, four, four, flips, padding=4)
    torch.testing.assert_close(out[flips], x[flips].flip(-1), rtol=0, atol=0)
    torch.testing.assert_close(out[~flips], x[~flips], rtol=0, atol=0)


def test_corner_offset_shifts_in_padding() -> None:
    x = _batch(n=1)
    zero = torch.zeros(1, dtype=torch.long)
    out = crop_flip(x, zero, zero, torch.zeros(1, dtype=torch.bool), padding=4, fill=-1.0)
    torch.testing.assert_close(out[..., 4:, 4:], x[..., :-4, :-4], rtol=0, atol=0)
    assert (out[..., :4, :] == -1).all() and (out[..., :, :4] == -1).all()


def test_matches_a_per_image_reference_with_per_channel_fill() -> None:
    x = _batch(n=40)
    g = torch.Generator().manual_seed(1)
    dy, dx = torch.randint(0, 9, (40,), generator=g), torch.randint(0, 9, (40,), generator=g)
    flips = torch.randint(0, 2, (40,), generator=g).bool()
    fill = (-1.0, -2.0, -3.0)
    out = crop_flip(x, dy, dx, flips, padding=4, fill=fill)
    torch.testing.assert_close(out, _reference(x, dy, dx, flips, 4, fill), rtol=0, atol=0)


def test_random_crop_flip_draws_offsets_then_flips_from_the_generator() -> None:
    x = _batch(n=50)
    out = random_crop_flip(x, 4, fill=0.5, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    dy, dx = torch.randint(0, 9, (50,), generator=g), torch.randint(0, 9, (50,), generator=g)
    flips = torch.randint(0, 2, (50,), generator=g).bool()
    torch.testing.assert_close(out, _reference(x, dy, dx, flips, 4, 0.5), rtol=0, atol=0)


def test_same_seed_same_batch_other_seed_other_batch() -> None:
    x = _batch(n=16)
    a = random_crop_flip(x, generator=torch.Generator().manual_seed(3))
    b = random_crop_flip(x, generator=torch.Generator().manual_seed(3))
    c = random_crop_flip(x, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)


def test_every_crop_and_flip_happens_at_its_rate() -> None:
    n, p = 5000, 2
    # Pixel (r, c) holds 100 r + c, so each output reveals its (dy, dx, flip).
    image = (100 * torch.arange(5.0)[:, None] + torch.arange(6.0)).expand(1, 1, 5, 6)
    out = random_crop_flip(
        image.expand(n, 1, 5, 6), p, fill=-1.0, generator=torch.Generator().manual_seed(0)
    )
    combos = [(dy, dx, f) for dy in range(2 * p + 1) for dx in range(2 * p + 1) for f in (0, 1)]
    dy, dx, f = (torch.tensor(v) for v in zip(*combos, strict=True))
    candidates = _reference(image.expand(len(combos), 1, 5, 6), dy, dx, f.bool(), p, -1.0)
    match = (out[:, None] == candidates[None]).flatten(2).all(-1)  # (n, 50)
    assert (match.sum(1) == 1).all()  # every output is exactly one crop of the padded image
    counts = match.sum(0).double()
    # Each of the 50 outcomes is Binomial(n, 1/50): mean 100, sd 9.9; allow 5 sd.
    assert ((counts - n / 50).abs() < 5 * (n / 50 * 49 / 50) ** 0.5).all(), counts
    flipped = counts[f.bool()].sum()
    assert abs(flipped - n / 2) < 5 * (n / 4) ** 0.5


def test_padding_zero_and_no_flip_is_the_identity() -> None:
    x = _batch()
    out = random_crop_flip(x, 0, flip=False, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x, rtol=0, atol=0)


def test_flip_false_never_flips() -> None:
    x = torch.arange(8.0).expand(200, 1, 1, 8).clone()
    out = random_crop_flip(x, 0, flip=False, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x, rtol=0, atol=0)


def test_transform_object_keeps_its_generator_stream() -> None:
    x = _batch(n=8)
    t1, t2 = (RandomCropFlip(4, generator=torch.Generator().manual_seed(5)) for _ in range(2))
    first, second = t1(x), t1(x)
    assert not torch.equal(first, second)  # the stream advances
    torch.testing.assert_close(t2(x), first, rtol=0, atol=0)
    assert first.shape == x.shape and first.dtype == x.dtype


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"padding": -1}, "padding must be an int >= 0"),
        ({"padding": 1.5}, "padding must be an int >= 0"),
        ({"fill": (0.0, 1.0)}, r"one value per channel \(3\)"),
    ],
)
def test_bad_arguments_are_value_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        random_crop_flip(_batch(), **kwargs)


def test_offsets_outside_the_padding_are_rejected() -> None:
    x = _batch(n=2)
    ok = torch.tensor([0, 8])
    with pytest.raises(ValueError, match=r"\[0, 8\]"):
        crop_flip(x, torch.tensor([0, 9]), ok, torch.zeros(2, dtype=torch.bool), 4)
    with pytest.raises(ValueError, match=r"expected a batch of images \(N, C, H, W\)"):
        random_crop_flip(x[0])


def test_channel_stats_match_numpy() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 3, 6, 5), dtype=np.uint8)
    mean, std = channel_stats(torch.from_numpy(images))
    hwc = images.transpose(0, 2, 3, 1) / 255.0  # the (N, H, W, C) way the constants were made
    np.testing.assert_allclose(mean.numpy(), hwc.mean(axis=(0, 1, 2)), rtol=0, atol=1e-12)
    np.testing.assert_allclose(std.numpy(), hwc.std(axis=(0, 1, 2)), rtol=0, atol=1e-12)


def test_normalize_channels_is_the_written_out_formula() -> None:
    images = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    out = normalize_channels(images, 255.0, CIFAR10_MEAN, CIFAR10_STD)
    for c in range(3):
        want = (images[:, c].double() / 255 - CIFAR10_MEAN[c]) / CIFAR10_STD[c]
        torch.testing.assert_close(out[:, c].double(), want, rtol=0, atol=1e-5)
    assert out.dtype == torch.float32
    with pytest.raises(ValueError, match="both mean and std"):
        normalize_channels(images, 255.0, CIFAR10_MEAN, None)
    with pytest.raises(ValueError, match="need 3 values"):
        normalize_channels(images, 255.0, (0.5,), (0.5,))


def test_cifar_augmentation_pads_with_black_in_normalised_units(tmp_path: Path) -> None:
    write_cifar(tmp_path / "cifar10", cifar100=False, n=1)
    transform = load_dataset("cifar10", tmp_path, download=False, system_dir=None).train_transform
    assert isinstance(transform, RandomCropFlip) and transform.padding == 4 and transform.flip
    x = normalize_channels(
        torch.full((1, 3, 4, 4), 200, dtype=torch.uint8), 255.0, CIFAR10_MEAN, CIFAR10_STD
    )
    # Offset (0, 0) of a 4x4 image pulls in padding only: pixel value 0 before normalising.
    zero = torch.zeros(1, dtype=torch.long)
    out = crop_flip(x, zero, zero, zero.bool(), 4, transform.fill)
    black = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
    want = normalize_channels(black, 255.0, CIFAR10_MEAN, CIFAR10_STD)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)


def test_transform_takes_the_training_loops_generator() -> None:
    """The loop calls ``transform(x, generator)``; that generator wins over the own one."""
    x = _batch(n=8)
    t = RandomCropFlip(4, fill=0.25, generator=torch.Generator().manual_seed(1))
    got = t(x, torch.Generator().manual_seed(9))
    want = random_crop_flip(x, 4, fill=0.25, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
