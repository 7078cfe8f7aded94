"""Optuna's gRPC storage proxy on loopback, as its docs run it (``python -m bench._optuna_proxy``).

``--storage`` is an RDB URL (``sqlite:///file.db``: durable, like lrserve on SQLite) or
``memory`` (Optuna's in-memory storage: its fastest, and not durable).
"""

from __future__ import annotations

import argparse
import logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--storage", default="memory")
    args = parser.parse_args(argv)

    import optuna
    from optuna.storages import get_storage, run_grpc_proxy_server

    optuna.logging.set_verbosity(logging.WARNING)
    storage = get_storage(None if args.storage == "memory" else args.storage)
    run_grpc_proxy_server(storage, host="127.0.0.1", port=args.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
