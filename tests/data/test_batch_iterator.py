from __future__ import annotations

import pytest
import torch

from bbdrop.data import BatchIterator, RandomCropFlip


def _data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Row i of x is filled with i, so batches show whether x and y stay aligned.
    return torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 1, 2, 2).clone(), (
        torch.arange(n)
    )


def _epoch(it: BatchIterator) -> list[torch.Tensor]:
    out = []
    for xb, yb in it:
        torch.testing.assert_close(xb[:, 0, 0, 0].long(), yb, rtol=0, atol=0)
        out.append(yb)
    return out


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize(("n", "bs"), [(10, 3), (12, 4), (5, 8), (1, 1)])
def test_every_example_exactly_once_per_epoch(n: int, bs: int, shuffle: bool) -> None:
    x, y = _data(n)
    it = BatchIterator(x, y, bs, shuffle=shuffle, generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        batches = _epoch(it)
        assert len(batches) == len(it) == -(-n // bs)
        assert [len(b) for b in batches[:-1]] == [bs] * (len(batches) - 1)
        assert sorted(torch.cat(batches).tolist()) == list(range(n))


def test_unshuffled_order_is_the_data_order() -> None:
    x, y = _data(7)
    assert torch.cat(_epoch(BatchIterator(x, y, 3))).tolist() == list(range(7))


def test_drop_last_leaves_out_the_incomplete_batch() -> None:
    x, y = _data(10)
    it = BatchIterator(x, y, 3, shuffle=True, drop_last=True, generator=torch.Generator())
    batches = _epoch(it)
    assert len(it) == len(batches) == 3 and it.num_examples == 9
    assert all(len(b) == 3 for b in batches)
    assert len(set(torch.cat(batches).tolist())) == 9
    assert len(BatchIterator(x, y, 20, drop_last=True)) == 0


def test_same_seed_same_batches_new_order_each_epoch() -> None:
    x, y = _data(50)
    a = BatchIterator(x, y, 8, shuffle=True, generator=torch.Generator().manual_seed(1))
    b = BatchIterator(x, y, 8, shuffle=True, generator=torch.Generator().manual_seed(1))
    c = BatchIterator(x, y, 8, shuffle=True, generator=torch.Generator().manual_seed(2))
    a1, a2 = torch.cat(_epoch(a)), torch.cat(_epoch(a))
    b1, b2 = torch.cat(_epoch(b)), torch.cat(_epoch(b))
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert not torch.equal(a1, a2)
    assert not torch.equal(a1, torch.cat(_epoch(c)))
    assert not torch.equal(a1, torch.arange(50))


def test_transform_is_applied_once_per_batch_to_inputs_only() -> None:
    x, y = _data(10)
    calls = []

    def transform(xb: torch.Tensor) -> torch.Tensor:
        calls.append(len(xb))
        return -xb

    for xb, yb in BatchIterator(x, y, 4, transform=transform):
        torch.testing.assert_close(-xb[:, 0, 0, 0].long(), yb, rtol=0, atol=0)
    assert calls == [4, 4, 2]


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        ((torch.zeros(3, 2), torch.zeros(4), 2), ValueError, "x has 3 examples but y has 4"),
        ((torch.zeros(3, 2), torch.zeros(3), 0), ValueError, "batch_size must be an int >= 1"),
        ((torch.zeros(3, 2), torch.zeros(3), True), ValueError, "batch_size"),
        (([1, 2], torch.zeros(2), 1), TypeError, "must be tensors"),
    ],
)
def test_bad_arguments(args: tuple, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        BatchIterator(*args)


@pytest.mark.device
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batches_and_augmentation_stay_on_the_data_device() -> None:
    x = torch.rand(10, 3, 8, 8, device="cuda")
    y = torch.arange(10, device="cuda")
    for gen in (torch.Generator(), torch.Generator(device="cuda")):
        gen.manual_seed(0)
        it = BatchIterator(
            x, y, 4, shuffle=True, generator=gen, transform=RandomCropFlip(2, generator=gen)
        )
        batches = list(it)
        assert all(xb.device == x.device and yb.device == y.device for xb, yb in batches)
        assert sorted(torch.cat([yb for _, yb in batches]).tolist()) == list(range(10))
