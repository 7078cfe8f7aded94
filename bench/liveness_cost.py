"""Cost of ``Liveness.observe`` per answered request, what the telemetry middleware adds to
every request for ``last_seen``: ``python -m bench.liveness_cost``.

A microbenchmark on purpose: the HTTP figures (``hot_path``) vary by more than a
microsecond from run to run on a shared machine, so they cannot show this one.
"""

from __future__ import annotations

import timeit

from lrserve.service.liveness import Liveness

CASES = (
    ("a rank's route (GET .../lr)", "/v1/runs/{run_id}/lr"),
    ("any other route (.../history)", "/v1/runs/{run_id}/history"),
)


def main(n: int = 1_000_000) -> None:
    liveness = Liveness(300)
    scope = {"type": "http", "path_params": {"run_id": "resnet50-a1"}}
    for label, route in CASES:
        best = min(timeit.repeat(lambda r=route: liveness.observe(r, scope, 200), number=n, repeat=5)) / n
        print(f"{label:32s} {best * 1e6:.3f} µs per request")


if __name__ == "__main__":
    main()
