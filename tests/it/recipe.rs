//! The original recipe's client, exactly: `POST /generate?prompt=...` with
//! a JSON content type and no body.

use crate::support::{TestApp, KEY};
use serde_json::{json, Value};

#[tokio::test]
async fn the_recipe_call_answers_with_response_and_the_eleventh_gets_402() {
    let app = TestApp::new().await;
    for i in 1..=10 {
        let response = app
            .post("/generate?prompt=hello")
            .header("x-api-key", KEY)
            .header("content-type", "application/json")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "call {i}");
        let remaining = response.headers()["x-credits-remaining"]
            .to_str()
            .unwrap()
            .to_string();
        assert_eq!(remaining, (10 - i).to_string());
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["response"], "w0 w1 w2 ");
        assert_eq!(body["done"], true);
    }
    let forwarded = app.forwarded().last().unwrap().json();
    assert_eq!(
        forwarded,
        json!({"prompt": "hello", "model": "mistral", "stream": false})
    );

    let eleventh = app
        .post("/generate?prompt=hello")
        .header("x-api-key", KEY)
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(eleventh.status(), 402);
    let body: Value = eleventh.json().await.unwrap();
    assert!(body["error"]
        .as_str()
        .unwrap()
        .contains("insufficient credits"));
    assert_eq!(
        app.fake.generation_count(),
        10,
        "the 402 never reached Ollama"
    );
}

#[tokio::test]
async fn generate_and_chat_keep_every_other_field_and_stream_only_when_asked() {
    let app = TestApp::new().await;
    let response = app
        .keyed("/chat")
        .json(&json!({"messages": [{"role": "user", "content": "hi"}], "options": {"temperature": 0.1}, "format": "json"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["message"]["content"], "w0 w1 w2 ");
    let forwarded = app.forwarded().last().unwrap().json();
    assert_eq!(forwarded["model"], "mistral");
    assert_eq!(forwarded["stream"], false);
    assert_eq!(forwarded["format"], "json");
    assert_eq!(forwarded["options"]["temperature"], 0.1);

    let streamed = app
        .keyed("/generate")
        .json(&json!({"prompt": "hi", "model": "llama3.2", "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(streamed.status(), 200);
    assert!(streamed.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/x-ndjson"));
    let text = streamed.text().await.unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    assert_eq!(lines[3]["done"], true);
    assert_eq!(lines[0]["model"], "llama3.2");
}

#[tokio::test]
async fn refuses_to_start_when_ollama_url_is_its_own_address() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let mut vars = std::collections::HashMap::new();
    vars.insert("LISTEN_ADDR".to_string(), addr.clone());
    vars.insert("OLLAMA_URL".to_string(), format!("http://{addr}"));
    vars.insert("DATABASE_URL".to_string(), "memory".to_string());
    let config = tollgate::config::Config::from_map(&vars).unwrap();
    let err = tollgate::app::App::build(config, Default::default())
        .await
        .err()
        .expect("must refuse");
    assert!(err.to_string().contains("own address"), "{err}");
}

#[tokio::test]
async fn a_first_start_without_keys_creates_one_key_and_never_shows_it_again() {
    use std::sync::Arc;
    use tollgate::store::{memory::MemoryStore, SharedStore};
    let store: SharedStore = Arc::new(MemoryStore::default());
    let mut vars = std::collections::HashMap::new();
    vars.insert("DATABASE_URL".to_string(), "memory".to_string());
    let config = tollgate::config::Config::from_map(&vars).unwrap();
    let first = tollgate::app::App::with_store(config.clone(), store.clone(), Default::default())
        .await
        .unwrap();
    let key = first.first_key.clone().expect("a key is created");
    assert!(key.starts_with("tg_"));
    let stored = store
        .key_by_hash(&tollgate::auth::keys::hash(&key))
        .await
        .unwrap()
        .expect("stored by its hash");
    assert_eq!(stored.balance, tollgate::credits::Credits::whole(10));
    let again = tollgate::app::App::with_store(config, store.clone(), Default::default())
        .await
        .unwrap();
    assert_eq!(again.first_key, None);
    assert_eq!(store.keys().await.unwrap().len(), 1);
}

/// SPEC §1: the first key gets the default credits, `API_KEY_CREDITS`
/// when it is set.
#[tokio::test]
async fn the_first_key_gets_api_key_credits() {
    use std::sync::Arc;
    use tollgate::store::{memory::MemoryStore, SharedStore};
    let store: SharedStore = Arc::new(MemoryStore::default());
    let vars = std::collections::HashMap::from([
        ("DATABASE_URL".to_string(), "memory".to_string()),
        ("API_KEY_CREDITS".to_string(), "25.5".to_string()),
    ]);
    let config = tollgate::config::Config::from_map(&vars).unwrap();
    let app = tollgate::app::App::with_store(config, store.clone(), Default::default())
        .await
        .unwrap();
    let key = app.first_key.clone().expect("a key is created");
    let stored = store
        .key_by_hash(&tollgate::auth::keys::hash(&key))
        .await
        .unwrap()
        .expect("stored by its hash");
    assert_eq!(stored.balance, "25.5".parse().unwrap());
}
