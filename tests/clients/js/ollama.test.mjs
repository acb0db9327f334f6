// The official `ollama` JavaScript package, pointed at tollgate (SPEC §3, §5,
// §6). Run by tests/it/clients.rs with `node --test`; the environment
// variables are those described in tests/clients/python/tollgate_env.py.

import assert from 'node:assert/strict';
import { beforeEach, test } from 'node:test';
import { Ollama } from 'ollama';

const env = (name) => {
  const value = process.env[name];
  assert.ok(value, `${name} is not set (run this through cargo test)`);
  return value;
};

const URL = env('TOLLGATE_URL');
const KEY = env('TOLLGATE_KEY');
const EMPTY_KEY = env('TOLLGATE_EMPTY_KEY');
const CONTROL_URL = env('TOLLGATE_CONTROL_URL');

const MESSAGES = [{ role: 'user', content: 'hello' }];
const REPLY = 'w0 w1 w2 ';

const client = (key = KEY) => new Ollama({ host: URL, headers: { 'x-api-key': key } });

async function control(path, body = {}) {
  const response = await fetch(CONTROL_URL + path, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify(body),
  });
  assert.equal(response.status, 200, `control ${path}: ${await response.text()}`);
}

async function requestCount() {
  const response = await fetch(CONTROL_URL + '/requests');
  return (await response.json()).length;
}

beforeEach(() => control('/reset'));

test('chat with the x-api-key header', async () => {
  const r = await client().chat({ model: 'mistral', messages: MESSAGES });
  assert.equal(r.message.role, 'assistant');
  assert.equal(r.message.content, REPLY);
  assert.equal(r.done, true);
  assert.equal(r.eval_count, 3);
});

test('generate', async () => {
  const r = await client().generate({ model: 'mistral', prompt: 'hi' });
  assert.equal(r.response, REPLY);
});

test('streaming chat arrives chunk by chunk', async () => {
  // The fake sends each chunk after the first only when told to, and it is
  // told only once the previous chunk has arrived here: a gateway that held
  // anything back would make this test time out.
  await control('/behavior', { lockstep: true, chunks: 5 });
  const stream = await client().chat({ model: 'mistral', messages: MESSAGES, stream: true });
  const it = stream[Symbol.asyncIterator]();
  for (let k = 0; k < 5; k++) {
    const { value, done } = await it.next();
    assert.equal(done, false);
    assert.equal(value.message.content, `w${k} `);
    assert.equal(value.done, false);
    await control('/step');
  }
  const last = await it.next();
  assert.equal(last.value.done, true);
  assert.equal(last.value.eval_count, 5);
  assert.equal((await it.next()).done, true);
});

test('list and embed', async () => {
  const names = (await client().list()).models.map((m) => m.model);
  assert.ok(names.includes('mistral:latest'), names.join(', '));
  const e = await client().embed({ model: 'nomic-embed-text', input: 'hello' });
  assert.equal(e.embeddings.length, 1);
  assert.equal(e.embeddings[0].length, 8);
});

test('a bad key is a 401 ResponseError', async () => {
  const seen = await requestCount();
  await assert.rejects(client('not-a-key').chat({ model: 'mistral', messages: MESSAGES }), (err) => {
    assert.equal(err.name, 'ResponseError');
    assert.equal(err.status_code, 401);
    assert.match(err.error, /key/i);
    return true;
  });
  assert.equal(await requestCount(), seen);
});

test('an empty balance is a 402 ResponseError', async () => {
  for (const stream of [false, true]) {
    await assert.rejects(client(EMPTY_KEY).chat({ model: 'mistral', messages: MESSAGES, stream }), (err) => {
      assert.equal(err.name, 'ResponseError');
      assert.equal(err.status_code, 402);
      assert.match(err.error, /credit/i);
      return true;
    });
  }
});

test('an in-stream error is thrown', async () => {
  await control('/behavior', { chunks: 5, stream_error_after: 2 });
  const got = [];
  await assert.rejects(
    (async () => {
      const stream = await client().chat({ model: 'mistral', messages: MESSAGES, stream: true });
      for await (const part of stream) got.push(part.message.content);
    })(),
    /unexpected EOF/,
  );
  assert.deepEqual(got, ['w0 ', 'w1 ']);
});
