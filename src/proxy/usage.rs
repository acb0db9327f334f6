//! Reading token counts out of Ollama's replies without slowing them down.
//!
//! Native replies carry `prompt_eval_count` / `eval_count` in their final
//! (`"done": true`) object; OpenAI-style replies carry a `usage` object. A
//! stream is scanned line by line with cheap byte searches; only a line that
//! may be the final one is parsed as JSON.

use memchr::memmem::Finder;
use serde::Deserialize;
use serde_json::Value;
use std::sync::OnceLock;

/// The fields tollgate reads from a reply object. Deserialising into it
/// skips every other field (a long `response` or `message`) without
/// building it.
#[derive(Deserialize, Default)]
#[serde(default)]
struct Reported {
    done: Value,
    done_reason: Value,
    prompt_eval_count: Value,
    eval_count: Value,
    usage: Value,
}

impl Reported {
    fn parse(json: &[u8]) -> Option<Reported> {
        // Only an object: serde would also fill the struct from an array.
        if json.trim_ascii_start().first() != Some(&b'{') {
            return None;
        }
        serde_json::from_slice(json).ok()
    }

    /// (prompt tokens, completion tokens) from a native final object or an
    /// OpenAI reply, if it reports any.
    fn tokens(&self) -> Option<(u64, u64)> {
        let count = |v: &Value, field: &str| v.get(field).and_then(Value::as_u64);
        if self.usage.is_object() {
            let prompt = count(&self.usage, "prompt_tokens");
            let completion = count(&self.usage, "completion_tokens");
            if prompt.is_some() || completion.is_some() {
                return Some((prompt.unwrap_or(0), completion.unwrap_or(0)));
            }
        }
        let prompt = self.prompt_eval_count.as_u64();
        let completion = self.eval_count.as_u64();
        (prompt.is_some() || completion.is_some())
            .then(|| (prompt.unwrap_or(0), completion.unwrap_or(0)))
    }
}

/// The token counts a whole JSON reply (or one final chunk) reports.
pub fn tokens_in(json: &[u8]) -> Option<(u64, u64)> {
    Reported::parse(json)?.tokens()
}

/// What a whole (non-streamed) reply says.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct WholeReply {
    pub tokens: Option<(u64, u64)>,
    /// Ollama only loaded or unloaded the model (its answer to an empty
    /// prompt or message list, `done_reason` `load` or `unload`): nothing
    /// was generated.
    pub model_only: bool,
}

pub fn read_whole_reply(json: &[u8]) -> WholeReply {
    let Some(reported) = Reported::parse(json) else {
        return WholeReply::default();
    };
    let model_only = reported.done == Value::Bool(true)
        && matches!(reported.done_reason.as_str(), Some("load" | "unload"));
    WholeReply {
        tokens: reported.tokens(),
        model_only,
    }
}

/// A byte string searched for in every line or event of a stream. Its
/// searcher is built once: building one costs more than searching a short
/// line (~600 instructions against ~150).
struct Needle {
    bytes: &'static [u8],
    finder: OnceLock<Finder<'static>>,
}

impl Needle {
    const fn new(bytes: &'static [u8]) -> Needle {
        Needle {
            bytes,
            finder: OnceLock::new(),
        }
    }

    fn finder(&self) -> &Finder<'static> {
        self.finder.get_or_init(|| Finder::new(self.bytes))
    }

    fn is_in(&self, haystack: &[u8]) -> bool {
        self.finder().find(haystack).is_some()
    }

    /// Whether the needle is somewhere followed by a byte that `next` likes.
    fn is_in_followed_by(&self, haystack: &[u8], next: impl Fn(u8) -> bool) -> bool {
        self.finder().find_iter(haystack).any(|at| {
            haystack
                .get(at + self.bytes.len())
                .is_some_and(|b| next(*b))
        })
    }
}

/// The final chunk's marker: `"done"` followed by `true` (Go writes it
/// compact, `"done":true`; whitespace around the colon is allowed too).
static DONE_KEY: Needle = Needle::new(b"\"done\"");

/// Whether `"done"` is somewhere followed by `: true`, spaces allowed.
fn says_done_true(line: &[u8]) -> bool {
    DONE_KEY.finder().find_iter(line).any(|at| {
        let rest = line[at + DONE_KEY.bytes.len()..].trim_ascii_start();
        rest.strip_prefix(b":")
            .is_some_and(|value| value.trim_ascii_start().starts_with(b"true"))
    })
}
static NO_CHOICES: Needle = Needle::new(b"\"choices\":[]");
/// Where a chunk's output starts in an OpenAI stream: its text (chat's
/// `content`, completions' `text`) or a thinking model's `reasoning`.
static TEXT_FIELDS: [Needle; 3] = [
    Needle::new(b"\"content\":\""),
    Needle::new(b"\"text\":\""),
    Needle::new(b"\"reasoning\":\""),
];
/// A chunk's tool calls (Go omits the member when there are none).
static TOOL_CALLS: Needle = Needle::new(b"\"tool_calls\":[");
/// The member Ollama's completions writer ends every chunk with when the
/// request asked for usage (an empty `Usage`, before the real one comes in
/// its own `"choices": []` chunk). The chat writer adds none.
static ZERO_USAGE: Needle =
    Needle::new(b",\"usage\":{\"prompt_tokens\":0,\"completion_tokens\":0,\"total_tokens\":0}");

/// What one complete NDJSON line of a native stream is.
#[derive(Debug, PartialEq, Eq)]
pub enum NdjsonLine {
    /// A content chunk.
    Chunk,
    /// The final `"done": true` object, with its token counts if any.
    Final(Option<(u64, u64)>),
    /// An `{"error": ...}` line.
    Error,
    /// Anything else (blank, progress without content, unparseable).
    Other,
}

pub fn classify_ndjson(line: &[u8]) -> NdjsonLine {
    let trimmed = line.trim_ascii();
    if trimmed.is_empty() {
        return NdjsonLine::Other;
    }
    if trimmed.starts_with(b"{\"error\"") {
        return NdjsonLine::Error;
    }
    // Go's encoder writes compact JSON; `"done":true` inside a string would
    // be escaped, but a nested object (tool arguments) could hold one, so a
    // candidate line is confirmed by parsing it.
    if says_done_true(trimmed) {
        if let Some(reported) = Reported::parse(trimmed) {
            if reported.done == Value::Bool(true) {
                return NdjsonLine::Final(reported.tokens());
            }
        }
    }
    NdjsonLine::Chunk
}

/// What one complete server-sent event of an OpenAI-style stream is.
#[derive(Debug, PartialEq, Eq)]
pub enum SseEvent {
    /// A chunk with choices (role, content or finish).
    Chunk {
        has_content: bool,
    },
    /// The usage chunk (`"choices": []` with `usage`).
    Usage(Option<(u64, u64)>),
    /// `data: [DONE]`.
    Done,
    /// `data: {"error": ...}`.
    Error,
    Other,
}

pub fn classify_sse(event: &[u8]) -> SseEvent {
    let Some(data) = event
        .split(|b| *b == b'\n')
        .find_map(|l| l.strip_prefix(b"data:"))
        .map(<[u8]>::trim_ascii)
    else {
        return SseEvent::Other;
    };
    if data == b"[DONE]" {
        return SseEvent::Done;
    }
    if data.starts_with(b"{\"error\"") {
        return SseEvent::Error;
    }
    if NO_CHOICES.is_in(data) {
        return SseEvent::Usage(tokens_in(data));
    }
    // Text that is not empty (the opening quote is not followed by the
    // closing one), or tool calls.
    let has_content = TEXT_FIELDS
        .iter()
        .any(|field| field.is_in_followed_by(data, |b| b != b'"'))
        || TOOL_CALLS.is_in_followed_by(data, |b| b != b']');
    SseEvent::Chunk { has_content }
}

/// Where the zero usage member ([`ZERO_USAGE`]) is in one SSE event, if
/// it is the last member of the event's object: Go's encoder writes the
/// object compact and `usage` last, and a quote inside a string would be
/// escaped, so these bytes followed by the closing brace are that member.
pub fn zero_usage_member(event: &[u8]) -> Option<std::ops::Range<usize>> {
    let needle = &ZERO_USAGE;
    needle.finder().find_iter(event).find_map(|at| {
        let end = at + needle.bytes.len();
        (event.get(end..)?.trim_ascii() == b"}").then_some(at..end)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_native_and_openai_counts() {
        assert_eq!(
            tokens_in(br#"{"response":"a \"long\" reply","prompt_eval_count":7,"eval_count":3}"#),
            Some((7, 3))
        );
        assert_eq!(tokens_in(br#"{"eval_count":3}"#), Some((0, 3)));
        assert_eq!(
            tokens_in(br#"{"usage":{"prompt_tokens":5,"completion_tokens":2},"choices":[]}"#),
            Some((5, 2))
        );
        assert_eq!(tokens_in(br#"{"response":"hi"}"#), None);
        // A count that is not a whole number is not a count; the other one
        // still is.
        assert_eq!(
            tokens_in(br#"{"prompt_eval_count":-1,"eval_count":4}"#),
            Some((0, 4))
        );
        assert_eq!(tokens_in(b"[1,2]"), None);
        assert_eq!(tokens_in(b"not json"), None);
    }

    #[test]
    fn classifies_ndjson_lines() {
        assert_eq!(
            classify_ndjson(br#"{"model":"m","response":"hi","done":false}"#),
            NdjsonLine::Chunk
        );
        assert_eq!(
            classify_ndjson(
                br#"{"model":"m","response":"","done":true,"prompt_eval_count":4,"eval_count":9}"#
            ),
            NdjsonLine::Final(Some((4, 9)))
        );
        assert_eq!(classify_ndjson(br#"{"error":"boom"}"#), NdjsonLine::Error);
        // A nested "done":true is not the final chunk.
        assert_eq!(
            classify_ndjson(
                br#"{"message":{"tool_calls":[{"arguments":{"done":true}}]},"done":false}"#
            ),
            NdjsonLine::Chunk
        );
    }

    #[test]
    fn finds_the_final_chunk_with_or_without_spaces() {
        for line in [
            &br#"{"response":"","done":true,"eval_count":3}"#[..],
            br#"{"response": "", "done": true, "eval_count": 3}"#,
            br#"{"response":"","done" :  true,"eval_count":3}"#,
        ] {
            assert_eq!(classify_ndjson(line), NdjsonLine::Final(Some((0, 3))));
        }
        for line in [
            &br#"{"response":"a","done":false}"#[..],
            br#"{"response": "a", "done": false}"#,
            br#"{"response":""done": true","done":false}"#,
        ] {
            assert_eq!(classify_ndjson(line), NdjsonLine::Chunk);
        }
    }

    #[test]
    fn tells_a_load_or_unload_from_a_reply() {
        let load = br#"{"model":"m","created_at":"2026-12-04T23:00:00Z","response":"","done":true,"done_reason":"load"}"#;
        assert!(read_whole_reply(load).model_only);
        let unload = br#"{"model":"m","created_at":"2026-12-04T23:00:00Z","message":{"role":"assistant","content":""},"done":true,"done_reason":"unload"}"#;
        assert!(read_whole_reply(unload).model_only);
        let reply = br#"{"response":"load","done":true,"done_reason":"stop","eval_count":1}"#;
        assert_eq!(
            read_whole_reply(reply),
            WholeReply {
                tokens: Some((0, 1)),
                model_only: false
            }
        );
    }

    #[test]
    fn classifies_sse_events() {
        assert_eq!(
            classify_sse(b"data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n"),
            SseEvent::Chunk { has_content: true }
        );
        assert_eq!(
            classify_sse(
                b"data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n"
            ),
            SseEvent::Chunk { has_content: false }
        );
        assert_eq!(
            classify_sse(b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4,\"total_tokens\":7}}\n\n"),
            SseEvent::Usage(Some((3, 4)))
        );
        assert_eq!(classify_sse(b"data: [DONE]\n\n"), SseEvent::Done);
        // A thinking model's reasoning and a tool call are output too
        // (Ollama's ToChunk: `reasoning` and `tool_calls` beside an empty
        // `content`).
        assert_eq!(
            classify_sse(
                b"data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\",\"reasoning\":\"Hmm\"}}]}\n\n"
            ),
            SseEvent::Chunk { has_content: true }
        );
        assert_eq!(
            classify_sse(
                b"data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\",\"tool_calls\":[{\"id\":\"call_1\",\"index\":0,\"type\":\"function\",\"function\":{\"name\":\"f\",\"arguments\":\"{}\"}}]}}]}\n\n"
            ),
            SseEvent::Chunk { has_content: true }
        );
        // A completions chunk with the zero usage is a chunk.
        assert_eq!(
            classify_sse(
                b"data: {\"choices\":[{\"text\":\"a\"}],\"usage\":{\"prompt_tokens\":0,\"completion_tokens\":0,\"total_tokens\":0}}\n\n"
            ),
            SseEvent::Chunk { has_content: true }
        );
        assert_eq!(
            classify_sse(b"data: {\"error\":{\"message\":\"x\"}}\n\n"),
            SseEvent::Error
        );
    }

    #[test]
    fn finds_the_zero_usage_member_only_at_the_end_of_the_object() {
        let zero = r#","usage":{"prompt_tokens":0,"completion_tokens":0,"total_tokens":0}"#;
        let event = format!("data: {{\"choices\":[{{\"text\":\"a\"}}]{zero}}}\n\n");
        let at = zero_usage_member(event.as_bytes()).expect("found");
        assert_eq!(&event[at.clone()], zero);
        let mut without = event.clone();
        without.replace_range(at, "");
        assert_eq!(without, "data: {\"choices\":[{\"text\":\"a\"}]}\n\n");
        // Anywhere else it is not that member: in a nested object, with a
        // real count, or in text (where Go escapes the quotes anyway).
        for other in [
            format!("data: {{\"x\":{{\"a\":1{zero}}},\"b\":2}}\n\n"),
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":0,\"total_tokens\":5}}\n\n".to_string(),
            format!("data: {{\"text\":{}}}\n\n", serde_json::to_string(&format!("{zero}}}")).unwrap()),
        ] {
            assert_eq!(zero_usage_member(other.as_bytes()), None, "{other}");
        }
    }
}
