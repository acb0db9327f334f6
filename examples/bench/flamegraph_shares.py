#!/usr/bin/env python3
"""Where a flamegraph's CPU went, in microseconds per request.

    python3 examples/bench/flamegraph_shares.py OUT.folded [OUT.md]

Reads the stacks that `flamegraph.sh` left (OUT.folded: one stack per
line, frames separated by `;`, kernel frames ending in `_[k]`, then its
CPU time) and puts each stack to one part of the proxy:

- `kernel` when the sample was taken in the kernel;
- otherwise the innermost of tollgate's own functions on the stack
  decides (`tollgate::proxy::connection` is the client connection to
  Ollama, `tollgate::credits` and `tollgate::store` the settlement, ...);
- a stack with none of tollgate's functions on it goes by its innermost
  hyper, axum or tokio frame (the floor's stacks, the runtime's own work);
  the floor's client connection runs in a task of its own, whose stacks
  start at hyper's client `Connection`.

With OUT.md (the benchmark's report of the same round) the shares are
turned into microseconds of CPU per request with the CPU per request the
report measured; without it, they are printed as percentages.
"""

import re
import sys
from collections import Counter

# (part, frame patterns): the first part whose pattern a frame contains.
TOLLGATE = [
    ("client connection", ["tollgate::proxy::connection"]),
    ("relay, token counts, headers, glance", ["tollgate::proxy", "tollgate::routes::inspect", "tollgate::policy"]),
    ("settlement (credits, store)", ["tollgate::credits", "tollgate::store"]),
    ("metrics and log record", ["tollgate::telemetry"]),
    ("key check and limits", ["tollgate::auth", "tollgate::limits"]),
    ("router and handler", ["tollgate::routes", "tollgate::app"]),
    ("server connection", ["tollgate::server"]),
]
# The root of the floor's client connection task.
CLIENT_TASK = "client::conn::http1::Connection<T,B> as core::future::future::Future>::poll"
OTHERS = [
    ("router and handler", ["axum::", "floor::"]),
    ("server connection", ["hyper::"]),
    ("runtime", ["tokio::"]),
]


def part_of(frames):
    if frames[-1].endswith("_[k]"):
        return "kernel"
    if any(CLIENT_TASK in frame for frame in frames):
        return "client connection"
    for table in (TOLLGATE, OTHERS):
        for frame in reversed(frames):
            for part, patterns in table:
                if any(p in frame for p in patterns):
                    return part
    return "other"


def cpu_per_request(report):
    """The proxy's CPU per request (or per stream) in the report: the first
    table with a "proxy CPU µs/..." column that has a figure in it."""
    column = None
    with open(report) as f:
        for line in f:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not line.startswith("|"):
                column = None
            elif any(c.startswith("proxy CPU µs/") for c in cells):
                column = next(i for i, c in enumerate(cells) if c.startswith("proxy CPU µs/"))
            elif column is not None and len(cells) > column:
                figure = re.match(r"[\d.]+", cells[column])
                if figure:
                    return float(figure.group(0))
    return None


def main():
    if len(sys.argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    parts = Counter()
    total = 0
    with open(sys.argv[1]) as f:
        for line in f:
            stack, weight = line.rsplit(" ", 1)
            parts[part_of(stack.split(";"))] += int(weight)
            total += int(weight)
    scale = cpu_per_request(sys.argv[2]) if len(sys.argv) == 3 else None
    for part, weight in parts.most_common():
        share = weight / total
        figure = f"{scale * share:5.1f} µs" if scale else f"{100 * share:5.1f}%"
        print(f"{figure}  {part}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
