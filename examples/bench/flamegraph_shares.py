#!/usr/bin/env python3
"""Where a flamegraph's CPU went, in microseconds per request.

    python3 examples/bench/flamegraph_shares.py OUT.folded [OUT.md]

Reads the stacks that `flamegraph.sh` left (OUT.folded: one stack per
line, frames separated by `;`, kernel frames ending in `_[k]`, then its
CPU time) and puts each stack to one part of the proxy, by the innermost
frame on it that marks a part:

- `kernel` when the sample was taken in the kernel (the vDSO's clock
  reads, which inferno marks like kernel frames, run in user mode and go
  to their caller's part);
- tollgate's own functions mark its parts (`tollgate::server` the server
  connection, `tollgate::proxy::connection` the client connection to
  Ollama, `tollgate::credits` and `tollgate::store` the settlement, ...);
  hyper's, axum's and tokio's frames go to the part of the tollgate
  function they run under;
- a stack with no tollgate function goes by the floor's functions and
  axum's frames (`floor::routed::serve` the server connection,
  `floor::exchange` and the client connection's own task the client
  connection, axum the router), and failing those by hyper's (the server
  connection) or tokio's (the runtime's own work).

With OUT.md (the benchmark's report of the same round) the shares are
turned into microseconds of CPU per request (or per stream) with the
figure the report measured over the whole round; without it, they are
printed as percentages.
"""

import re
import sys
from collections import Counter

# (part, frame patterns) in the order they are tried on one frame.
TOLLGATE = [
    ("client connection", ["tollgate::proxy::connection"]),
    ("relay, token counts, headers, glance", ["tollgate::proxy", "tollgate::routes::inspect", "tollgate::policy"]),
    ("settlement (credits, store)", ["tollgate::credits", "tollgate::store"]),
    ("metrics and log record", ["tollgate::telemetry"]),
    ("key check and limits", ["tollgate::auth", "tollgate::limits"]),
    ("router and handler", ["tollgate::routes", "tollgate::app"]),
    ("server connection", ["tollgate::server"]),
]
FLOOR = [
    ("client connection", [
        "floor::exchange", "floor::connect",
        # The root of the floor's client connection task.
        "client::conn::http1::Connection<T,B> as core::future::future::Future>::poll",
    ]),
    ("router and handler", ["axum::", "floor::routed::passthrough", "floor::routed::root", "floor::forward"]),
    ("server connection", ["floor::routed::serve", "floor::serve"]),
]
LIBRARIES = [
    ("server connection", ["hyper::"]),
    ("runtime", ["tokio::"]),
]


def is_kernel(frame):
    return frame.endswith("_[k]") and not frame.startswith("__vdso")


def part_of(frames):
    if is_kernel(frames[-1]):
        return "kernel"
    for table in (TOLLGATE, FLOOR, LIBRARIES):
        for frame in reversed(frames):
            for part, patterns in table:
                if any(p in frame for p in patterns):
                    return part
    return "other"


def cpu_per_request(report):
    """The proxy's CPU per request (or per stream) in the report, and its
    unit: the first table with a "proxy CPU µs/..." column that has a
    figure in it."""
    column = None
    with open(report, encoding="utf-8") as f:
        for line in f:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not line.startswith("|"):
                column = None
            elif any(c.startswith("proxy CPU µs/") for c in cells):
                column = next(i for i, c in enumerate(cells) if c.startswith("proxy CPU µs/"))
                unit = cells[column].removeprefix("proxy CPU ")
            elif column is not None and len(cells) > column:
                figure = re.match(r"[\d.]+", cells[column])
                if figure:
                    return float(figure.group(0)), unit
    return None


def main():
    if len(sys.argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    parts = Counter()
    with open(sys.argv[1], encoding="utf-8") as f:
        for line in f:
            stack, weight = line.rsplit(" ", 1)
            parts[part_of(stack.split(";"))] += int(weight)
    total = sum(parts.values())
    if total == 0:
        print(f"{sys.argv[1]}: no samples", file=sys.stderr)
        return 1
    if parts["kernel"] == 0:
        print("no kernel samples: was perf allowed to record the kernel?", file=sys.stderr)
    scale = None
    if len(sys.argv) == 3:
        scale = cpu_per_request(sys.argv[2])
        if scale is None:
            print(f"{sys.argv[2]}: no CPU figure found; shares in per cent", file=sys.stderr)
    for part, weight in parts.most_common():
        share = weight / total
        figure = f"{scale[0] * share:5.1f} {scale[1]}" if scale else f"{100 * share:5.1f}%"
        print(f"{figure}  {part}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
