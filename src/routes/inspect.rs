//! What tollgate reads of a JSON request body before it forwards it
//! (SPEC §4a, §7): the model, the fields whose types it checks, and the
//! completion-token limit that the estimate uses.
//!
//! Two ways to read a body, with one outcome. [`glance`] deserialises only
//! the fields tollgate reads, into plain values, skipping the rest
//! (messages, prompts, images) without building it; it serves a body that
//! will be forwarded byte for byte. [`parse_body`] builds the whole object,
//! which a rewrite (policy caps, `keep_alive`, `stream_options`) needs. A
//! glance is strict: whatever it cannot read in its own terms (a wrong
//! type, a duplicate field, invalid JSON) makes it give up, and the whole
//! parse then decides, with its error messages.

use super::catalog::{Access, Endpoint};
use crate::error::ApiError;
use crate::policy::Dialect;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::fmt;
use std::marker::PhantomData;

/// What a glance at a body found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Glance {
    pub model: Option<String>,
    /// `stream`, when the body sets it.
    pub stream: Option<bool>,
    /// The body has a `keep_alive` field (any value, `null` included).
    pub keep_alive: bool,
    /// The completion-token limit the body asks for, in its dialect.
    pub completion_tokens: Option<u64>,
}

/// Reads the fields tollgate needs from a JSON object body, or `None` when
/// the body is anything a glance does not read (see the module doc).
pub fn glance(body: &[u8], dialect: Dialect) -> Option<Glance> {
    // The whole parse rejects a body that is not UTF-8, even inside a string
    // it would skip; so does a glance.
    let text = std::str::from_utf8(body).ok()?;
    let Object(fields) = serde_json::from_str::<Object<Fields>>(text).ok()?;
    let whole = |n: Option<i64>| n.and_then(|n| u64::try_from(n).ok());
    let completion_tokens = match dialect {
        Dialect::Native => whole(fields.options.and_then(|Object(o)| o.num_predict)),
        Dialect::OpenAi => [fields.max_completion_tokens, fields.max_tokens]
            .into_iter()
            .filter_map(whole)
            .min(),
    };
    Some(Glance {
        model: fields.model,
        stream: fields.stream,
        keep_alive: fields.keep_alive.is_some(),
        completion_tokens,
    })
}

/// The fields read, with the types [`check_types`] requires. A field the
/// check allows to be `null` is an `Option`; one it does not is read with
/// [`present`], so that a `null` makes the glance give up.
#[derive(Deserialize)]
struct Fields {
    #[serde(default, deserialize_with = "present")]
    model: Option<String>,
    #[serde(default, deserialize_with = "present")]
    stream: Option<bool>,
    #[serde(default, deserialize_with = "present")]
    keep_alive: Option<IgnoredAny>,
    #[serde(default)]
    options: Option<Object<Options>>,
    /// Read for its type only.
    #[serde(default, rename = "prompt")]
    _prompt: Option<Text>,
    /// Read for its type only.
    #[serde(default, rename = "messages")]
    _messages: Option<List>,
    #[serde(default)]
    max_tokens: Option<i64>,
    #[serde(default)]
    max_completion_tokens: Option<i64>,
}

#[derive(Deserialize)]
struct Options {
    #[serde(default)]
    num_predict: Option<i64>,
}

/// A field that is there: any value of `T`, `null` only if `T` takes it.
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// A JSON object read into `T` (a derived struct alone would also take an
/// array, filling its fields in order).
struct Object<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ObjectVisitor<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for ObjectVisitor<T> {
            type Value = Object<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                T::deserialize(de::value::MapAccessDeserializer::new(map)).map(Object)
            }
        }
        d.deserialize_map(ObjectVisitor(PhantomData))
    }
}

/// A string, skipped.
struct Text;

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct TextVisitor;
        impl Visitor<'_> for TextVisitor {
            type Value = Text;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Text, E> {
                Ok(Text)
            }
        }
        d.deserialize_str(TextVisitor)
    }
}

/// An array, its elements skipped.
struct List;

impl<'de> Deserialize<'de> for List {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ListVisitor;
        impl<'de> Visitor<'de> for ListVisitor {
            type Value = List;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an array")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<List, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(List)
            }
        }
        d.deserialize_seq(ListVisitor)
    }
}

/// Parses a JSON request body for inspection (SPEC §7: malformed JSON and
/// wrong field types are 400, never forwarded, never charged).
pub fn parse_body(body: &[u8], endpoint: Endpoint) -> Result<Option<Map<String, Value>>, ApiError> {
    if is_blank(body) {
        return if endpoint.access == Access::Metered {
            Err(ApiError::BadRequest("missing request body".into()))
        } else {
            Ok(None)
        };
    }
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON in request body: {e}")))?;
    let Value::Object(map) = value else {
        return Err(ApiError::BadRequest(
            "the request body must be a JSON object".into(),
        ));
    };
    check_types(&map)?;
    Ok(Some(map))
}

/// An empty body, or only whitespace.
pub fn is_blank(body: &[u8]) -> bool {
    body.iter().all(u8::is_ascii_whitespace)
}

/// The fields tollgate reads must have the types Ollama expects.
pub fn check_types(map: &Map<String, Value>) -> Result<(), ApiError> {
    let wrong = |field: &str, expected: &str| {
        Err(ApiError::BadRequest(format!(
            "field '{field}' must be {expected}"
        )))
    };
    let is = |field: &str, check: fn(&Value) -> bool| map.get(field).is_none_or(check);
    if !is("model", Value::is_string) {
        return wrong("model", "a string");
    }
    if !is("stream", Value::is_boolean) {
        return wrong("stream", "true or false");
    }
    if !is("options", |v| v.is_object() || v.is_null()) {
        return wrong("options", "an object");
    }
    if !is("prompt", |v| v.is_string() || v.is_null()) {
        return wrong("prompt", "a string");
    }
    if !is("messages", |v| v.is_array() || v.is_null()) {
        return wrong("messages", "an array");
    }
    for field in ["max_tokens", "max_completion_tokens"] {
        if !is(field, |v| v.is_i64() || v.is_u64() || v.is_null()) {
            return wrong(field, "an integer");
        }
    }
    let num_predict = map.get("options").and_then(|o| o.get("num_predict"));
    if num_predict.is_some_and(|v| !(v.is_i64() || v.is_u64() || v.is_null())) {
        return wrong("options.num_predict", "an integer");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy;

    /// What the whole parse makes of a body, in a glance's terms: `None`
    /// when it refuses the body.
    fn by_whole_parse(body: &str, dialect: Dialect) -> Option<Glance> {
        let endpoint = Endpoint {
            access: Access::Metered,
            dialect,
            lists_models: false,
            streams_by_default: true,
        };
        let map = parse_body(body.as_bytes(), endpoint).ok()??;
        Some(Glance {
            model: map.get("model").and_then(Value::as_str).map(str::to_string),
            stream: map.get("stream").and_then(Value::as_bool),
            keep_alive: map.contains_key("keep_alive"),
            completion_tokens: policy::requested_completion_tokens(&map, dialect),
        })
    }

    #[test]
    fn reads_what_the_whole_parse_reads() {
        let bodies = [
            r#"{"model":"mistral","messages":[{"role":"user","content":"Say hello."}],"stream":false}"#,
            r#"{"model":"m","prompt":"hi","options":{"num_predict":12,"temperature":0.5}}"#,
            r#"{"model":"m","prompt":null,"options":null,"messages":null}"#,
            r#"{"model":"m","options":{"num_predict":-1}}"#,
            r#"{"model":"m","keep_alive":"5m"}"#,
            r#"{"model":"m","keep_alive":null}"#,
            r#"{"model":"m","max_tokens":50,"max_completion_tokens":20}"#,
            r#"{"model":"m","max_tokens":-3,"max_completion_tokens":null}"#,
            r#"{"model":"caf\u00e9 \"x\"","images":["aGk="],"format":{"type":"object"}}"#,
            r#"  {"stream":true}  "#,
            "{}",
        ];
        for body in bodies {
            for dialect in [Dialect::Native, Dialect::OpenAi] {
                let glanced = glance(body.as_bytes(), dialect);
                assert!(glanced.is_some(), "a glance gave up on {body}");
                assert_eq!(glanced, by_whole_parse(body, dialect), "{body}");
            }
        }
    }

    #[test]
    fn gives_up_on_every_body_the_whole_parse_refuses() {
        let refused = [
            "",
            "   ",
            "not json",
            "[1, 2]",
            r#""a string""#,
            r#"{"model":"m""#,
            r#"{"model":"m"} trailing"#,
            r#"{"model":5}"#,
            r#"{"model":null}"#,
            r#"{"stream":"yes"}"#,
            r#"{"stream":null}"#,
            r#"{"options":[5]}"#,
            r#"{"options":"fast"}"#,
            r#"{"options":{"num_predict":1.5}}"#,
            r#"{"options":{"num_predict":"10"}}"#,
            r#"{"prompt":7}"#,
            r#"{"messages":{"role":"user"}}"#,
            r#"{"max_tokens":2.0}"#,
            r#"{"max_completion_tokens":"9"}"#,
            r#"{"messages":[{"content":"unclosed}]}"#,
        ];
        for body in refused {
            assert_eq!(by_whole_parse(body, Dialect::Native), None, "{body}");
            assert_eq!(glance(body.as_bytes(), Dialect::Native), None, "{body}");
        }
        // Not UTF-8 inside a string that a glance would skip.
        let mut body = br#"{"model":"m","prompt":""#.to_vec();
        body.extend_from_slice(&[0xff, 0xfe]);
        body.extend_from_slice(br#""}"#);
        assert!(serde_json::from_slice::<Value>(&body).is_err());
        assert_eq!(glance(&body, Dialect::Native), None);
    }

    #[test]
    fn leaves_to_the_whole_parse_what_it_reads_differently() {
        // A duplicate field: Ollama, like serde_json's map, takes the last.
        let body = r#"{"model":"a","model":"b"}"#;
        assert_eq!(glance(body.as_bytes(), Dialect::Native), None);
        assert_eq!(
            by_whole_parse(body, Dialect::Native).and_then(|g| g.model),
            Some("b".to_string())
        );
        // A limit beyond i64: the whole parse still reads it.
        let body = r#"{"options":{"num_predict":18446744073709551615}}"#;
        assert_eq!(glance(body.as_bytes(), Dialect::Native), None);
        assert_eq!(
            by_whole_parse(body, Dialect::Native).and_then(|g| g.completion_tokens),
            Some(u64::MAX)
        );
    }
}
