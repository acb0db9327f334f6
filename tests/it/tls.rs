//! SPEC §2 `TLS_CERT` / `TLS_KEY`: HTTPS with rustls.

use crate::support::fake_ollama::FakeOllama;
use crate::support::KEY;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls::{self, pki_types::CertificateDer, ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;
use tollgate::app::App;
use tollgate::config::Config;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn client() -> TlsConnector {
    use rustls_pki_types::pem::PemObject;
    let mut roots = RootCertStore::empty();
    let cert = CertificateDer::from_pem_file(fixture("test-cert.pem")).unwrap();
    roots.add(cert).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

#[tokio::test]
async fn serves_https_with_the_configured_certificate() {
    let fake = FakeOllama::start().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut vars = std::collections::HashMap::new();
    for (k, v) in [
        ("API_KEY", KEY.to_string()),
        ("DATABASE_URL", "memory".into()),
        ("OLLAMA_URL", fake.url()),
        ("LISTEN_ADDR", addr.to_string()),
        ("TLS_CERT", fixture("test-cert.pem").display().to_string()),
        ("TLS_KEY", fixture("test-key.pem").display().to_string()),
    ] {
        vars.insert(k.to_string(), v);
    }
    let config = Config::from_map(&vars).unwrap();
    let acceptor = tollgate::tls::acceptor(
        config.tls_cert.as_deref().unwrap(),
        config.tls_key.as_deref().unwrap(),
    )
    .unwrap();
    let app = App::build(config, Default::default()).await.unwrap();
    tokio::spawn(app.serve_tls(listener, acceptor, std::future::pending()));

    // A plain-HTTP request is not answered as HTTP.
    let plain = reqwest::get(format!("http://{addr}/health")).await;
    assert!(plain.is_err() || !plain.unwrap().status().is_success());

    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = client().connect(name, tcp).await.unwrap();
    let request = format!(
        "POST /generate?prompt=hi HTTP/1.1\r\nHost: localhost\r\nx-api-key: {KEY}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tls.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        response.contains("\"response\":\"w0 w1 w2 \""),
        "{response}"
    );
}

#[tokio::test]
async fn a_bad_certificate_file_names_the_variable() {
    let missing = tollgate::tls::acceptor(&fixture("nope.pem"), &fixture("test-key.pem"))
        .err()
        .unwrap()
        .to_string();
    assert!(
        missing.contains("TLS_CERT") && missing.contains("nope.pem"),
        "{missing}"
    );
    let wrong = tollgate::tls::acceptor(&fixture("test-cert.pem"), &fixture("test-cert.pem"))
        .err()
        .unwrap()
        .to_string();
    assert!(wrong.contains("TLS_KEY"), "{wrong}");
}
