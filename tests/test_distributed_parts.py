"""The pieces of bbdrop.distributed that need no process group: the shares of a batch, the
per-example noise of a share, and the refusals (the processes themselves:
tests/test_distributed.py)."""

from __future__ import annotations

import pytest
import torch

from bbdrop.distributed import World, batch_shard, example_noise, fresh_compile, shard


@pytest.mark.parametrize(("total", "size"), [(45, 2), (20, 2), (7, 3), (3, 3)])
def test_the_shares_of_a_batch_cover_it_in_order_and_differ_by_at_most_one(
    total: int, size: int
) -> None:
    x, y = torch.arange(total).float()[:, None], torch.arange(total)
    shares = [shard(x, y, World(r, size)) for r in range(size)]
    assert torch.equal(torch.cat([s[1] for s in shares]), y)
    counts = [s[2][1] - s[2][0] for s in shares]
    assert max(counts) - min(counts) <= 1 and all(s[2][2] == total for s in shares)


def test_a_batch_smaller_than_the_processes_is_refused_with_the_setting_to_change() -> None:
    with pytest.raises(ValueError, match=r"optim\.batch_size"):
        shard(torch.zeros(1, 2), torch.zeros(1), World(0, 2))


def test_a_shares_noise_is_its_rows_of_the_whole_batchs_and_draws_as_one_process() -> None:
    draw = lambda s: torch.rand(s)  # noqa: E731
    torch.manual_seed(0)
    whole, after = draw((45, 6)), torch.rand(3)
    for start, stop in ((0, 22), (22, 45)):
        torch.manual_seed(0)
        with batch_shard((start, stop, 45)):
            mine = example_noise(draw, (stop - start, 6))
            unit = example_noise(draw, (6,))  # per unit: not a share's (rank 1)
        assert torch.equal(mine, whole[start:stop])
        torch.manual_seed(0)
        torch.rand(45, 6)
        assert torch.equal(unit, torch.rand(6))
    torch.manual_seed(0)
    assert torch.equal(example_noise(draw, (45, 6)), whole)  # no share: as it was
    assert torch.equal(torch.rand(3), after)


def test_a_compiled_stage_under_torchrun_starts_from_an_empty_compile_cache(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """(The end-to-end check, a DBB stage that stops without it, is test_distributed's.)"""
    resets = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1))
    fresh_compile(True, World())  # one process keeps its cache
    fresh_compile(False, World(1, 2))
    assert resets == []
    fresh_compile(True, World(0, 2))
    assert resets == [1]
