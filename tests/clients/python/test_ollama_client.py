"""The official `ollama` Python package, pointed at tollgate (SPEC §3, §5, §6)."""

import asyncio

import ollama
import pytest

from tollgate_env import ADMIN_KEY, EMPTY_KEY, KEY, THROTTLED_URL, TIMEOUT, URL

MESSAGES = [{"role": "user", "content": "hello"}]
# The fake's reply with its default three chunks.
REPLY = "w0 w1 w2 "


def client(key=KEY, **kwargs):
    return ollama.Client(host=URL, headers={"x-api-key": key}, timeout=TIMEOUT, **kwargs)


def forwarded_headers(control):
    return {name.lower() for name in control.last_request()["headers"]}


# --- where the key comes from --------------------------------------------


def test_chat_with_x_api_key_header(control):
    r = client().chat(model="mistral", messages=MESSAGES)
    assert r.message.role == "assistant"
    assert r.message.content == REPLY
    assert r.done and r.done_reason == "stop"
    assert r.eval_count == 3
    sent = forwarded_headers(control)
    assert "x-api-key" not in sent and "authorization" not in sent


def test_ollama_api_key_alone_becomes_a_bearer_key(monkeypatch, control):
    monkeypatch.setenv("OLLAMA_API_KEY", KEY)
    c = ollama.Client(host=URL, timeout=TIMEOUT)
    assert c._client.headers["authorization"] == f"Bearer {KEY}"
    assert c.generate(model="mistral", prompt="hi").response == REPLY
    assert "authorization" not in forwarded_headers(control)


def test_x_api_key_wins_over_ollama_api_key_even_when_wrong(monkeypatch, control):
    monkeypatch.setenv("OLLAMA_API_KEY", KEY)
    seen = control.count()
    with pytest.raises(ollama.ResponseError) as e:
        client(key="wrong-key").chat(model="mistral", messages=MESSAGES)
    assert e.value.status_code == 401
    assert control.count() == seen


def test_x_api_key_wins_over_a_wrong_ollama_api_key(monkeypatch):
    monkeypatch.setenv("OLLAMA_API_KEY", "wrong-key")
    assert client().chat(model="mistral", messages=MESSAGES).message.content == REPLY


def test_host_from_ollama_host(monkeypatch):
    monkeypatch.setenv("OLLAMA_HOST", URL)
    c = ollama.Client(headers={"x-api-key": KEY}, timeout=TIMEOUT)
    assert c.generate(model="mistral", prompt="hi").response == REPLY


# --- the API ------------------------------------------------------------


def test_generate():
    r = client().generate(model="mistral", prompt="hi")
    assert r.response == REPLY
    assert r.done and r.prompt_eval_count == 7 and r.eval_count == 3


def test_generate_streamed():
    parts = list(client().generate(model="mistral", prompt="hi", stream=True))
    assert [p.response for p in parts] == ["w0 ", "w1 ", "w2 ", ""]
    assert parts[-1].done and parts[-1].eval_count == 3


def test_chat_streams_chunk_by_chunk(control):
    # The fake sends each chunk after the first only when told to, and it is
    # told only once the previous chunk has reached this client: a gateway
    # that held anything back would make this test time out.
    control.behavior(lockstep=True, chunks=5)
    stream = client().chat(model="mistral", messages=MESSAGES, stream=True)
    for k in range(5):
        part = next(stream)
        assert part.message.content == f"w{k} "
        assert not part.done
        control.step()
    last = next(stream)
    assert last.done and last.done_reason == "stop" and last.eval_count == 5
    with pytest.raises(StopIteration):
        next(stream)


def test_embed():
    r = client().embed(model="nomic-embed-text", input=["hello", "world"])
    assert len(r.embeddings) == 2
    assert all(len(v) == 8 for v in r.embeddings)
    assert r.embeddings[0] != r.embeddings[1]


def test_legacy_embeddings():
    r = client().embeddings(model="nomic-embed-text", prompt="hello")
    assert len(r.embedding) == 8


def test_list():
    names = [m.model for m in client().list().models]
    assert "mistral:latest" in names and "nomic-embed-text:latest" in names


def test_show():
    r = client().show("mistral")
    assert r.details.family == "llama"
    assert "FROM" in r.modelfile
    assert "completion" in r.capabilities


def test_ps():
    # A model is loaded once a request has used it; the SDK parses Ollama's
    # entry (times, sizes, details) into its types.
    client().generate(model="mistral", prompt="hi")
    running = {m.model: m for m in client().ps().models}
    loaded = running["mistral:latest"]
    assert loaded.size_vram == loaded.size > 0
    assert loaded.expires_at is not None and loaded.expires_at.year == 2025
    assert loaded.details.family == "llama"


def test_async_client_streams_chunk_by_chunk(control):
    control.behavior(lockstep=True, chunks=4)

    async def run():
        c = ollama.AsyncClient(host=URL, headers={"x-api-key": KEY}, timeout=TIMEOUT)
        stream = await c.chat(model="mistral", messages=MESSAGES, stream=True)
        got = []
        async for part in stream:
            got.append(part)
            if not part.done:
                control.step()
        return got

    got = asyncio.run(run())
    assert [p.message.content for p in got] == ["w0 ", "w1 ", "w2 ", "w3 ", ""]
    assert got[-1].done


def test_async_client_generate():
    async def run():
        c = ollama.AsyncClient(host=URL, headers={"x-api-key": KEY}, timeout=TIMEOUT)
        return await c.generate(model="mistral", prompt="hi")

    assert asyncio.run(run()).response == REPLY


# --- errors ---------------------------------------------------------------


def test_bad_key_is_a_401_response_error(control):
    seen = control.count()
    with pytest.raises(ollama.ResponseError) as e:
        client(key="not-a-key").chat(model="mistral", messages=MESSAGES)
    assert e.value.status_code == 401
    # tollgate answers in Ollama's shape, so the SDK extracts the message.
    assert isinstance(e.value.error, str) and "key" in e.value.error.lower()
    assert not e.value.error.startswith("{")
    assert control.count() == seen


def test_missing_key_is_a_401_response_error():
    c = ollama.Client(host=URL, timeout=TIMEOUT)
    with pytest.raises(ollama.ResponseError) as e:
        c.list()
    assert e.value.status_code == 401


def test_bad_key_on_a_stream_is_a_401_response_error():
    with pytest.raises(ollama.ResponseError) as e:
        for _ in client(key="not-a-key").chat(model="mistral", messages=MESSAGES, stream=True):
            pass
    assert e.value.status_code == 401


def test_empty_balance_is_a_402_response_error(control):
    seen = control.count()
    for stream in (False, True):
        with pytest.raises(ollama.ResponseError) as e:
            r = client(key=EMPTY_KEY).generate(model="mistral", prompt="hi", stream=stream)
            if stream:
                list(r)
        assert e.value.status_code == 402
        assert "credit" in e.value.error.lower()
    assert control.count() == seen


def test_repeated_wrong_keys_are_a_429_response_error():
    # The throttled tollgate allows 2 wrong keys per address per minute.
    bad = ollama.Client(host=THROTTLED_URL, headers={"x-api-key": "guess"}, timeout=TIMEOUT)
    good = ollama.Client(host=THROTTLED_URL, headers={"x-api-key": KEY}, timeout=TIMEOUT)
    statuses = []
    for i in range(3):
        with pytest.raises(ollama.ResponseError) as e:
            bad.generate(model="mistral", prompt="hi")
        statuses.append(e.value.status_code)
        if i == 0:
            # A key at work from the same address since the first wrong one.
            assert good.generate(model="mistral", prompt="hi").response == REPLY
    assert statuses == [401, 401, 429]
    assert isinstance(e.value.error, str) and not e.value.error.startswith("{")
    # It keeps working.
    assert good.generate(model="mistral", prompt="hi").response == REPLY


def test_unknown_model_is_ollamas_own_404():
    with pytest.raises(ollama.ResponseError) as e:
        client().chat(model="no-such-model", messages=MESSAGES)
    assert e.value.status_code == 404
    assert e.value.error == "model 'no-such-model' not found"


def test_in_stream_error_is_raised(control):
    control.behavior(chunks=5, stream_error_after=2)
    got = []
    with pytest.raises(ollama.ResponseError) as e:
        for part in client().chat(model="mistral", messages=MESSAGES, stream=True):
            got.append(part.message.content)
    assert got == ["w0 ", "w1 "]
    assert "unexpected EOF" in e.value.error


def test_error_in_a_non_streamed_reply_is_raised(control):
    control.behavior(chunks=5, stream_error_after=2)
    with pytest.raises(ollama.ResponseError) as e:
        client().generate(model="mistral", prompt="hi")
    assert e.value.status_code == 500
    assert "unexpected EOF" in e.value.error


def test_ollama_going_away_mid_stream_is_raised(control):
    control.behavior(chunks=5, die_after=2)
    got = []
    # tollgate ends the stream with an error line of its own.
    with pytest.raises(ollama.ResponseError):
        for part in client().chat(model="mistral", messages=MESSAGES, stream=True):
            got.append(part.message.content)
    assert got == ["w0 ", "w1 "]


# --- model management: admin only ----------------------------------------


def test_model_management_needs_the_admin_key(control):
    seen = control.count()
    with pytest.raises(ollama.ResponseError) as e:
        client().pull("tinyllama")
    assert e.value.status_code == 403
    with pytest.raises(ollama.ResponseError) as e:
        client().delete("mistral")
    assert e.value.status_code == 403
    assert control.count() == seen


def test_admin_pulls_creates_copies_and_deletes():
    admin = client(key=ADMIN_KEY)
    statuses = [p.status for p in admin.pull("tinyllama", stream=True)]
    assert statuses[-1] == "success"
    assert admin.create(model="pirate", from_="mistral", system="Talk like a pirate.").status == "success"
    assert admin.copy("pirate", "pirate2").status == "success"
    assert admin.delete("pirate2").status == "success"
    names = {m.model for m in admin.list().models}
    assert {"tinyllama:latest", "pirate:latest"} <= names
    assert "pirate2:latest" not in names


def test_blob_uploads_are_for_the_admin_key(tmp_path, control):
    blob = tmp_path / "adapter.bin"
    blob.write_bytes(b"\x00tollgate\xff" * 10_000)
    seen = control.count()
    with pytest.raises(ollama.ResponseError) as e:
        client().create_blob(blob)
    assert e.value.status_code == 403
    assert control.count() == seen
    digest = client(key=ADMIN_KEY).create_blob(blob)
    assert digest.startswith("sha256:")
    forwarded = control.last_request()
    assert forwarded["method"] == "POST" and forwarded["path"] == f"/api/blobs/{digest}"
