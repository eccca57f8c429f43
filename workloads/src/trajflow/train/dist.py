"""The process group as torchrun describes it (RANK, WORLD_SIZE, LOCAL_RANK...).

Without torchrun's variables the run is a single process and every collective is a
no-op, so the same loop serves `trajflow train` on a laptop and a 64-GPU Job.
"""
from __future__ import annotations

import datetime as dt
import gc
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.distributed as tdist

from trajflow.errors import ConfigError
from trajflow.resources import cpu_budget

log = logging.getLogger(__name__)

COLLECTIVE_TIMEOUT_S = 1800.0  # a collective's peers that have not come by then are taken for hung
# while the first rank of each node fetches (S3) or checks its shards: about an hour a
# terabyte. A peer that dies meanwhile ends the group through its launcher, not this timeout
DATA_TIMEOUT_S = 24 * 3600.0


def _int_env(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} must be an integer") from None


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    restart_count: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    initialized: bool = False  # this object created the process group
    data_group: Any = None  # gloo, with DATA_TIMEOUT_S: the wait for the shards

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "DistContext":
        env = os.environ if env is None else env
        world = _int_env(env, "WORLD_SIZE", 1)
        rank = _int_env(env, "RANK", 0)
        local_rank = _int_env(env, "LOCAL_RANK", 0)
        local_world = _int_env(env, "LOCAL_WORLD_SIZE", 1)
        if world < 1 or not 0 <= rank < world:
            raise ConfigError(f"RANK={rank} is outside 0..{world - 1} (WORLD_SIZE={world})")
        if not 0 <= local_rank < max(local_world, 1):
            raise ConfigError(f"LOCAL_RANK={local_rank} is outside 0..{local_world - 1} (LOCAL_WORLD_SIZE={local_world})")
        return cls(rank, world, local_rank, local_world, _int_env(env, "TORCHELASTIC_RESTART_COUNT", 0))

    def setup(self, device: str = "auto", timeout_s: float = COLLECTIVE_TIMEOUT_S) -> "DistContext":
        """Pick this rank's device and join the process group (NCCL on GPU, gloo on CPU)."""
        use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        share = max(1, cpu_budget() // max(self.local_world_size, 1))
        if not os.environ.get("OMP_NUM_THREADS") and torch.get_num_threads() > share:
            # torch sizes its pool by the host's cores, not the pod's CPU limit, in each of the
            # pod's ranks: oversubscribed pools are many times slower than right-sized ones
            torch.set_num_threads(share)
        if use_cuda:
            if not torch.cuda.is_available():
                raise ConfigError("training.config.device is cuda but torch sees no CUDA device")
            count = torch.cuda.device_count()
            if self.local_rank >= count:
                raise ConfigError(
                    f"LOCAL_RANK {self.local_rank} has no GPU: this node has {count}; "
                    "set training.nprocPerNode (trajflow train --nproc-per-node) to at most the GPUs per pod"
                )
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        if self.distributed and not tdist.is_initialized():
            backend = "nccl" if use_cuda else "gloo"
            kwargs: dict[str, Any] = {"backend": backend, "timeout": dt.timedelta(seconds=timeout_s)}
            if use_cuda:
                kwargs["device_id"] = self.device  # binds NCCL to this GPU eagerly
            tdist.init_process_group(**kwargs)
            self.initialized = True
            self.data_group = tdist.new_group(backend="gloo", timeout=dt.timedelta(seconds=DATA_TIMEOUT_S))
            log.debug("joined process group", extra={"rank": self.rank, "world_size": self.world_size, "backend": backend})
        return self

    def close(self) -> None:
        if self.initialized and tdist.is_initialized():
            gc.collect()  # DDP's reducer and pending gloo work hold the group: free them while Python runs
            tdist.destroy_process_group()  # and the data group
        self.initialized, self.data_group = False, None

    # ---- collectives (no-ops for a single process) --------------------------------------

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            tdist.all_reduce(values, op=tdist.ReduceOp.SUM)
        return values

    def all_reduce_max(self, values: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            tdist.all_reduce(values, op=tdist.ReduceOp.MAX)
        return values

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if not self.distributed:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=src)
        return box[0]

    def gather_objects(self, obj: Any, data_wait: bool = False) -> list[Any]:
        """`obj` of every rank, in rank order, on every rank; `data_wait`: through the group
        that waits DATA_TIMEOUT_S for its peers (while they fetch their shards)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        tdist.all_gather_object(out, obj, group=self.data_group if data_wait else None)
        return out

    def barrier(self) -> None:
        if self.distributed:
            if self.device.type == "cuda":
                tdist.barrier(device_ids=[self.device.index])
            else:
                tdist.barrier()
