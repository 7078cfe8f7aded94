"""``torchrun --standalone --nproc_per_node=2 -m tests.trainer.teardown``: the trainer's teardown
(``ddp.setup`` ... ``Dist.close``) in a gloo job that builds DDP as the trainer does, with the
shutdown race forced that a rank of the range test once died of on a busy CI machine
("terminate called without an active exception", SIGABRT). Each rank prints one line,
``threads {"before": [...], "after": [...]}``: the names of its native threads
(``/proc/self/task``) before ``setup`` and after ``close``.

The race: rank 1 leaves a collective on a
Python-made tensor to gloo and goes to ``close()``; rank 0 joins that collective 0.5 s
later. Rank 1's main thread then holds the GIL for 2 s at the very end of its exit (its
first-registered atexit handler, a ctypes ``PyDLL`` call, which keeps the GIL), and lets go
of it once during finalization (a ``__del__`` that sleeps), as a busy machine's scheduling
and any finalizer may. If gloo's threads are still alive then, the one that ran the
collective frees the tensor's Python object after shutdown began: it needs the GIL, CPython
ends the thread (``pthread_exit``) inside a C++ destructor, and the rank aborts. A teardown
that waits for its collectives and joins gloo's threads before exit leaves nothing to race.
"""

from __future__ import annotations

import atexit
import ctypes

# Registered first, so it runs last, right before finalization begins.
atexit.register(ctypes.PyDLL(None).usleep, 2_000_000)

import json  # noqa: E402 - after the atexit handler above
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from lrserve.trainer import ddp  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

from tests.trainer.threads import thread_names, write_line  # noqa: E402


class SleepsWhenFreed:
    """Freed during finalization (a module global): its ``__del__`` lets go of the GIL once."""

    def __del__(self) -> None:
        time.sleep(0.2)


def main() -> None:
    before = thread_names()
    env = ddp.setup("cpu")
    torch.manual_seed(0)
    net = DistributedDataParallel(torch.nn.Linear(4, 2))  # as the trainer's _epochs
    net(torch.randn(3, 4)).sum().backward()
    env.all_sum([1.0])
    env.broadcast("x")
    del net  # the trainer's goes with _epochs' frame
    store = dist.distributed_c10d._get_default_store()
    if env.rank == 1:
        tensor = torch.ones(1)
        dist.all_reduce(tensor, async_op=True)
        del tensor  # its Python object lives on in the gloo work only
        store.set("closing", "1")
    else:
        store.wait(["closing"])
        time.sleep(0.5)
        dist.all_reduce(torch.ones(1))
    env.close()
    write_line(sys.stdout, "threads " + json.dumps({"before": before, "after": thread_names()}))


keeper = SleepsWhenFreed()
main()
