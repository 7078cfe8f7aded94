"""``python bench/hogs.py N COMMAND...``: start N busy-looping processes, then become COMMAND.

CPU-bound work at nice 0 *in the server's scheduling group*: its session (``autogroup``, where
the kernel groups by session) and its cgroup, as the other ``--workers`` processes or anything
started from the server's shell would be. A server started under it by ``bench.servers.Server``
(``hogs=N``) is the session's leader; the hogs are its children, each in a process group of its
own (so they are not counted as the server's processes: ``Server.pids``), and each ends as soon
as the process it was started under (the server) is gone, however it ended.

Run by its path (``Server`` does), not as a module, so that it serves another checkout's server
too (``tree=``), whose ``bench`` may not have it; it imports nothing but the standard library.
"""

from __future__ import annotations

import os
import sys


def _spin(parent: int) -> None:
    """Burn CPU until ``parent`` is no longer this process's parent; never returns."""
    os.setpgid(0, 0)  # a group of its own, in the same session
    while os.getppid() == parent:
        for _ in range(20_000):  # about a millisecond of work between checks
            pass
    os._exit(0)


def main(argv: list[str]) -> None:
    command = argv[2:]
    if command[:1] == ["--"]:
        command = command[1:]
    if len(argv) < 2 or not argv[1].isdigit() or not command:
        sys.exit("usage: python bench/hogs.py N [--] COMMAND [ARG...]")
    me = os.getpid()
    for _ in range(int(argv[1])):
        if os.fork() == 0:
            _spin(me)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv)
