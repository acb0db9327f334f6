//! Client connections (`CLIENT_HEADER_TIMEOUT_SECS`): a connection that does
//! not send a request's head in time is closed, whether it never sends one,
//! sends it too slowly, or sits idle after a response; a request body that
//! pauses for as long is refused with 408.

use crate::support::fake_ollama::Behavior;
use crate::support::{spawn, ADMIN, KEY};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tollgate::credits::Credits;

/// Longer than any header timeout these tests set, by far.
const PATIENCE: Duration = Duration::from_secs(15);

const HEALTH: &[u8] = b"GET /health HTTP/1.1\r\nHost: tollgate\r\n\r\n";

/// Reads until the server closes the connection; `None` if it is still
/// open after [`PATIENCE`].
async fn read_until_closed(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let reading = async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(PATIENCE, reading).await.ok()?;
    Some(got)
}

/// Reads one response to `/health` (its head and its short body).
async fn read_health_response(stream: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("\"status\"") {
        let n = tokio::time::timeout(PATIENCE, stream.read(&mut buf))
            .await
            .expect("a response in time")
            .expect("read");
        assert!(n > 0, "closed before the response: {got:?}");
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed() {
    let app = spawn().var("CLIENT_HEADER_TIMEOUT_SECS", "1").start().await;
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    let got = read_until_closed(&mut stream).await;
    assert_eq!(got, Some(vec![]), "closed, without a response");
}

#[tokio::test]
async fn a_head_sent_too_slowly_is_cut_off() {
    let app = spawn().var("CLIENT_HEADER_TIMEOUT_SECS", "1").start().await;
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    // A head that never ends, a header line at a time.
    stream
        .write_all(b"POST /generate HTTP/1.1\r\nHost: tollgate\r\n")
        .await
        .unwrap();
    let mut closed = false;
    for i in 0..30 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let line = format!("X-Slow-{i}: 1\r\n");
        if stream.write_all(line.as_bytes()).await.is_err() {
            closed = true;
            break;
        }
    }
    if !closed {
        assert!(read_until_closed(&mut stream).await.is_some());
    }
    assert_eq!(app.fake.generation_count(), 0);
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_its_response() {
    let app = spawn().var("CLIENT_HEADER_TIMEOUT_SECS", "1").start().await;
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    stream.write_all(HEALTH).await.unwrap();
    let response = read_health_response(&mut stream).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        read_until_closed(&mut stream).await.is_some(),
        "an idle connection is closed"
    );
}

#[tokio::test]
async fn requests_in_time_keep_a_connection_and_zero_means_no_limit() {
    for limit in ["2", "0"] {
        let app = spawn()
            .var("CLIENT_HEADER_TIMEOUT_SECS", limit)
            .start()
            .await;
        let mut stream = TcpStream::connect(app.addr).await.unwrap();
        // Several requests on one connection, each well within the limit.
        for _ in 0..3 {
            stream.write_all(HEALTH).await.unwrap();
            let response = read_health_response(&mut stream).await;
            assert!(response.starts_with("HTTP/1.1 200"), "{response}");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        if limit == "0" {
            // Idle for longer than any limit above: still served.
            tokio::time::sleep(Duration::from_secs(3)).await;
            stream.write_all(HEALTH).await.unwrap();
            let response = read_health_response(&mut stream).await;
            assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        }
    }
}

#[tokio::test]
async fn a_request_body_that_stalls_is_408() {
    let app = spawn().var("CLIENT_HEADER_TIMEOUT_SECS", "1").start().await;
    let body = r#"{"model": "mistral", "prompt": "hi"}"#;
    let half = &body[..10];
    let heads = [
        // A declared length, half of it sent.
        format!(
            "POST /api/generate HTTP/1.1\r\nHost: tollgate\r\nx-api-key: {KEY}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{half}",
            body.len()
        ),
        // Chunked, one chunk sent, never the last.
        format!(
            "POST /api/generate HTTP/1.1\r\nHost: tollgate\r\nx-api-key: {KEY}\r\n\
             Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{half}\r\n",
            half.len()
        ),
        // An admin API body.
        format!(
            "POST /admin/keys HTTP/1.1\r\nHost: tollgate\r\nx-api-key: {ADMIN}\r\n\
             Content-Length: 40\r\n\r\n{{\"name\": "
        ),
    ];
    for head in heads {
        let mut stream = TcpStream::connect(app.addr).await.unwrap();
        stream.write_all(head.as_bytes()).await.unwrap();
        let got = read_until_closed(&mut stream)
            .await
            .expect("answered, not held open");
        let got = String::from_utf8_lossy(&got);
        assert!(got.starts_with("HTTP/1.1 408"), "{got}");
        assert!(got.contains(r#"{"error":"#), "{got}");
    }
    assert!(app.forwarded().is_empty());
    assert_eq!(app.balance_of(KEY).await, Credits::whole(10));
}

#[tokio::test]
async fn a_body_sent_slowly_but_steadily_is_read() {
    let app = spawn().var("CLIENT_HEADER_TIMEOUT_SECS", "1").start().await;
    let body = r#"{"model": "mistral", "prompt": "hi"}"#;
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    let head = format!(
        "POST /api/generate HTTP/1.1\r\nHost: tollgate\r\nx-api-key: {KEY}\r\n\
         Connection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    // Longer in all than the limit, never idle for as long.
    for piece in body.as_bytes().chunks(8) {
        tokio::time::sleep(Duration::from_millis(400)).await;
        stream.write_all(piece).await.unwrap();
    }
    let got = read_until_closed(&mut stream).await.expect("answered");
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert_eq!(app.forwarded().len(), 1);
}

/// A key at its concurrency limit gets 429 before any of its next
/// request's body is read: a key limited to one request at a time cannot
/// have a thousand bodies of up to MAX_BODY_BYTES buffered at once.
#[tokio::test]
async fn a_key_at_its_concurrency_limit_gets_429_before_its_body_is_read() {
    let app = spawn()
        .var("MAX_CONCURRENT_PER_KEY", "1")
        .var("CLIENT_HEADER_TIMEOUT_SECS", "30")
        .start()
        .await;
    app.fake.set(Behavior {
        hold: true,
        ..Behavior::default()
    });
    let held = app
        .keyed("/api/generate")
        .json(&serde_json::json!({"model": "mistral", "prompt": "hi", "stream": false}))
        .send();
    let held = tokio::spawn(held);
    assert!(app.fake.wait_for_requests(1, Duration::from_secs(5)).await);
    // A head announcing 8 MiB, and none of them sent.
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    let head = format!(
        "POST /api/generate HTTP/1.1\r\nHost: tollgate\r\nx-api-key: {KEY}\r\n\
         Connection: close\r\nContent-Length: {}\r\n\r\n",
        8 << 20
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let got = read_until_closed(&mut stream)
        .await
        .expect("answered without waiting for the body");
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 429"), "{got}");
    assert!(got.contains("too many concurrent requests"), "{got}");
    // A path the key can never use is 403 all the same, not 429.
    let pull = app
        .keyed("/api/pull")
        .json(&serde_json::json!({"model": "mistral"}))
        .send()
        .await
        .unwrap();
    assert_eq!(pull.status(), 403);
    app.fake.release(1);
    assert_eq!(held.await.unwrap().unwrap().status(), 200);
    assert_eq!(app.fake.generation_count(), 1);
}
