"""The original FastAPI recipe's client, `requests`, against tollgate's
`/generate` and `/chat` (SPEC §5)."""

import requests

from tollgate_env import EMPTY_KEY, KEY, TIMEOUT, URL

REPLY = "w0 w1 w2 "


def headers(key=KEY):
    return {"x-api-key": key, "Content-Type": "application/json"}


def test_the_recipes_call_exactly(control):
    # Verbatim from the recipe, but for the address.
    response = requests.post(URL + "/generate?prompt=hello", headers=headers(), timeout=TIMEOUT)
    assert response.json()["response"] == REPLY
    assert response.status_code == 200
    assert float(response.headers["x-credits-remaining"]) >= 0
    forwarded = control.last_request()
    assert forwarded["path"] == "/api/generate"
    assert forwarded["body"]["prompt"] == "hello"
    assert forwarded["body"]["model"] == "mistral"
    assert forwarded["body"]["stream"] is False


def test_generate_with_a_json_body():
    response = requests.post(
        URL + "/generate",
        headers=headers(),
        json={"prompt": "hello", "model": "llama3.2"},
        timeout=TIMEOUT,
    )
    assert response.status_code == 200
    body = response.json()
    assert body["response"] == REPLY and body["model"] == "llama3.2"


def test_chat():
    response = requests.post(
        URL + "/chat",
        headers=headers(),
        json={"messages": [{"role": "user", "content": "hello"}]},
        timeout=TIMEOUT,
    )
    assert response.status_code == 200
    assert response.json()["message"]["content"] == REPLY


def test_bad_key_and_empty_balance():
    bad = requests.post(URL + "/generate?prompt=hello", headers=headers("nope"), timeout=TIMEOUT)
    assert bad.status_code == 401
    assert isinstance(bad.json()["error"], str)
    empty = requests.post(URL + "/generate?prompt=hello", headers=headers(EMPTY_KEY), timeout=TIMEOUT)
    assert empty.status_code == 402
    assert isinstance(empty.json()["error"], str)


def test_balance_goes_down_by_one_credit_per_request():
    me = requests.get(URL + "/me", headers={"x-api-key": KEY}, timeout=TIMEOUT).json()
    before = me["credits"]
    requests.post(URL + "/generate?prompt=hello", headers=headers(), timeout=TIMEOUT).raise_for_status()
    after = requests.get(URL + "/me", headers={"x-api-key": KEY}, timeout=TIMEOUT).json()["credits"]
    assert before - after == 1
