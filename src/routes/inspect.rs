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
//! parse then decides, with its error messages. What a glance skips it
//! still checks as the whole parse does (escapes, number range, depth).

use super::catalog::{Access, Endpoint};
use crate::error::ApiError;
use crate::policy::Dialect;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::fmt;

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
    /// `"_debug_render_only": true`: Ollama renders the prompt and answers
    /// it without generating (one chunk, no `[DONE]`, on an OpenAI stream).
    pub debug_render: bool,
}

/// Reads the fields tollgate needs from a JSON object body, or `None` when
/// the body is anything a glance does not read (see the module doc).
pub fn glance(body: &[u8], dialect: Dialect) -> Option<Glance> {
    // The whole parse rejects a body that is not UTF-8, even inside a string
    // it would skip; so does a glance.
    let text = std::str::from_utf8(body).ok()?;
    let fields: Fields = serde_json::from_str(text).ok()?;
    // Ollama reads 0 and negative limits as "no limit".
    let limit = |n: Option<i64>| n.and_then(|n| u64::try_from(n).ok()).filter(|n| *n > 0);
    let completion_tokens = match dialect {
        Dialect::Native => limit(fields.num_predict),
        // Ollama has no `max_completion_tokens`: `max_tokens` is the limit.
        Dialect::OpenAi => limit(fields.max_tokens),
    };
    Some(Glance {
        model: fields.model,
        stream: fields.stream,
        keep_alive: fields.keep_alive,
        completion_tokens,
        debug_render: fields.debug_render == Some(true),
    })
}

/// Whether a whole-parsed body asks for a debug render only (see
/// [`Glance::debug_render`]).
pub fn debug_render(map: &Map<String, Value>) -> bool {
    map.get("_debug_render_only") == Some(&Value::Bool(true))
}

/// With serde_json's `raw_value` feature (which axum and sqlx turn on), a
/// `serde_json::Value` parse reads an object whose first field has this
/// name as the JSON text in that field's string. A body that names it
/// anywhere is refused: tollgate would check one JSON and forward another.
const RAW_VALUE_KEY: &str = "$serde_json::private::RawValue";

fn refuse_raw_value<E: de::Error>() -> E {
    E::custom(format!("the field name '{RAW_VALUE_KEY}' is reserved"))
}

/// The fields read, with the types [`check_types`] requires: `model` and
/// `stream` must not be `null`; `options`, `prompt`, `messages` and the
/// token limits may be; `_debug_render_only` is a boolean or `null`, as
/// Ollama reads it (anything else is left to the whole parse). Every other
/// value is skipped as [`Checked`].
#[derive(Default)]
struct Fields {
    model: Option<String>,
    stream: Option<bool>,
    keep_alive: bool,
    num_predict: Option<i64>,
    max_tokens: Option<i64>,
    debug_render: Option<bool>,
}

/// The names a glance reads, at the top and in `options`.
#[derive(Clone, Copy)]
enum Name {
    Model,
    Stream,
    KeepAlive,
    Options,
    Prompt,
    Messages,
    MaxTokens,
    MaxCompletionTokens,
    NumPredict,
    DebugRenderOnly,
    StreamOptions,
    RawValue,
    /// A name that Ollama's decoder takes for one that tollgate reads (see
    /// [`go_alias_of`]) without being it: left to the whole parse, which
    /// refuses it.
    Alias,
    Other,
}

impl Name {
    fn of(name: &str) -> Name {
        match name {
            "model" => Name::Model,
            "stream" => Name::Stream,
            "keep_alive" => Name::KeepAlive,
            "options" => Name::Options,
            "prompt" => Name::Prompt,
            "messages" => Name::Messages,
            "max_tokens" => Name::MaxTokens,
            "max_completion_tokens" => Name::MaxCompletionTokens,
            "num_predict" => Name::NumPredict,
            "_debug_render_only" => Name::DebugRenderOnly,
            "stream_options" => Name::StreamOptions,
            RAW_VALUE_KEY => Name::RawValue,
            _ => Name::Other,
        }
    }

    /// A top-level field's name: as [`Name::of`], and [`Name::Alias`] for
    /// one that Ollama reads as a field tollgate reads. (Nested names are
    /// not looked at so: Ollama matches them exactly, or tollgate reads
    /// none of them.)
    fn at_top(name: &str) -> Name {
        match Name::of(name) {
            Name::Other if go_alias_of(name, READ_AT_TOP).is_some() => Name::Alias,
            known => known,
        }
    }
}

/// A top-level field's name ([`Name::at_top`]).
struct Top(Name);

impl<'de> Deserialize<'de> for Top {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct TopVisitor;
        impl Visitor<'_> for TopVisitor {
            type Value = Top;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E: de::Error>(self, name: &str) -> Result<Top, E> {
                Ok(Top(Name::at_top(name)))
            }
        }
        d.deserialize_identifier(TopVisitor)
    }
}

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct NameVisitor;
        impl Visitor<'_> for NameVisitor {
            type Value = Name;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E: de::Error>(self, name: &str) -> Result<Name, E> {
                Ok(Name::of(name))
            }
        }
        d.deserialize_identifier(NameVisitor)
    }
}

/// The top-level fields that tollgate reads or rewrites in a request body,
/// in any endpoint's dialect (`name` is `/api/show`'s older spelling of
/// `model`).
pub const READ_AT_TOP: &[&str] = &[
    "model",
    "name",
    "stream",
    "stream_options",
    "keep_alive",
    "options",
    "prompt",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "_debug_render_only",
];

/// The fields tollgate reads in `stream_options`.
const READ_IN_STREAM_OPTIONS: &[&str] = &["include_usage"];

/// The name in `names` that Ollama's decoder (Go's `encoding/json`) would
/// fill from a field called `field`, when that is not `field` itself. Go
/// matches a struct's field names without regard to case, by Unicode's
/// simple folding, and the last field of a body that matches wins: so
/// `{"model": "a", "MODEL": "b"}` runs model `b`. The names are ASCII; of
/// the other characters only the Kelvin sign (`K`) folds to an ASCII
/// letter, `k`, and the long s (`ſ`) to `s`.
pub fn go_alias_of(field: &str, names: &[&'static str]) -> Option<&'static str> {
    let folded = |c: char| match c {
        '\u{212A}' => Some(b'K'),
        '\u{17F}' => Some(b'S'),
        c if c.is_ascii() => Some((c as u8).to_ascii_uppercase()),
        _ => None,
    };
    let length = field.chars().count();
    names.iter().copied().find(|name| {
        *name != field
            && length == name.len()
            && field
                .chars()
                .zip(name.bytes())
                .all(|(c, n)| folded(c) == Some(n.to_ascii_uppercase()))
    })
}

/// Fails on the second field of a name: serde_json's map, as Ollama,
/// takes the last, and that is the whole parse's to read. Fails on
/// [`RAW_VALUE_KEY`].
fn first<E: de::Error>(seen: &mut u16, name: Name) -> Result<(), E> {
    if let Name::RawValue = name {
        return Err(refuse_raw_value());
    }
    let bit = 1 << name as u16;
    if *seen & bit != 0 {
        return Err(E::custom("a field named twice"));
    }
    *seen |= bit;
    Ok(())
}

impl<'de> Deserialize<'de> for Fields {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct FieldsVisitor;
        impl<'de> Visitor<'de> for FieldsVisitor {
            type Value = Fields;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields, A::Error> {
                let mut fields = Fields::default();
                let mut seen = 0;
                while let Some(Top(name)) = map.next_key::<Top>()? {
                    // `num_predict` is read in `options` only.
                    if !matches!(name, Name::NumPredict | Name::Other) {
                        first(&mut seen, name)?;
                    }
                    if let Name::Alias = name {
                        return Err(de::Error::custom("a field Ollama reads as another"));
                    }
                    match name {
                        Name::Model => fields.model = Some(map.next_value()?),
                        Name::Stream => fields.stream = Some(map.next_value()?),
                        Name::KeepAlive => {
                            map.next_value::<Checked>()?;
                            fields.keep_alive = true;
                        }
                        Name::Options => {
                            fields.num_predict = map
                                .next_value::<Option<Options>>()?
                                .and_then(|options| options.num_predict);
                        }
                        Name::Prompt => _ = map.next_value::<Option<Text>>()?,
                        Name::Messages => _ = map.next_value::<Option<List>>()?,
                        Name::MaxTokens => fields.max_tokens = map.next_value()?,
                        Name::MaxCompletionTokens => _ = map.next_value::<Option<i64>>()?,
                        Name::DebugRenderOnly => fields.debug_render = map.next_value()?,
                        Name::StreamOptions => _ = map.next_value::<Option<StreamOptions>>()?,
                        Name::NumPredict | Name::Other | Name::RawValue | Name::Alias => {
                            _ = map.next_value::<Checked>()?;
                        }
                    }
                }
                Ok(fields)
            }
        }
        d.deserialize_map(FieldsVisitor)
    }
}

/// `options`: an object (or `null`), of which `num_predict` is read.
struct Options {
    num_predict: Option<i64>,
}

impl<'de> Deserialize<'de> for Options {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct OptionsVisitor;
        impl<'de> Visitor<'de> for OptionsVisitor {
            type Value = Options;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Options, A::Error> {
                let mut options = Options { num_predict: None };
                let mut seen = 0;
                while let Some(name) = map.next_key::<Name>()? {
                    match name {
                        Name::NumPredict => {
                            first(&mut seen, name)?;
                            options.num_predict = map.next_value()?;
                        }
                        Name::RawValue => first(&mut seen, name)?,
                        _ => _ = map.next_value::<Checked>()?,
                    }
                }
                Ok(options)
            }
        }
        d.deserialize_map(OptionsVisitor)
    }
}

/// `stream_options`: an object (or `null`) without a field that Ollama
/// would read as one tollgate reads ([`go_alias_of`]); skipped.
struct StreamOptions;

impl<'de> Deserialize<'de> for StreamOptions {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct StreamOptionsVisitor;
        impl<'de> Visitor<'de> for StreamOptionsVisitor {
            type Value = StreamOptions;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<StreamOptions, A::Error> {
                while let Some(name) = map.next_key::<String>()? {
                    if name == RAW_VALUE_KEY {
                        return Err(refuse_raw_value());
                    }
                    if go_alias_of(&name, READ_IN_STREAM_OPTIONS).is_some() {
                        return Err(de::Error::custom("a field Ollama reads as another"));
                    }
                    map.next_value::<Checked>()?;
                }
                Ok(StreamOptions)
            }
        }
        d.deserialize_map(StreamOptionsVisitor)
    }
}

/// Any JSON value, skipped, but checked as the whole parse into a
/// `serde_json::Value` checks it: string escapes (a lone surrogate is
/// refused), numbers within `f64`'s range, nesting within serde_json's
/// depth limit. serde's `IgnoredAny` checks the syntax only.
struct Checked;

impl<'de> Deserialize<'de> for Checked {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(CheckedVisitor)
    }
}

struct CheckedVisitor;

impl<'de> Visitor<'de> for CheckedVisitor {
    type Value = Checked;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Checked, A::Error> {
        while seq.next_element::<Checked>()?.is_some() {}
        Ok(Checked)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Checked, A::Error> {
        while let Some(name) = map.next_key::<Name>()? {
            if let Name::RawValue = name {
                return Err(refuse_raw_value());
            }
            map.next_value::<Checked>()?;
        }
        Ok(Checked)
    }
}

/// A whole JSON value, built as serde_json builds a `serde_json::Value`
/// (numbers, `preserve_order` maps, the last of a field named twice),
/// except that a field named [`RAW_VALUE_KEY`] is refused rather than read
/// as the JSON in its string.
struct Plain(Value);

impl<'de> Deserialize<'de> for Plain {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(PlainVisitor)
    }
}

struct PlainVisitor;

impl<'de> Visitor<'de> for PlainVisitor {
    type Value = Plain;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E: de::Error>(self, b: bool) -> Result<Plain, E> {
        Ok(Plain(Value::Bool(b)))
    }
    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Plain, E> {
        Ok(Plain(Value::from(n)))
    }
    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Plain, E> {
        Ok(Plain(Value::from(n)))
    }
    fn visit_f64<E: de::Error>(self, n: f64) -> Result<Plain, E> {
        // As serde_json: a float without a JSON number (none parses so) is null.
        Ok(Plain(
            serde_json::Number::from_f64(n).map_or(Value::Null, Value::Number),
        ))
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<Plain, E> {
        Ok(Plain(Value::String(s.to_owned())))
    }
    fn visit_string<E: de::Error>(self, s: String) -> Result<Plain, E> {
        Ok(Plain(Value::String(s)))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Plain, E> {
        Ok(Plain(Value::Null))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Plain, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(Plain(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Plain(Value::Array(items)))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Plain, A::Error> {
        let mut fields = Map::new();
        while let Some(name) = map.next_key::<String>()? {
            if name == RAW_VALUE_KEY {
                return Err(refuse_raw_value());
            }
            let Plain(value) = map.next_value()?;
            fields.insert(name, value);
        }
        Ok(Plain(Value::Object(fields)))
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

/// An array, its elements skipped as [`Checked`].
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
                while seq.next_element::<Checked>()?.is_some() {}
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
    parse_object(body).map(Some)
}

/// Parses a body that is not blank into a JSON object, with the checks
/// of [`check_types`].
pub fn parse_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let Plain(value) = serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON in request body: {e}")))?;
    let Value::Object(map) = value else {
        return Err(ApiError::BadRequest(
            "the request body must be a JSON object".into(),
        ));
    };
    check_types(&map)?;
    Ok(map)
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
    let stream_options = map.get("stream_options").and_then(Value::as_object);
    let aliases = map
        .keys()
        .filter_map(|k| Some((k, go_alias_of(k, READ_AT_TOP)?)));
    let nested = stream_options
        .into_iter()
        .flat_map(|o| o.keys())
        .filter_map(|k| Some((k, go_alias_of(k, READ_IN_STREAM_OPTIONS)?)));
    if let Some((field, name)) = aliases.chain(nested).next() {
        return Err(ApiError::BadRequest(format!(
            "field '{field}' would be read by Ollama as '{name}': write it '{name}'"
        )));
    }
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
    if !is("stream_options", |v| v.is_object() || v.is_null()) {
        return wrong("stream_options", "an object");
    }
    for field in ["max_tokens", "max_completion_tokens"] {
        if !is(field, |v| v.is_i64() || v.is_u64() || v.is_null()) {
            return wrong(field, "an integer");
        }
    }
    // Ollama takes a float for an integer option (and cuts it).
    let num_predict = map.get("options").and_then(|o| o.get("num_predict"));
    if num_predict.is_some_and(|v| !(v.is_number() || v.is_null())) {
        return wrong("options.num_predict", "a number");
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
            debug_render: debug_render(&map),
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
            r#"{"model":"m","messages":[{"content":"\ud83d\ude00","n":[1.5e300,-2,null,true]}]}"#,
            r#"{"model":"m","stream":false,"tools":[{"function":{"parameters":{"a":{"b":{}}}}}]}"#,
            r#"{"model":"m","stream":true,"_debug_render_only":true}"#,
            r#"{"model":"m","_debug_render_only":false,"x":{"_debug_render_only":true}}"#,
            r#"{"model":"m","_debug_render_only":null}"#,
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
        let debug_render =
            |body: &str| glance(body.as_bytes(), Dialect::OpenAi).map(|g| g.debug_render);
        assert_eq!(debug_render(r#"{"_debug_render_only":true}"#), Some(true));
        assert_eq!(
            debug_render(r#"{"x":{"_debug_render_only":true}}"#),
            Some(false)
        );
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
            r#"{"options":{"num_predict":"10"}}"#,
            r#"{"prompt":7}"#,
            r#"{"messages":{"role":"user"}}"#,
            r#"{"max_tokens":2.0}"#,
            r#"{"max_completion_tokens":"9"}"#,
            r#"{"messages":[{"content":"unclosed}]}"#,
            // What serde's IgnoredAny would let through, and a Value refuses:
            // a lone surrogate, a number beyond f64, nesting beyond 128.
            r#"{"model":"m","messages":[{"role":"user","content":"\ud83d"}]}"#,
            r#"{"model":"m","format":{"\udc00":1}}"#,
            // serde_json's raw-value name, which a Value parse reads as the
            // JSON in its string: at the top, spelled with an escape,
            // nested, and in options.
            r#"{"$serde_json::private::RawValue":"{\"model\":\"m\"}"}"#,
            r#"{"\u0024serde_json::private::RawValue":"{\"model\":\"m\"}"}"#,
            r#"{"model":"m","messages":[{"$serde_json::private::RawValue":"{}"}]}"#,
            r#"{"model":"m","options":{"$serde_json::private::RawValue":"{\"num_predict\":7}"}}"#,
            r#"{"model":"m","keep_alive":"\ud800"}"#,
            r#"{"model":"m","messages":[],"temperature":1e400}"#,
            r#"{"model":"m","prompt":"hi","options":{"temperature":1e999}}"#,
            // Names that Ollama's decoder reads as fields tollgate reads.
            r#"{"model":"m","MODEL":"x"}"#,
            r#"{"Model":"x"}"#,
            r#"{"model":"m","Keep_alive":0}"#,
            r#"{"model":"m","NAME":"x"}"#,
            r#"{"model":"m","stream_options":{"Include_Usage":false}}"#,
            r#"{"model":"m","stream_options":5}"#,
        ];
        let deep = format!(
            r#"{{"model":"m","x":{}{}}}"#,
            "[".repeat(127),
            "]".repeat(127)
        );
        let refused = refused.iter().copied().chain([deep.as_str()]);
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
    fn knows_what_go_reads_as_which_field() {
        assert_eq!(go_alias_of("MODEL", READ_AT_TOP), Some("model"));
        assert_eq!(go_alias_of("Keep_Alive", READ_AT_TOP), Some("keep_alive"));
        assert_eq!(
            go_alias_of("\u{212A}eep_alive", READ_AT_TOP),
            Some("keep_alive")
        );
        assert_eq!(go_alias_of("\u{17F}tream", READ_AT_TOP), Some("stream"));
        assert_eq!(go_alias_of("model", READ_AT_TOP), None);
        assert_eq!(go_alias_of("models", READ_AT_TOP), None);
        assert_eq!(go_alias_of("keepalive", READ_AT_TOP), None);
        assert_eq!(go_alias_of("m\u{f6}del", READ_AT_TOP), None);
        // Fields inside `options` are matched exactly by Ollama.
        let body = r#"{"model":"m","options":{"NUM_PREDICT":5,"Model":1}}"#;
        assert!(glance(body.as_bytes(), Dialect::Native).is_some());
    }

    #[test]
    fn builds_what_serde_json_builds() {
        for body in [
            r#"{"model":"m","messages":[{"role":"user","content":"caf\u00e9 \ud83d\ude00 \"q\""}]}"#,
            r#"{"b":1,"a":-2,"c":[1.5,1e300,-0.0,18446744073709551615,null,true,{}],"d":{"z":{},"y":[]}}"#,
            r#"{"model":"a","options":{"num_predict":1},"model":"b"}"#,
            r#"  {"keep_alive":null,"x":"\u0000\n"}  "#,
        ] {
            let ours = Value::Object(parse_object(body.as_bytes()).unwrap());
            let theirs: Value = serde_json::from_str(body).unwrap();
            // Compared as text: the order of fields counts too.
            assert_eq!(ours.to_string(), theirs.to_string(), "{body}");
        }
    }

    #[test]
    fn nests_as_deep_as_the_whole_parse() {
        // serde_json's limit counts the object itself: 126 arrays inside
        // it are read, 127 are not, either way.
        let nested =
            |n: usize| format!(r#"{{"model":"m","x":{}{}}}"#, "[".repeat(n), "]".repeat(n));
        let read = nested(126);
        assert!(by_whole_parse(&read, Dialect::Native).is_some());
        assert!(glance(read.as_bytes(), Dialect::Native).is_some());
        let refused = nested(127);
        assert!(by_whole_parse(&refused, Dialect::Native).is_none());
        assert!(glance(refused.as_bytes(), Dialect::Native).is_none());
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
        let body = r#"{"options":{"num_predict":1,"num_predict":2}}"#;
        assert_eq!(glance(body.as_bytes(), Dialect::Native), None);
        assert_eq!(
            by_whole_parse(body, Dialect::Native).and_then(|g| g.completion_tokens),
            Some(2)
        );
        // A debug flag that is not a boolean: Ollama refuses the body, the
        // whole parse forwards it (and does not take it for a debug render).
        let body = r#"{"model":"m","_debug_render_only":"yes"}"#;
        assert_eq!(glance(body.as_bytes(), Dialect::OpenAi), None);
        assert_eq!(
            by_whole_parse(body, Dialect::OpenAi).map(|g| g.debug_render),
            Some(false)
        );
        // A float limit: Ollama cuts it to an integer, as the whole parse.
        for (body, tokens) in [
            (r#"{"options":{"num_predict":1.5}}"#, Some(1)),
            (r#"{"options":{"num_predict":100.0}}"#, Some(100)),
            (r#"{"options":{"num_predict":0.5}}"#, None),
        ] {
            assert_eq!(glance(body.as_bytes(), Dialect::Native), None);
            let whole = by_whole_parse(body, Dialect::Native).map(|g| g.completion_tokens);
            assert_eq!(whole, Some(tokens), "{body}");
        }
        // A limit beyond i64: the whole parse still reads it.
        let body = r#"{"options":{"num_predict":18446744073709551615}}"#;
        assert_eq!(glance(body.as_bytes(), Dialect::Native), None);
        assert_eq!(
            by_whole_parse(body, Dialect::Native).and_then(|g| g.completion_tokens),
            Some(u64::MAX)
        );
    }
}
