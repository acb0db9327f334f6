//! Just enough of the Chrome DevTools protocol, over just enough of a
//! WebSocket client (RFC 6455) written on a plain `TcpStream`: the test
//! needs no crate beyond those the project already builds, and no Node.
//!
//! One connection to the browser's endpoint; pages are driven through
//! sessions from `Target.attachToTarget` with `flatten: true`, so every
//! command and event carries its `sessionId` on that one socket. Calls are
//! made one at a time: [`Cdp::call`] sends a command and reads until its
//! answer, keeping the events that arrive meanwhile for
//! [`Cdp::wait_event`].

use serde_json::{json, Value};
use std::collections::VecDeque;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TEXT: u8 = 0x1;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xA;

/// A DevTools connection to one browser.
pub struct Cdp {
    socket: TcpStream,
    next_id: u64,
    events: VecDeque<Value>,
}

impl Cdp {
    /// Connects to `ws://host:port/path` (the browser's DevTools endpoint).
    pub async fn connect(ws_url: &str) -> Result<Cdp, String> {
        let rest = ws_url
            .strip_prefix("ws://")
            .ok_or_else(|| format!("not a ws:// address: {ws_url}"))?;
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let mut socket = TcpStream::connect(authority)
            .await
            .map_err(|e| format!("cannot connect to {authority}: {e}"))?;
        let _ = socket.set_nodelay(true);
        // No Origin header: DevTools refuses WebSocket connections from
        // origins it was not told to allow, and accepts those without one.
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dG9sbGdhdGUgYnJvd3NlciE=\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n"
        );
        socket
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("WebSocket handshake: {e}"))?;
        // Byte by byte up to the blank line: nothing of the first frame is
        // read with the headers.
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let byte = socket
                .read_u8()
                .await
                .map_err(|e| format!("WebSocket handshake: {e}"))?;
            head.push(byte);
            if head.len() > 16 * 1024 {
                return Err("WebSocket handshake: headers too long".into());
            }
        }
        let head = String::from_utf8_lossy(&head);
        if !head.starts_with("HTTP/1.1 101") {
            return Err(format!("WebSocket handshake refused: {head}"));
        }
        Ok(Cdp {
            socket,
            next_id: 1,
            events: VecDeque::new(),
        })
    }

    /// Sends `method` (to the page of `session`, or to the browser) and
    /// returns its `result`, or the protocol's error as `Err`.
    pub async fn call(
        &mut self,
        session: Option<&str>,
        method: &str,
        params: Value,
    ) -> Result<Value, String> {
        let id = self.next_id;
        self.next_id += 1;
        let mut message = json!({"id": id, "method": method, "params": params});
        if let Some(session) = session {
            message["sessionId"] = json!(session);
        }
        self.send(message.to_string().as_bytes()).await?;
        loop {
            let message = self.receive().await?;
            if message.get("id").and_then(Value::as_u64) == Some(id) {
                if let Some(error) = message.get("error") {
                    return Err(format!("{method} failed: {error}"));
                }
                return Ok(message.get("result").cloned().unwrap_or(Value::Null));
            }
            if message.get("method").is_some() {
                self.events.push_back(message);
            }
        }
    }

    /// Waits for the event `method` from `session` and returns its params.
    pub async fn wait_event(&mut self, session: &str, method: &str) -> Result<Value, String> {
        let matches = |event: &Value| {
            event["method"] == method && event["sessionId"].as_str() == Some(session)
        };
        if let Some(at) = self.events.iter().position(matches) {
            let event = self.events.remove(at).expect("found");
            return Ok(event["params"].clone());
        }
        loop {
            let message = self.receive().await?;
            if matches(&message) {
                return Ok(message["params"].clone());
            }
            if message.get("method").is_some() {
                self.events.push_back(message);
            }
        }
    }

    /// Takes the events received so far (those not waited for).
    pub fn take_events(&mut self) -> Vec<Value> {
        self.events.drain(..).collect()
    }

    /// One masked text frame (a client must mask what it sends).
    async fn send(&mut self, payload: &[u8]) -> Result<(), String> {
        self.send_frame(TEXT, payload).await
    }

    async fn send_frame(&mut self, opcode: u8, payload: &[u8]) -> Result<(), String> {
        let mut frame = Vec::with_capacity(payload.len() + 14);
        frame.push(0x80 | opcode);
        match payload.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n if n <= usize::from(u16::MAX) => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        let mask: [u8; 4] = rand::random();
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.socket
            .write_all(&frame)
            .await
            .map_err(|e| format!("DevTools connection: {e}"))
    }

    /// The next whole message (fragments joined), parsed as JSON.
    async fn receive(&mut self) -> Result<Value, String> {
        let mut message = Vec::new();
        loop {
            let (fin, opcode, payload) = self.read_frame().await?;
            match opcode {
                CLOSE => return Err("the browser closed the DevTools connection".into()),
                PING => self.send_frame(PONG, &payload).await?,
                PONG => {}
                _ => {
                    message.extend_from_slice(&payload);
                    if fin {
                        return serde_json::from_slice(&message)
                            .map_err(|e| format!("DevTools sent no JSON ({e})"));
                    }
                }
            }
        }
    }

    async fn read_frame(&mut self) -> Result<(bool, u8, Vec<u8>), String> {
        let closed = |e: std::io::Error| format!("DevTools connection: {e}");
        let mut head = [0u8; 2];
        self.socket.read_exact(&mut head).await.map_err(closed)?;
        let fin = head[0] & 0x80 != 0;
        let opcode = head[0] & 0x0F;
        let masked = head[1] & 0x80 != 0;
        let len = match head[1] & 0x7F {
            126 => u64::from(self.socket.read_u16().await.map_err(closed)?),
            127 => self.socket.read_u64().await.map_err(closed)?,
            n => u64::from(n),
        };
        if len > 64 * 1024 * 1024 {
            return Err(format!("DevTools frame of {len} bytes"));
        }
        let mut mask = [0u8; 4];
        if masked {
            self.socket.read_exact(&mut mask).await.map_err(closed)?;
        }
        let mut payload = vec![0u8; len as usize];
        self.socket.read_exact(&mut payload).await.map_err(closed)?;
        if masked {
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= mask[i % 4];
            }
        }
        Ok((fin, opcode, payload))
    }
}
