//! Request policy for ordinary keys (SPEC §4a), as pure functions on JSON
//! bodies: which models a key may use, and the caps applied before a body
//! is forwarded. Knows nothing of HTTP or storage.

use serde_json::{Map, Value};

/// Which request dialect a body is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    /// Ollama's native API: `options.num_predict`, `options.num_ctx`.
    Native,
    /// OpenAI-compatible: `max_tokens`, `max_completion_tokens`.
    OpenAi,
}

/// The operator's caps.
#[derive(Clone, Copy, Debug, Default)]
pub struct Caps {
    pub max_tokens: Option<u64>,
    pub max_num_ctx: Option<u64>,
}

impl Caps {
    /// Whether any cap is set.
    pub fn any(&self) -> bool {
        self.max_tokens.is_some() || self.max_num_ctx.is_some()
    }
}

/// `mistral` and `mistral:latest` name the same model.
pub fn canonical_model(name: &str) -> String {
    let name = name.trim();
    let last = name.rsplit('/').next().unwrap_or(name);
    if last.contains(':') {
        name.to_string()
    } else {
        format!("{name}:latest")
    }
}

/// Whether a key limited to `allowed` may use `model`.
pub fn model_allowed(allowed: &[String], model: &str) -> bool {
    let wanted = canonical_model(model);
    allowed.iter().any(|a| canonical_model(a) == wanted)
}

/// The completion-token limit a request sets, if a usable one: Ollama
/// reads `options.num_predict`, and on its OpenAI endpoints `max_tokens`
/// (it has no `max_completion_tokens`); 0 and negative values are no limit.
pub fn requested_completion_tokens(body: &Map<String, Value>, dialect: Dialect) -> Option<u64> {
    let limit = match dialect {
        Dialect::Native => body.get("options").and_then(|o| o.get("num_predict")),
        Dialect::OpenAi => body.get("max_tokens"),
    };
    limit.and_then(token_limit)
}

/// The token limit a JSON number sets, as Ollama reads it: an integer, or
/// a float cut to one (an option's integer takes `int64(f)`); 0 and
/// negative values are no limit (`None`), as is anything not a number.
pub fn token_limit(value: &Value) -> Option<u64> {
    if let Some(n) = value.as_u64() {
        return (n > 0).then_some(n);
    }
    if value.as_i64().is_some() {
        return None;
    }
    let f = value.as_f64()?;
    // `as` saturates: a float beyond u64 is u64::MAX.
    (f >= 1.0).then(|| f.trunc() as u64)
}

/// Whether a generation body asks only to load, pin or unload its model:
/// `keep_alive` with nothing to generate from (an empty or absent `prompt`,
/// an empty or absent `messages`), which Ollama answers without generating.
/// Removing `keep_alive` from it would turn an unload into a load.
/// `input` is the field the endpoint generates from (`prompt`, `messages`).
pub fn manages_a_model(body: &Map<String, Value>, input: &str) -> bool {
    let empty = match body.get(input) {
        None | Some(Value::Null) => true,
        Some(Value::String(s)) => s.is_empty(),
        Some(Value::Array(a)) => a.is_empty(),
        Some(_) => false,
    };
    empty && body.contains_key("keep_alive")
}

/// Applies the caps and removes `keep_alive`; returns whether the body
/// changed (an unchanged body is forwarded byte for byte).
pub fn apply(body: &mut Map<String, Value>, dialect: Dialect, caps: Caps) -> bool {
    let mut changed = body.remove("keep_alive").is_some();
    if let Some(max) = caps.max_tokens {
        changed |= match dialect {
            Dialect::Native => object_field(body, "options")
                .is_some_and(|o| cap_field(o, "num_predict", max, true)),
            Dialect::OpenAi => {
                // Ollama generates up to `max_tokens` and has no
                // `max_completion_tokens`: a client that sets a limit only
                // there gets `max_tokens` set to it (capped).
                let a = cap_field(body, "max_completion_tokens", max, false);
                let limit_of = |field: &str| body.get(field).and_then(token_limit);
                let limit = match limit_of("max_completion_tokens") {
                    Some(asked) if limit_of("max_tokens").is_none() => asked.min(max),
                    _ => max,
                };
                let b = cap_field(body, "max_tokens", limit, true);
                a || b
            }
        };
    }
    if let (Some(max), Dialect::Native) = (caps.max_num_ctx, dialect) {
        if let Some(options) = body.get_mut("options").and_then(Value::as_object_mut) {
            // Ollama takes a float for an integer option (and drops its
            // fraction).
            if options
                .get("num_ctx")
                .and_then(Value::as_f64)
                .is_some_and(|n| n > max as f64)
            {
                options.insert("num_ctx".into(), Value::from(max));
                changed = true;
            }
        }
    }
    changed
}

/// The object in `body`'s `field`, made an empty one when absent or
/// `null` (which Ollama reads as none: `options`, `stream_options`);
/// `None` when the field holds something else.
pub fn object_field<'a>(
    body: &'a mut Map<String, Value>,
    field: &str,
) -> Option<&'a mut Map<String, Value>> {
    let value = body.entry(field).or_insert(Value::Null);
    if value.is_null() {
        *value = Value::Object(Map::new());
    }
    value.as_object_mut()
}

/// Caps `field` at `max`: a larger value, 0 or a negative one (Ollama's
/// "unbounded") and — when `set_if_absent` — a missing one become `max`.
fn cap_field(map: &mut Map<String, Value>, field: &str, max: u64, set_if_absent: bool) -> bool {
    let needs_cap = match map.get(field) {
        None | Some(Value::Null) => set_if_absent,
        Some(v) => token_limit(v).is_none_or(|n| n > max),
    };
    if needs_cap {
        map.insert(field.to_string(), Value::from(max));
    }
    needs_cap
}

/// `/api/tags` filtered to the models a key may use.
pub fn filter_tags(body: &[u8], allowed: &[String]) -> Option<Vec<u8>> {
    filter_list(body, "models", "name", allowed)
}

/// `/v1/models` filtered to the models a key may use.
pub fn filter_openai_models(body: &[u8], allowed: &[String]) -> Option<Vec<u8>> {
    filter_list(body, "data", "id", allowed)
}

fn filter_list(body: &[u8], list: &str, name: &str, allowed: &[String]) -> Option<Vec<u8>> {
    let mut v: Value = serde_json::from_slice(body).ok()?;
    let items = v.get_mut(list)?.as_array_mut()?;
    items.retain(|item| {
        item.get(name)
            .and_then(Value::as_str)
            .is_some_and(|n| model_allowed(allowed, n))
    });
    serde_json::to_vec(&v).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn latest_is_the_default_tag() {
        let allowed = vec!["mistral".to_string()];
        assert!(model_allowed(&allowed, "mistral:latest"));
        assert!(model_allowed(&allowed, "mistral"));
        assert!(!model_allowed(&allowed, "mistral:7b"));
        assert!(!model_allowed(&allowed, "llama3"));
        assert!(model_allowed(&["llama3:8b".into()], "llama3:8b"));
    }

    #[test]
    fn caps_native_num_predict_and_num_ctx() {
        let caps = Caps {
            max_tokens: Some(100),
            max_num_ctx: Some(2048),
        };
        for (given, expected) in [
            (json!({"model": "m"}), json!(100)),
            (
                json!({"model": "m", "options": {"num_predict": 5000}}),
                json!(100),
            ),
            (
                json!({"model": "m", "options": {"num_predict": -1}}),
                json!(100),
            ),
            (
                json!({"model": "m", "options": {"num_predict": -2}}),
                json!(100),
            ),
            // 0 is no limit to Ollama's runner.
            (
                json!({"model": "m", "options": {"num_predict": 0}}),
                json!(100),
            ),
            // `null` options are no options to Ollama.
            (json!({"model": "m", "options": null}), json!(100)),
        ] {
            let mut body = obj(given);
            assert!(apply(&mut body, Dialect::Native, caps));
            assert_eq!(body["options"]["num_predict"], expected);
        }
        let mut body = obj(json!({"options": {"num_predict": 50, "num_ctx": 8192}}));
        assert!(apply(&mut body, Dialect::Native, caps));
        assert_eq!(body["options"]["num_predict"], json!(50));
        assert_eq!(body["options"]["num_ctx"], json!(2048));
        // Ollama takes a float for an integer option.
        for huge in [json!(1e6), json!(131072.0)] {
            let mut body = obj(json!({"options": {"num_predict": 5, "num_ctx": huge}}));
            assert!(apply(&mut body, Dialect::Native, caps));
            assert_eq!(body["options"]["num_ctx"], json!(2048));
        }
        let mut body = obj(json!({"options": {"num_predict": 5, "num_ctx": 1024.0}}));
        assert!(!apply(&mut body, Dialect::Native, caps));
        // Without a token cap, no `options` is made for the context cap.
        let ctx_only = Caps {
            max_tokens: None,
            max_num_ctx: Some(2048),
        };
        let mut body = obj(json!({"model": "m"}));
        assert!(!apply(&mut body, Dialect::Native, ctx_only));
        assert!(!body.contains_key("options"));
    }

    #[test]
    fn leaves_bodies_alone_without_caps_except_keep_alive() {
        let mut body = obj(json!({"model": "m", "options": {"num_predict": 9999}}));
        assert!(!apply(&mut body, Dialect::Native, Caps::default()));
        let mut body = obj(json!({"model": "m", "keep_alive": 0}));
        assert!(apply(&mut body, Dialect::Native, Caps::default()));
        assert!(!body.contains_key("keep_alive"));
    }

    #[test]
    fn knows_a_request_that_only_manages_a_model() {
        let manages = |v: Value, input| manages_a_model(&obj(v), input);
        assert!(manages(
            json!({"model": "m", "prompt": "", "keep_alive": 0}),
            "prompt"
        ));
        assert!(manages(
            json!({"model": "m", "keep_alive": "10m"}),
            "prompt"
        ));
        assert!(manages(
            json!({"model": "m", "messages": [], "keep_alive": 0}),
            "messages"
        ));
        assert!(manages(
            json!({"model": "m", "messages": null, "keep_alive": -1}),
            "messages"
        ));
        assert!(!manages(
            json!({"model": "m", "prompt": "hi", "keep_alive": 0}),
            "prompt"
        ));
        assert!(!manages(json!({"model": "m", "prompt": ""}), "prompt"));
        let chat =
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "keep_alive": 0});
        assert!(!manages(chat, "messages"));
    }

    #[test]
    fn caps_openai_max_tokens() {
        let caps = Caps {
            max_tokens: Some(64),
            max_num_ctx: None,
        };
        let mut body = obj(json!({"model": "m"}));
        assert!(apply(&mut body, Dialect::OpenAi, caps));
        assert_eq!(body["max_tokens"], json!(64));
        // Ollama has no `max_completion_tokens`: `max_tokens` is set too.
        let mut body = obj(json!({"max_completion_tokens": 1000}));
        assert!(apply(&mut body, Dialect::OpenAi, caps));
        assert_eq!(body["max_completion_tokens"], json!(64));
        assert_eq!(body["max_tokens"], json!(64));
        let mut body = obj(json!({"max_completion_tokens": 50}));
        assert!(apply(&mut body, Dialect::OpenAi, caps));
        assert_eq!(body["max_tokens"], json!(50));
        let mut body = obj(json!({"max_completion_tokens": 50, "max_tokens": 20}));
        assert!(!apply(&mut body, Dialect::OpenAi, caps));
        assert_eq!(
            requested_completion_tokens(&body, Dialect::OpenAi),
            Some(20)
        );
        // Both under the cap: left as they are.
        let mut body = obj(json!({"max_completion_tokens": 20, "max_tokens": 50}));
        assert!(!apply(&mut body, Dialect::OpenAi, caps));
        assert_eq!(body["max_tokens"], json!(50));
        // 0 is no limit to Ollama.
        let mut body = obj(json!({"max_tokens": 0}));
        assert!(apply(&mut body, Dialect::OpenAi, caps));
        assert_eq!(body["max_tokens"], json!(64));
    }

    #[test]
    fn reads_a_float_limit_as_ollama_does() {
        let caps = Caps {
            max_tokens: Some(64),
            max_num_ctx: None,
        };
        for (given, expected, changed) in [
            (json!(50.0), json!(50.0), false),
            (json!(50.9), json!(50.9), false),
            (json!(1e3), json!(64), true),
            (json!(0.5), json!(64), true),
            (json!(-1.5), json!(64), true),
        ] {
            let mut body = obj(json!({"options": {"num_predict": given}}));
            assert_eq!(apply(&mut body, Dialect::Native, caps), changed, "{given}");
            assert_eq!(body["options"]["num_predict"], expected, "{given}");
        }
        assert_eq!(token_limit(&json!(50.9)), Some(50));
        assert_eq!(token_limit(&json!(0.9)), None);
        assert_eq!(token_limit(&json!(1e300)), Some(u64::MAX));
        assert_eq!(token_limit(&json!("7")), None);
    }

    #[test]
    fn reads_the_limit_ollama_honours() {
        let read = |v: Value, dialect| requested_completion_tokens(&obj(v), dialect);
        assert_eq!(
            read(json!({"max_completion_tokens": 50}), Dialect::OpenAi),
            None
        );
        assert_eq!(read(json!({"max_tokens": 0}), Dialect::OpenAi), None);
        assert_eq!(read(json!({"max_tokens": 7}), Dialect::OpenAi), Some(7));
        assert_eq!(
            read(json!({"options": {"num_predict": 0}}), Dialect::Native),
            None
        );
        assert_eq!(
            read(json!({"options": {"num_predict": 9}}), Dialect::Native),
            Some(9)
        );
    }

    #[test]
    fn filters_model_lists() {
        let tags = br#"{"models":[{"name":"mistral:latest"},{"name":"llama3.2:latest"}]}"#;
        let out = filter_tags(tags, &["mistral".into()]).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v, json!({"models": [{"name": "mistral:latest"}]}));
        let models = br#"{"object":"list","data":[{"id":"mistral:latest"},{"id":"x:1"}]}"#;
        let out = filter_openai_models(models, &["x:1".into()]).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["data"], json!([{"id": "x:1"}]));
    }
}
