"""torchrun and DDP plumbing: who am I, which backend, and the few collectives the loop needs.

Under ``torchrun`` every process gets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; started
plainly, the trainer is rank 0 of 1 and never touches ``torch.distributed``, so the same
loop serves both. gloo on the CPU, NCCL on CUDA (NCCL cannot reduce CPU tensors, gloo is
slow on GPUs).
"""

from __future__ import annotations

import faulthandler
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["Dist", "native_stacks_on_crash", "pick_device", "setup"]


def pick_device(choice: str, local_rank: int) -> torch.device:
    """``auto``: this rank's GPU if CUDA is there, else the CPU; ``cuda`` insists on a GPU."""
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise SystemExit("trainer: --device cuda, but torch sees no CUDA device")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


@dataclass
class Dist:
    """This process's place in the job and the collectives over it (no-ops for one process)."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (identical bits on every rank)."""
        if not self.enabled:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def any(self, flag: bool) -> bool:
        """Whether any rank says yes: all ranks then leave the loop at the same step."""
        return bool(self.all_sum([1.0 if flag else 0.0])[0]) if self.enabled else flag

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (e.g. a generated run id)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self._comm_device())
        return box[0]

    def close(self, *, clean: bool = True) -> None:
        """Leave the job's process group, before the interpreter shuts down.

        On a clean end (every rank past its last collective) a barrier comes first, so no
        rank still has a collective in flight; after an error it is left out (the other
        ranks may never reach it). Then ``destroy_process_group()``: with the DDP wrapper
        already gone (the trainer's is a local of its epochs) that drops the last reference
        to the group, whose destructor joins gloo's worker threads (torch releases the GIL
        for it). Otherwise those threads outlive the interpreter: one still holding a
        finished collective's tensor frees it after shutdown began, needs the GIL, is ended
        by CPython inside a C++ destructor, and the rank dies of "terminate called without
        an active exception" (SIGABRT); ``tests/trainer/teardown.py`` forces that.
        """
        if not (self.enabled and dist.is_initialized()):
            return
        if clean:
            dist.barrier()
        dist.destroy_process_group()

    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def native_stacks_on_crash() -> None:
    """With Python's faulthandler on (``PYTHONFAULTHANDLER=1``, ``-X faulthandler``), a rank
    that dies of a signal (SIGABRT, SIGSEGV, ...) prints every thread's native (C++) stack
    too, before faulthandler's Python stacks: torch's own handler, as torch's distributed
    tests install it (Linux only). A C++ ``std::terminate`` ("terminate called without an
    active exception") or a crash in gloo then says in which thread and where."""
    if faulthandler.is_enabled() and sys.platform == "linux":
        torch._C._set_print_stack_traces_on_fatal_signal(True)


def _import_group_defaults() -> None:
    """Import ``torch.distributed.nn.functional`` before the process group exists.

    Its functions take ``group=group.WORLD`` as default arguments, bound at import. DDP
    imports it (through ``torch._dynamo``) when the first wrapper is built; imported after
    ``init_process_group`` those defaults hold the default group until the process exits,
    so ``destroy_process_group()`` cannot free it and gloo's threads run on through
    interpreter shutdown (see ``Dist.close``). Imported first, the defaults are ``None``.
    """
    import torch.distributed.nn.functional  # noqa: F401


def setup(device_choice: str) -> Dist:
    """Read torchrun's environment, pick the device, and join the process group if there is one
    (leave it with ``Dist.close``)."""
    native_stacks_on_crash()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_choice, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        _import_group_defaults()
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, **kwargs)
    return Dist(rank, local_rank, world_size, device)
