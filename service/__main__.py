"""``python -m lrserve.service [OPTIONS]`` starts the server (same as ``lrserve serve``);
``python -m lrserve.service COMMAND ...`` runs any other ``lrserve`` command."""

import sys

from lrserve.service.cli import main

if __name__ == "__main__":  # not when a worker process (spawned: service.offload) imports it
    args = sys.argv[1:]
    if not args or args[0].startswith("-") and args[0] not in ("-h", "--help"):
        args = ["serve", *args]
    raise SystemExit(main(args))
