"""The official `openai` Python package with `base_url=tollgate/v1`
(SPEC §3, §5 `/v1/*`, §6, §7)."""

import asyncio

import time

import openai
import pytest
import requests

from tollgate_env import EMPTY_KEY, KEY, LIMITED_KEY, PRICED_URL, THROTTLED_URL, TIMEOUT, URL

MESSAGES = [{"role": "user", "content": "hello"}]
REPLY = "w0 w1 w2 "
OPENAI_ERROR_FIELDS = {"message", "type", "param", "code"}


def client(key=KEY, base=URL):
    # No retries: the SDK retries 429 and 5xx by default, which would hide
    # what tollgate answered.
    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=TIMEOUT)


def assert_openai_shape(error):
    """tollgate's own errors on /v1 have OpenAI's shape; the SDK exposes
    the inner `error` object as `.body`."""
    assert isinstance(error.body, dict), error.body
    assert OPENAI_ERROR_FIELDS <= set(error.body), error.body
    assert isinstance(error.body["message"], str) and error.body["message"]
    assert error.message.startswith(f"Error code: {error.status_code}")


# --- the API ------------------------------------------------------------


def test_chat(control):
    r = client().chat.completions.create(model="mistral", messages=MESSAGES)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == REPLY
    assert r.choices[0].finish_reason == "stop"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (7, 3)
    sent = {name.lower() for name in control.last_request()["headers"]}
    assert "authorization" not in sent


def test_chat_streams_event_by_event(control):
    control.behavior(lockstep=True, chunks=5)
    stream = client().chat.completions.create(model="mistral", messages=MESSAGES, stream=True)
    it = iter(stream)
    for k in range(5):
        chunk = next(it)
        assert chunk.object == "chat.completion.chunk"
        assert chunk.choices[0].delta.content == f"w{k} "
        if k == 0:
            assert chunk.choices[0].delta.role == "assistant"
        control.step()
    finish = next(it)
    assert finish.choices[0].finish_reason == "stop"
    assert not finish.choices[0].delta.content
    control.step()  # lets `data: [DONE]` go
    with pytest.raises(StopIteration):
        next(it)


def test_streamed_usage_when_asked():
    stream = client().chat.completions.create(
        model="mistral",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == REPLY
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 3


def test_token_priced_streams_look_the_same_to_the_client():
    # With token pricing tollgate asks Ollama for usage on every stream, and
    # must remove the usage chunk when the client did not ask for it.
    priced = client(base=PRICED_URL)
    plain = list(priced.chat.completions.create(model="mistral", messages=MESSAGES, stream=True))
    assert all(c.choices for c in plain), "a usage chunk the client did not ask for"
    assert all(c.usage is None for c in plain)
    assert "".join(c.choices[0].delta.content or "" for c in plain) == REPLY
    asked = list(
        priced.chat.completions.create(
            model="mistral",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert [c.choices for c in asked].count([]) == 1
    assert asked[-1].usage.total_tokens == 10
    # Both charged 1 credit + 10 tokens at 1 credit per 1,000.
    me = {}
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        me = requests.get(PRICED_URL + "/me", headers={"x-api-key": KEY}, timeout=TIMEOUT).json()
        if me["usage"]["requests"] >= 2:
            break
        time.sleep(0.05)
    assert me["usage"]["requests"] == 2, me
    assert me["usage"]["credits_spent"] == pytest.approx(2.02), me
    assert me["usage"]["completion_tokens"] == 6, me


def test_completions():
    r = client().completions.create(model="mistral", prompt="hi")
    assert r.choices[0].text == REPLY
    assert r.usage.completion_tokens == 3
    streamed = client().completions.create(model="mistral", prompt="hi", stream=True)
    assert "".join(c.choices[0].text for c in streamed) == REPLY


def test_embeddings_default_base64_and_float(control):
    r = client().embeddings.create(model="nomic-embed-text", input="hello")
    # The SDK asks for base64 by default and decodes it itself.
    assert control.last_request()["body"]["encoding_format"] == "base64"
    vector = r.data[0].embedding
    assert len(vector) == 8 and all(isinstance(x, float) for x in vector)
    floats = client().embeddings.create(
        model="nomic-embed-text", input="hello", encoding_format="float"
    )
    assert floats.data[0].embedding == pytest.approx(vector)
    two = client().embeddings.create(model="nomic-embed-text", input=["a", "b"])
    assert [d.index for d in two.data] == [0, 1]


def test_models_list_and_retrieve():
    ids = [m.id for m in client().models.list()]
    assert "mistral:latest" in ids and "llama3.2:latest" in ids
    assert client().models.retrieve("mistral:latest").id == "mistral:latest"


def test_limited_key_sees_only_its_models():
    ids = [m.id for m in client(key=LIMITED_KEY).models.list()]
    assert ids == ["mistral:latest"]
    assert client(key=LIMITED_KEY).chat.completions.create(
        model="mistral", messages=MESSAGES
    ).choices[0].message.content == REPLY


def test_async_client_streams():
    async def run():
        c = openai.AsyncOpenAI(base_url=URL + "/v1", api_key=KEY, max_retries=0, timeout=TIMEOUT)
        stream = await c.chat.completions.create(model="mistral", messages=MESSAGES, stream=True)
        return [c.choices[0].delta.content or "" async for c in stream]

    assert "".join(asyncio.run(run())) == REPLY


# --- errors ---------------------------------------------------------------


def test_bad_key_is_an_authentication_error():
    with pytest.raises(openai.AuthenticationError) as e:
        client(key="not-a-key").chat.completions.create(model="mistral", messages=MESSAGES)
    assert e.value.status_code == 401
    assert_openai_shape(e.value)
    assert e.value.code == "invalid_api_key"


def test_model_not_allowed_is_a_permission_denied_error(control):
    seen = control.count()
    with pytest.raises(openai.PermissionDeniedError) as e:
        client(key=LIMITED_KEY).chat.completions.create(model="llama3.2", messages=MESSAGES)
    assert e.value.status_code == 403
    assert_openai_shape(e.value)
    assert e.value.type == "permission_error"
    with pytest.raises(openai.PermissionDeniedError):
        client(key=LIMITED_KEY).models.retrieve("llama3.2:latest")
    assert control.count() == seen


def test_admin_only_path_is_a_permission_denied_error():
    # Any /v1 path tollgate does not know is for the admin key only.
    with pytest.raises(openai.PermissionDeniedError) as e:
        client().responses.create(model="mistral", input="hi")
    assert_openai_shape(e.value)


def test_empty_balance_is_a_402_api_status_error(control):
    seen = control.count()
    for stream in (False, True):
        with pytest.raises(openai.APIStatusError) as e:
            client(key=EMPTY_KEY).chat.completions.create(
                model="mistral", messages=MESSAGES, stream=stream
            )
        assert e.value.status_code == 402
        assert_openai_shape(e.value)
        assert e.value.code == "insufficient_quota"
    assert control.count() == seen


def test_unknown_model_is_a_not_found_error():
    # Ollama's own error, passed through unchanged.
    with pytest.raises(openai.NotFoundError) as e:
        client().chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert e.value.body["message"] == "model 'no-such-model' not found"


def test_in_stream_error_is_raised(control):
    # Ollama's OpenAI writer turns the error into an empty chunk and stops
    # without [DONE]; tollgate's error event makes the SDK raise.
    control.behavior(chunks=5, stream_error_after=2)
    got = []
    with pytest.raises(openai.APIError) as e:
        for chunk in client().chat.completions.create(model="mistral", messages=MESSAGES, stream=True):
            got.append(chunk.choices[0].delta.content)
    assert got == ["w0 ", "w1 ", ""]
    assert "without finishing it" in e.value.message


def test_repeated_wrong_keys_are_a_rate_limit_error():
    # The throttled tollgate allows 2 wrong keys per address per minute.
    bad = client(key="guess", base=THROTTLED_URL)
    good = client(base=THROTTLED_URL)
    statuses = []
    error = None
    for _ in range(5):
        try:
            bad.models.list()
        except openai.AuthenticationError:
            statuses.append(401)
        except openai.RateLimitError as e:
            statuses.append(429)
            error = e
            break
        if len(statuses) == 1:
            # A key at work from the same address since the first wrong one.
            good.models.list()
    assert statuses == [401, 401, 429]
    assert_openai_shape(error)
    assert error.code == "rate_limit_exceeded"
    assert int(error.response.headers["retry-after"]) > 0
    # It keeps working.
    answer = good.chat.completions.create(model="mistral", messages=MESSAGES)
    assert answer.choices[0].message.content == REPLY
