//! Client connections (`CLIENT_HEADER_TIMEOUT_SECS`): a connection that does
//! not send a request's head in time is closed, whether it never sends one,
//! sends it too slowly, or sits idle after a response.

use crate::support::spawn;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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
