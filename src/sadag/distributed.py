"""torch.distributed for sadag: one process by default; under torchrun the ranks share the work.

Ranks split the generation batches by index (batch b belongs to rank b % world_size, and each batch is
seeded from (seed, b) alone, so the set does not depend on the split), then every batch is broadcast from
its owner so that every rank holds the whole set. Reconstruction is data-parallel: every rank draws the
same minibatch indices and masks from the same seed, takes its slice, and the gradients are all-reduced,
weighted by slice size, so N ranks make the updates of one process on the whole minibatch. Evaluation
shards the images and all-reduces the counts. Only rank 0 writes the run directory.

Messages between ranks carry tensors and a JSON header, never pickles.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import ConfigError, SadagError

_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK")
TIMEOUT_ENV = "SADAG_DIST_TIMEOUT_S"  # seconds a collective may wait for the slowest rank
SHARE_GPU_ENV = "SADAG_SHARE_GPU"  # "1": more ranks than GPUs on a machine, rank r on GPU r % count (gloo)
TEST_FAIL_ENV = "SADAG_TEST_FAIL_AT"  # tests only: "RANK:STAGE" makes that rank raise when it enters that stage
_stages: list[str] = []  # the stages this process is in (innermost last); kept as is when one raises


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: rank 0 of 1 when not launched by torchrun."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owner(self, index: int) -> int:
        """The rank that computes item ``index`` of a sharded list."""
        return index % self.world_size

    def owned(self, indices: Iterable[int]) -> list[int]:
        return [i for i in indices if self.owner(i) == self.rank]

    def slice(self, n: int) -> slice:
        """This rank's contiguous share of n items (the first n % world_size ranks get one more)."""
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))


SINGLE = Ranks()


def ranks_from_env(environ: dict[str, str] | None = None) -> Ranks:
    """Read torchrun's WORLD_SIZE, RANK and LOCAL_RANK; one process when they are absent."""
    env = os.environ if environ is None else environ
    if env.get("WORLD_SIZE", "1").strip() == "1":  # unset, or one process (some launchers export WORLD_SIZE=1)
        return SINGLE
    if missing := [k for k in _ENV if k not in env]:  # a default of 0 would make two rank 0s, or share cuda:0
        raise ConfigError(f"WORLD_SIZE is {env['WORLD_SIZE']} but {', '.join(missing)} is not set: start the ranks "
                          f"with torchrun, which sets all of {', '.join(_ENV)}, or unset WORLD_SIZE for one process")
    try:
        world, rank, local = (int(env[k]) for k in _ENV)
    except ValueError as exc:
        shown = ", ".join(f"{k}={env.get(k)!r}" for k in _ENV)
        raise ConfigError(f"torchrun variables {shown} must be integers") from exc
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ConfigError(f"inconsistent torchrun variables WORLD_SIZE={world}, RANK={rank}, LOCAL_RANK={local}")
    return Ranks(rank, world, local)


def share_gpu(environ: dict[str, str] | None = None) -> bool:
    """Whether the user asked for several ranks per GPU (SADAG_SHARE_GPU=1); any other value is refused."""
    value = (os.environ if environ is None else environ).get(SHARE_GPU_ENV, "0")
    if value not in ("0", "1"):
        raise ConfigError(f"{SHARE_GPU_ENV}={value!r}: set it to 1 (several ranks per GPU) or 0 (one per GPU)")
    return value == "1"


def rank_device(ranks: Ranks, requested: str, shared: bool = False) -> torch.device:
    """Under torchrun each rank takes the GPU of its LOCAL_RANK (modulo the GPU count when ``shared``);
    'cpu' keeps every rank on the CPU."""
    if requested in ("auto", "cuda") and torch.cuda.is_available():
        count = torch.cuda.device_count()
        if ranks.local_rank >= count and not shared:
            raise ConfigError(f"LOCAL_RANK {ranks.local_rank} has no GPU ({count} visible): start at most one "
                              f"process per GPU (--nproc-per-node), or set {SHARE_GPU_ENV}=1 to put several "
                              "ranks on each GPU (gloo between them)")
        return torch.device("cuda", ranks.local_rank % count)
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {requested!r}: CUDA is not available to rank {ranks.rank}; use --device cpu")
    if requested.startswith("cuda"):
        raise ConfigError(f"device {requested!r} under torchrun: use --device auto or cuda (each rank takes "
                          "cuda:LOCAL_RANK), or cpu")
    if requested == "mps":  # gloo moves no MPS tensors: refused rather than run on the CPU unasked
        raise ConfigError("device 'mps' under torchrun: the ranks cannot exchange MPS tensors; use --device cpu, "
                          "or run one process without torchrun on MPS")
    return torch.device("cpu")


def _timeout_s() -> float:
    text = os.environ.get(TIMEOUT_ENV, "1800")
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise ConfigError(f"{TIMEOUT_ENV}={text!r}: give the collective timeout in seconds (a positive number)")
    return value


def init(requested_device: str) -> tuple[Ranks, torch.device | None]:
    """Join torchrun's process group if launched by it (NCCL between GPUs, gloo on CPU and between ranks that
    share a GPU: NCCL refuses two ranks on one device).

    Returns (SINGLE, None) for a plain process: the caller resolves the device as usual. A rank that fails
    exits, torchrun's agent then stops the others and gloo/NCCL peers see the closed connection, so failing
    fast does not rely on the timeout (``SADAG_DIST_TIMEOUT_S``, default 30 min): it only bounds a rank that
    hangs alive, and must exceed the longest wait of one rank for another (one Genie-D batch).
    """
    ranks = ranks_from_env()
    if not ranks.enabled:
        return SINGLE, None
    shared = share_gpu()
    device = rank_device(ranks, requested_device, shared)
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" and not shared else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=_timeout_s()))
    return ranks, device


def finish() -> None:
    """After a successful command: wait for every rank (rank 0 writes the report last), then leave the process
    group. A rank that exits with its group open can abort, and torchrun then stops rank 0 mid-report."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def enter_stage(name: str, ranks: Ranks) -> None:
    """Record the stage for error messages; the test-only SADAG_TEST_FAIL_AT="RANK:STAGE" fails it here."""
    _stages.append(name)
    target = os.environ.get(TEST_FAIL_ENV)
    if target and target == f"{ranks.rank}:{name}":
        raise SadagError(f"{TEST_FAIL_ENV}={target}: failure injected for a test")


def leave_stage() -> None:
    if _stages:
        _stages.pop()


def stage_name() -> str:
    return _stages[-1] if _stages else "setup"


def is_comm_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a lost connection to another rank (that rank failed or was stopped)."""
    text = str(exc)
    return isinstance(exc, dist.DistError) or any(k in text for k in ("Connection closed by peer", "gloo", "NCCL"))


def main_succeeded(ok: bool, ranks: Ranks, device: torch.device) -> bool:
    """Rank 0's ``ok`` on every rank (e.g. whether it could open the run directory)."""
    if not ranks.enabled:
        return ok
    flag = torch.tensor([int(ok)], dtype=torch.int64, device=device)
    dist.broadcast(flag, 0)
    return bool(flag.item())


def barrier(ranks: Ranks) -> None:
    if ranks.enabled:
        dist.barrier()


@contextmanager
def local_main_first(ranks: Ranks) -> Iterator[None]:
    """Local rank 0 of each machine runs the body first (e.g. a download into the machine's cache), the other
    ranks after it. A failure of local rank 0 ends the job (torchrun stops the waiting ranks)."""
    if ranks.enabled and ranks.local_rank != 0:
        dist.barrier()
    yield
    if ranks.enabled and ranks.local_rank == 0:
        dist.barrier()


def main_value(value: Any, ranks: Ranks, device: torch.device) -> Any:
    """Rank 0's ``value`` (JSON-able) on every rank: a choice every rank must make alike (e.g. one that
    depends on the rank's own GPU memory)."""
    if not ranks.enabled:
        return value
    blob = broadcast_tensors({"json": _header_tensor(value, device)} if ranks.is_main else None, 0, ranks,
                             device)["json"]
    return json.loads(bytes(blob.tolist()).decode())


SHARED_RUN_DIR = ("every rank must read the same run directory, on a file system shared by all machines "
                  "(--out)")


def agree(value: Any, what: str, ranks: Ranks, device: torch.device, fix: str = SHARED_RUN_DIR) -> Any:
    """``value`` (JSON-able), checked equal on every rank: each rank compares its own with rank 0's and every
    rank raises together if any differs (no rank is left waiting in a later collective). ``fix`` tells the
    user what to do; by default, for what each rank reads from the run directory, which only a folder shared
    by all ranks makes equal."""
    main = main_value(value, ranks, device)
    if not ranks.enabled:
        return value
    mine = json.dumps(value) != json.dumps(main)
    differ = all_reduce_sum(torch.tensor([int(mine)], dtype=torch.int64, device=device), ranks)
    if int(differ) > 0:
        shown = f"; rank {ranks.rank} sees {value!r}" if mine else ""
        raise SadagError(f"the ranks see different {what} (rank 0 sees {main!r}{shown}): {fix}")
    return value


def _header_tensor(header: dict, device: torch.device) -> Tensor:
    return torch.tensor(list(json.dumps(header).encode()), dtype=torch.uint8, device=device)


def broadcast_tensors(tensors: dict[str, Tensor] | None, src: int, ranks: Ranks,
                      device: torch.device, item: int | None = None) -> dict[str, Tensor]:
    """Rank ``src``'s flat dict of tensors on every rank (CPU copies), sent as one JSON header + tensors.
    ``item``: which item every rank expects; a sender out of step with the receivers is an error, not data."""
    if not ranks.enabled:
        assert tensors is not None
        return tensors
    if ranks.rank == src:
        assert tensors is not None
        header = {k: [list(t.shape), str(t.dtype).removeprefix("torch.")] for k, t in tensors.items()}
        header = {"item": item, "tensors": header}
        blob = _header_tensor(header, device)
        size = torch.tensor([blob.numel()], dtype=torch.int64, device=device)
    else:
        size = torch.zeros(1, dtype=torch.int64, device=device)
    dist.broadcast(size, src)
    if ranks.rank != src:
        blob = torch.empty(int(size), dtype=torch.uint8, device=device)
    dist.broadcast(blob, src)
    header = json.loads(bytes(blob.cpu().tolist()).decode())
    if header["item"] != item:
        raise SadagError(f"rank {src} sent item {header['item']} while rank {ranks.rank} expected item {item}: the "
                         "ranks are out of step (a bug, or run directories that differ between machines)")
    out = {}
    for key, (shape, dtype) in header["tensors"].items():
        if ranks.rank == src:
            t = tensors[key].detach().to(device).contiguous()
        else:
            t = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
        dist.broadcast(t, src)
        out[key] = t.cpu()
    return out


def share_items(local: dict[int, dict[str, Tensor]], indices: Iterable[int], ranks: Ranks,
                device: torch.device) -> dict[int, dict[str, Tensor]]:
    """Every item of ``indices`` on every rank: item i is broadcast by the rank that owns it."""
    if not ranks.enabled:
        return local
    return {i: broadcast_tensors(local.get(i), ranks.owner(i), ranks, device, item=i) for i in indices}


def all_reduce_gradients_(params: Sequence[Tensor], weight: float, ranks: Ranks) -> None:
    """grad <- sum over ranks of weight_r * grad_r, in one flat buffer (weight = this rank's share)."""
    if not ranks.enabled:
        return
    for p in params:  # every rank must send the same buffer layout
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads]) * weight
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def all_reduce_sum(values: Tensor, ranks: Ranks) -> Tensor:
    if ranks.enabled:
        dist.all_reduce(values)
    return values
