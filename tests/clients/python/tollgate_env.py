"""Where tollgate and the fake's control server are, for the client tests
that tests/it/clients.rs runs.

The Rust test starts tollgate in front of the fake Ollama and a control
server for the fake, then runs pytest with these environment variables:

    TOLLGATE_URL           tollgate's base URL (http://127.0.0.1:PORT)
    TOLLGATE_KEY           an ordinary key with plenty of credits
    TOLLGATE_EMPTY_KEY     an ordinary key with 0 credits (402)
    TOLLGATE_LIMITED_KEY   an ordinary key allowed only the model `mistral`
    TOLLGATE_ADMIN_KEY     the admin key
    TOLLGATE_CONTROL_URL   the fake's control server (see tests/it/clients.rs)
    TOLLGATE_THROTTLED_URL a second tollgate, AUTH_FAILURES_PER_MINUTE=2, with
                           the same key TOLLGATE_KEY (for 429)
    TOLLGATE_PRICED_URL    a third tollgate with token pricing (1 credit per
                           request + 1 per 1,000 prompt and per 1,000
                           completion tokens), with the same key TOLLGATE_KEY

The second and third have their own fake Ollama, which the control server
does not steer.

Nothing here waits on a clock: streaming tests run in lockstep with the fake.
"""

import os

import requests

URL = os.environ["TOLLGATE_URL"]
KEY = os.environ["TOLLGATE_KEY"]
EMPTY_KEY = os.environ["TOLLGATE_EMPTY_KEY"]
LIMITED_KEY = os.environ["TOLLGATE_LIMITED_KEY"]
ADMIN_KEY = os.environ["TOLLGATE_ADMIN_KEY"]
CONTROL_URL = os.environ["TOLLGATE_CONTROL_URL"]
THROTTLED_URL = os.environ["TOLLGATE_THROTTLED_URL"]
PRICED_URL = os.environ["TOLLGATE_PRICED_URL"]

# Generous: only a gateway that holds a chunk back ever waits this long.
TIMEOUT = 30


class Control:
    """The fake Ollama's control server."""

    def _post(self, path, body=None):
        r = requests.post(CONTROL_URL + path, json=body or {}, timeout=TIMEOUT)
        assert r.status_code == 200, f"control {path}: {r.status_code} {r.text}"

    def behavior(self, **fields):
        """Replaces the fake's behaviour: the defaults plus these fields."""
        self._post("/behavior", fields)

    def step(self, n=1):
        """Lockstep: lets the fake send `n` more streamed items."""
        self._post("/step", {"n": n})

    def reset(self):
        self._post("/reset")

    def requests(self):
        """Every request the fake received, oldest first."""
        r = requests.get(CONTROL_URL + "/requests", timeout=TIMEOUT)
        r.raise_for_status()
        return r.json()

    def count(self):
        """How many requests the fake has received so far."""
        return len(self.requests())

    def last_request(self):
        seen = self.requests()
        assert seen, "the fake received nothing"
        return seen[-1]
