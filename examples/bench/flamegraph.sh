#!/usr/bin/env bash
# A flamegraph of one benchmark target's CPU at saturation.
#
#   bash examples/bench/flamegraph.sh [TARGET] [OUT.svg] [SCENARIO]
#
# TARGET is one of the benchmark's targets (default `tollgate-sqlite`,
# the default store; `tollgate-memory`, `hyper-floor-axum`, `nginx`, ...;
# not `direct`, which has no process of its own),
# SCENARIO `saturation` (default: non-streamed chat, 32 connections) or
# `stream`. It builds tollgate, the benchmark and the floor with frame
# pointers into their own target directory (the release build is not
# touched), runs one round of the scenario against TARGET alone, records
# the proxy's processes (nginx: its master and workers) with
# `perf record -g` for 3 s in the middle of the measured window, and
# renders the samples with inferno. `perf` must be installed
# (`apt-get install -y linux-perf`, or the kernel's `perf` package);
# inferno is installed with cargo when missing.
#
# Besides OUT.svg (default `target/flamegraph-TARGET.svg`; a relative
# path is taken from the repository's root, where the script runs) it writes OUT.md, the
# benchmark's report of that round (requests/s and CPU per request), and
# OUT.folded, one line per stack with its weight (nanoseconds of CPU;
# kernel frames end in `_[k]`). At the end it prints what
# `flamegraph_shares.py` makes of the two: the CPU per request by part of
# the proxy (kernel, server connection, client connection, handler,
# settlement, ...). Frame pointers make the stacks of tollgate and its
# crates whole; the standard library and glibc are built without them, so
# a few of their frames are cut short and show under their caller's
# caller.
set -euo pipefail

target=${1:-tollgate-sqlite}
out=${2:-target/flamegraph-$target.svg}
scenario=${3:-saturation}
case $scenario in
saturation | stream) ;;
*)
    echo "flamegraph: SCENARIO is saturation or stream" >&2
    exit 2
    ;;
esac

cd "$(dirname "$0")/../.."
mkdir -p "$(dirname "$out")"
# Where `cargo install` puts inferno.
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
command -v perf >/dev/null || {
    echo "flamegraph: perf is not installed" >&2
    exit 1
}
if ! command -v inferno-flamegraph >/dev/null; then
    cargo install --locked inferno
fi

build=target/frame-pointers
RUSTFLAGS="-C force-frame-pointers=yes" CARGO_TARGET_DIR=$build \
    cargo build --release --locked --bin tollgate --examples

work=$(mktemp -d)
bench=
# On any way out, the benchmark (which stops its targets on SIGTERM) too.
trap '[ -n "$bench" ] && kill "$bench" 2>/dev/null; rm -rf "$work"' EXIT
: >"$work/bench.log"
"$build/release/examples/bench" --rounds 1 --scenarios "$scenario" --only "$target" \
    --tollgate "$PWD/$build/release/tollgate" --out "${out%.svg}.md" >/dev/null 2>"$work/bench.log" &
bench=$!

# The benchmark names the gateway's process once it has started it:
# "started tollgate-sqlite on 127.0.0.1:PORT (pids [PID, ...])".
pid=
for _ in $(seq 600); do
    pid=$(sed -n "s/.*started $target on .* (pids \[\([0-9, ]*\)\]).*/\1/p" "$work/bench.log" | tr -d ' ')
    [ -n "$pid" ] && break
    kill -0 "$bench" 2>/dev/null || break
    sleep 0.1
done
if [ -z "$pid" ]; then
    cat "$work/bench.log" >&2
    echo "flamegraph: the benchmark did not start $target" >&2
    exit 1
fi

# 0.3 s of warm-up, then the scenario's 1 s warm-up and 4 s measurement:
# record 3 s from 1.8 s on.
sleep 1.8
# cpu-clock: the weights are nanoseconds on any host (the default event
# is `cycles` where there is a hardware counter), and the kernel's
# stacks are recorded whenever perf may see them.
perf record -e cpu-clock -F 2999 -g -p "$pid" -o "$work/perf.data" -- sleep 3 \
    2>"$work/perf.log" || {
    cat "$work/perf.log" >&2
    echo "flamegraph: perf could not record $target (pids $pid)" >&2
    exit 1
}
wait "$bench" || {
    cat "$work/bench.log" >&2
    echo "flamegraph: the benchmark failed" >&2
    exit 1
}
bench=

perf script -i "$work/perf.data" 2>/dev/null | inferno-collapse-perf --kernel >"${out%.svg}.folded"
inferno-flamegraph --title "$target, $scenario ($(git rev-parse --short HEAD))" \
    <"${out%.svg}.folded" >"$out"
echo "flamegraph: $out ($(awk '{n += $NF} END {printf "%.2f", n / 1e9}' "${out%.svg}.folded") s of CPU recorded)"
python3 examples/bench/flamegraph_shares.py "${out%.svg}.folded" "${out%.svg}.md"
