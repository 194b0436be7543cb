"""torch.distributed helpers on 2 CPU ranks (gloo), spawned in-process."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sadag.distributed import (
    Ranks,
    agree,
    all_reduce_gradients_,
    all_reduce_sum,
    broadcast_tensors,
    local_main_first,
    main_value,
    rank_device,
    ranks_from_env,
    share_gpu,
    share_items,
)
from sadag.errors import ConfigError, SadagError


def test_ranks_from_env() -> None:
    assert not ranks_from_env({}).enabled
    r = ranks_from_env({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0"})
    assert (r.rank, r.world_size, r.local_rank, r.is_main) == (2, 4, 0, False)
    with pytest.raises(ConfigError, match="inconsistent"):
        ranks_from_env({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"})
    with pytest.raises(ConfigError, match="integers"):
        ranks_from_env({"WORLD_SIZE": "two", "RANK": "0", "LOCAL_RANK": "0"})
    with pytest.raises(ConfigError, match="WORLD_SIZE is 2 but LOCAL_RANK is not set"):
        ranks_from_env({"WORLD_SIZE": "2", "RANK": "1"})
    assert not ranks_from_env({"WORLD_SIZE": "1"}).enabled  # one process, as some launchers export it


def test_ranks_share_a_gpu_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert rank_device(Ranks(1, 4, 1), "auto") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="LOCAL_RANK 3 has no GPU .*SADAG_SHARE_GPU=1"):
        rank_device(Ranks(3, 4, 3), "cuda")
    assert rank_device(Ranks(3, 4, 3), "cuda", shared=True) == torch.device("cuda", 1)
    assert rank_device(Ranks(3, 4, 3), "cpu", shared=True) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="'cuda': CUDA is not available to rank 1; use --device cpu"):
        rank_device(Ranks(1, 2, 1), "cuda")
    with pytest.raises(ConfigError, match="device 'mps' under torchrun"):  # not quietly the CPU
        rank_device(Ranks(0, 2, 0), "mps")
    assert share_gpu({}) is False and share_gpu({"SADAG_SHARE_GPU": "1"}) is True
    with pytest.raises(ConfigError, match="SADAG_SHARE_GPU='yes': set it to 1"):
        share_gpu({"SADAG_SHARE_GPU": "yes"})


@pytest.mark.parametrize("n", [0, 1, 5, 32, 33])
def test_slices_and_owners_partition(n: int) -> None:
    for world in (1, 2, 3):
        parts = [Ranks(r, world).slice(n) for r in range(world)]
        assert [i for s in parts for i in range(n)[s]] == list(range(n))
        owned = sorted(i for r in range(world) for i in Ranks(r, world).owned(range(n)))
        assert owned == list(range(n))


def _worker(rank: int, init_file: str, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    ranks, cpu = Ranks(rank, 2), torch.device("cpu")
    try:
        # items owned by different ranks reach every rank, dtypes and shapes intact
        local = {i: {"x": torch.full((i + 1, 2), float(i)), "n": torch.tensor([i], dtype=torch.int64)}
                 for i in ranks.owned(range(3))}
        shared = share_items(local, range(3), ranks, cpu)
        out[f"share{rank}"] = [(tuple(v["x"].shape), float(v["x"].sum()), v["n"].dtype, int(v["n"])) for _, v in
                               sorted(shared.items())]
        # data-parallel gradients equal the whole-minibatch gradient
        torch.manual_seed(0)
        layer = torch.nn.Linear(4, 3)
        x, y = torch.randn(7, 4), torch.randn(7, 3)
        part = ranks.slice(7)
        loss = ((layer(x[part]) - y[part]) ** 2).mean() + layer.weight.abs().sum()
        loss.backward()
        all_reduce_gradients_(list(layer.parameters()), (part.stop - part.start) / 7, ranks)
        out[f"grad{rank}"] = [p.grad.clone() for p in layer.parameters()]
        out[f"sum{rank}"] = int(all_reduce_sum(torch.tensor(rank + 1), ranks))
        # choices every rank must make alike: rank 0's, and a difference raises on every rank
        out[f"main{rank}"] = main_value({"parallel": rank + 1}, ranks, cpu)
        out[f"agree{rank}"] = agree([1, 2], "batches", ranks, cpu)
        try:
            agree([rank], "finished batches", ranks, cpu)
        except SadagError as exc:
            out[f"disagree{rank}"] = str(exc)
        try:  # a receiver out of step with its sender (an empty payload: the sender has nothing more to send)
            broadcast_tensors({} if rank == 0 else None, 0, ranks, cpu, item=2 if rank == 0 else 0)
            out[f"step{rank}"] = "ok"
        except SadagError as exc:
            out[f"step{rank}"] = str(exc)
        # local rank 0 runs the body first: the other rank finds its file
        flag = Path(init_file + ".first")
        with local_main_first(Ranks(rank, 2, local_rank=rank)):
            if rank == 0:
                time.sleep(0.5)
                flag.write_text("done")
            out[f"first{rank}"] = flag.is_file()
    finally:
        dist.destroy_process_group()


def test_two_ranks_share_items_and_reduce_gradients(tmp_path) -> None:  # noqa: ANN001
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(str(tmp_path / "init"), out), nprocs=2, join=True)
    expected = [((1, 2), 0.0, torch.int64, 0), ((2, 2), 4.0, torch.int64, 1), ((3, 2), 12.0, torch.int64, 2)]
    assert out["share0"] == out["share1"] == expected
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    x, y = torch.randn(7, 4), torch.randn(7, 3)
    (((layer(x) - y) ** 2).mean() + layer.weight.abs().sum()).backward()
    for rank in (0, 1):
        for got, want in zip(out[f"grad{rank}"], layer.parameters(), strict=True):
            torch.testing.assert_close(got, want.grad, rtol=1e-6, atol=1e-7)
    assert out["sum0"] == out["sum1"] == 3
    assert out["main0"] == out["main1"] == {"parallel": 1}
    assert out["agree0"] == out["agree1"] == [1, 2]
    assert "rank 0 sees [0]" in out["disagree0"] and "rank 1 sees [1]" in out["disagree1"]
    assert "same run directory" in out["disagree1"]
    assert out["step0"] == "ok" and "rank 0 sent item 2 while rank 1 expected item 0" in out["step1"]
    assert out["first0"] and out["first1"]
