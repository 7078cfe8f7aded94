"""lrserve's benchmark suite: ``python -m bench [--quick] [--only NAME ...] [--json PATH]``.

Every comparison runs side by side in the same run (alternating rounds) against real
server processes on loopback; see docs/performance.md for what each figure measures.
"""
