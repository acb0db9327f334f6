#!/usr/bin/env python3
"""Instructions per proxied request, counted by valgrind's callgrind.

A count of instructions depends far less on what else the machine is doing
than a timing (runs of one build agree within ~0.5% on a quiet host, ~3% on
a busy one: polls and wake-ups still follow timing), so it tells two builds
apart where this host's timings cannot; alternate the builds and repeat. It does not replace the timed
benchmark: a count says nothing of system calls, waits, cache misses or
thread hand-offs, and valgrind counts each byte of a `rep movsb` copy as an
instruction, so large copies look dearer than they are.

What it does: starts the benchmark's fake Ollama (`--fake-only 0,0`),
starts the tollgate binary under `valgrind --tool=callgrind` in front of it
with one key and the chosen store, sends non-streamed `POST /api/chat`
requests over keep-alive connections, ends tollgate with SIGTERM and reads
callgrind's total. It does so for two numbers of requests and prints the
difference divided by the difference in requests: start-up and shutdown
cancel out.

    cargo build --release --example bench    # the fake
    cargo build --release                    # or any build: --tollgate PATH
    python3 examples/bench/instructions.py --store sqlite --store memory

Needs valgrind (`apt-get install -y valgrind`). Only 127.0.0.1 is used.
"""

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

BODY = json.dumps(
    {"model": "mistral", "messages": [{"role": "user", "content": "Say hello."}], "stream": False},
    separators=(",", ":"),
)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def count(tollgate, fake_addr, store, requests, connections):
    """Total instructions of one tollgate process that served `requests`."""
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        database = "memory" if store == "memory" else "sqlite://" + os.path.join(tmp, "bench.db")
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "API_KEYS": "key=100000000",
            "DATABASE_URL": database,
            "OLLAMA_URL": fake_addr,
            "LISTEN_ADDR": f"127.0.0.1:{port}",
            "RUST_LOG": "warn",
            "LOG_FORMAT": "json",
        }
        out = os.path.join(tmp, "callgrind.out")
        gateway = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", tollgate],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for_health(port, gateway)
            send(port, requests, connections)
        finally:
            gateway.send_signal(signal.SIGTERM)
            gateway.wait()
        with open(out) as f:
            for line in f:
                if line.startswith("summary:"):
                    return int(line.split()[1])
    raise RuntimeError("callgrind wrote no summary")


def wait_for_health(port, gateway):
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if gateway.poll() is not None:
            raise RuntimeError(f"tollgate exited with {gateway.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError("tollgate did not answer /health within 60 s")


def send(port, requests, connections):
    errors = []

    def client(n):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        headers = {"x-api-key": "key", "content-type": "application/json"}
        for _ in range(n):
            conn.request("POST", "/api/chat", BODY, headers)
            reply = conn.getresponse()
            reply.read()
            if reply.status != 200:
                errors.append(reply.status)
                return

    share = requests // connections
    threads = [threading.Thread(target=client, args=(share,)) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"a request was answered {errors[0]}, not 200")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tollgate", default="target/release/tollgate")
    parser.add_argument("--fake", default="target/release/examples/bench")
    parser.add_argument("--store", action="append", choices=["memory", "sqlite"])
    parser.add_argument("--requests", type=int, default=2048, help="the difference between the two runs")
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    fake = subprocess.Popen([args.fake, "--fake-only", "0,0"], stdout=subprocess.PIPE, text=True)
    try:
        fake_addr = fake.stdout.readline().strip().split()[-1]
        small = args.connections * 16
        for store in args.store or ["sqlite", "memory"]:
            few = count(args.tollgate, fake_addr, store, small, args.connections)
            many = count(args.tollgate, fake_addr, store, small + args.requests, args.connections)
            per_request = (many - few) / args.requests
            print(f"{store}: {per_request:,.0f} instructions per request "
                  f"({args.tollgate}, {args.connections} connections)")
    finally:
        fake.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
