//! Hostile input for the HTTP services, sent over raw TCP so nothing is cleaned up on the way:
//! each case must get its 4xx, quickly, with a JSON body.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How a hostile request is sent.
#[derive(Debug, Clone)]
pub enum Send {
    /// Headers and the whole body at once.
    Whole(Vec<u8>),
    /// Claims `declared` bytes, sends `sent` of them, then waits for the answer.
    Huge { declared: usize, sent: usize },
    /// Claims `len` bytes and sends one every `every`.
    Slow { len: usize, every: Duration },
}

/// One hostile request and the status it must get.
#[derive(Debug, Clone)]
pub struct Case {
    pub name: &'static str,
    pub content_type: Option<&'static str>,
    pub send: Send,
    pub expect: u16,
}

fn json(name: &'static str, body: impl Into<Vec<u8>>, expect: u16) -> Case {
    Case {
        name,
        content_type: Some("application/json"),
        send: Send::Whole(body.into()),
        expect,
    }
}

/// The cases, for a service whose body limit is below 100 MB and whose body timeout is short.
pub fn cases() -> Vec<Case> {
    let nested = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    vec![
        json("malformed JSON", r#"{"deviceId":"d","ts":1,"#, 400),
        json(
            "wrong types",
            r#"{"deviceId":7,"ts":"now","latitude":"north","longitude":[]}"#,
            400,
        ),
        json("missing fields", "{}", 400),
        json(
            "NaN",
            r#"{"deviceId":"d","ts":1,"latitude":NaN,"longitude":0}"#,
            400,
        ),
        json(
            "Infinity",
            r#"{"deviceId":"d","ts":1,"latitude":0,"longitude":Infinity}"#,
            400,
        ),
        json(
            "number beyond f64",
            r#"{"deviceId":"d","ts":1,"latitude":1e999,"longitude":0}"#,
            400,
        ),
        json(
            "latitude out of range",
            r#"{"deviceId":"d","ts":1,"latitude":1000,"longitude":0}"#,
            400,
        ),
        json(
            "ts not an integer",
            r#"{"deviceId":"d","ts":1e30,"latitude":0,"longitude":0}"#,
            400,
        ),
        json(
            "negative ts",
            r#"{"deviceId":"d","ts":-1,"latitude":0,"longitude":0}"#,
            400,
        ),
        json(
            "10 KB deviceId",
            format!(
                r#"{{"deviceId":"{}","ts":1,"latitude":0,"longitude":0}}"#,
                "x".repeat(10 * 1024)
            ),
            400,
        ),
        json("deeply nested JSON", nested, 400),
        json("empty body", "", 400),
        json(
            "invalid UTF-8",
            vec![b'{', b'"', 0xff, 0xfe, b'"', b':', b'1', b'}'],
            400,
        ),
        json("JSON null", "null", 400),
        Case {
            name: "wrong content type",
            content_type: Some("text/plain"),
            send: Send::Whole(br#"{"deviceId":"d","ts":1,"latitude":0,"longitude":0}"#.to_vec()),
            expect: 415,
        },
        Case {
            name: "no content type",
            content_type: None,
            send: Send::Whole(br#"{"deviceId":"d","ts":1,"latitude":0,"longitude":0}"#.to_vec()),
            expect: 415,
        },
        Case {
            name: "100 MB body",
            content_type: Some("application/json"),
            send: Send::Huge {
                declared: 100 * 1024 * 1024,
                sent: 1024 * 1024,
            },
            expect: 413,
        },
        Case {
            name: "body sent very slowly",
            content_type: Some("application/json"),
            send: Send::Slow {
                len: 64,
                every: Duration::from_millis(200),
            },
            expect: 408,
        },
    ]
}

/// Sends one case to `path` and returns the status and how long the answer took.
pub async fn send(addr: SocketAddr, path: &str, case: &Case) -> (u16, Duration, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let len = match &case.send {
        Send::Whole(b) => b.len(),
        Send::Huge { declared, .. } => *declared,
        Send::Slow { len, .. } => *len,
    };
    let mut head =
        format!("POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {len}\r\nConnection: close\r\n");
    if let Some(ct) = case.content_type {
        head.push_str(&format!("Content-Type: {ct}\r\n"));
    }
    head.push_str("\r\n");
    let start = Instant::now();
    stream.write_all(head.as_bytes()).await.expect("write head");
    let (mut reader, mut writer) = stream.into_split();
    let body = case.send.clone();
    let writing = tokio::spawn(async move {
        match body {
            Send::Whole(b) => {
                let _ = writer.write_all(&b).await;
            }
            Send::Huge { sent, .. } => {
                let chunk = vec![b' '; 64 * 1024];
                let mut done = 0;
                while done < sent {
                    if writer.write_all(&chunk).await.is_err() {
                        break;
                    }
                    done += chunk.len();
                }
            }
            Send::Slow { len, every } => {
                for _ in 0..len {
                    if writer.write_all(b" ").await.is_err() {
                        break;
                    }
                    tokio::time::sleep(every).await;
                }
            }
        }
        writer
    });
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let status = loop {
        let n = tokio::time::timeout(Duration::from_secs(30), reader.read(&mut chunk))
            .await
            .unwrap_or_else(|_| panic!("{}: no answer within 30 s", case.name))
            .unwrap_or(0);
        if n == 0 {
            break None;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        if let Some(end) = text.find("\r\n\r\n") {
            let headers = &text[..end];
            let cl = headers.lines().find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
            });
            if cl.is_none_or(|cl| buf.len() >= end + 4 + cl) {
                break text.split_whitespace().nth(1).and_then(|s| s.parse::<u16>().ok());
            }
        }
    };
    let elapsed = start.elapsed();
    writing.abort();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status =
        status.unwrap_or_else(|| panic!("{}: connection closed without an answer: {text:?}", case.name));
    (status, elapsed, text)
}

/// Sends every case; each must get its status, with a JSON error body, within `bound`.
pub async fn run_all(addr: SocketAddr, path: &str, bound: Duration) {
    for case in cases() {
        let (status, elapsed, text) = send(addr, path, &case).await;
        assert_eq!(
            status, case.expect,
            "{}: got {status}, answer {text:.300}",
            case.name
        );
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
        let json: serde_json::Value = serde_json::from_str(body)
            .unwrap_or_else(|_| panic!("{}: body is not JSON: {body:.200}", case.name));
        assert!(
            json["error"].is_string() && json["message"].is_string(),
            "{}: error body {json}",
            case.name
        );
        assert!(elapsed < bound, "{}: answered after {elapsed:?}", case.name);
        eprintln!(
            "hostile {path} {}: {status} in {} ms",
            case.name,
            elapsed.as_millis()
        );
    }
}

/// Posts `n` valid events (`deviceId` "steady", ts 0..n) one after another while the hostile
/// cases run, each of which must get `expect`.
pub fn valid_traffic(base: String, n: i64, expect: u16) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for ts in 0..n {
            let body = format!(r#"{{"deviceId":"steady","ts":{ts},"latitude":1.0,"longitude":2.0}}"#);
            let addr: SocketAddr = base
                .trim_start_matches("http://")
                .parse()
                .expect("base is http://ip:port");
            let case = Case {
                name: "valid event",
                content_type: Some("application/json"),
                send: Send::Whole(body.into_bytes()),
                expect,
            };
            let (status, _, text) = send(addr, "/event", &case).await;
            assert_eq!(status, expect, "valid event {ts}: {text:.200}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
}

/// Every case against `/event` and `/events/batch` of the service at `addr`, each answered
/// within 5 s, while `n` valid events go to `/event` alongside, each answered `valid_status`.
pub async fn run_all_beside_valid_traffic(addr: SocketAddr, n: i64, valid_status: u16) {
    let valid = valid_traffic(format!("http://{addr}"), n, valid_status);
    run_all(addr, "/event", Duration::from_secs(5)).await;
    run_all(addr, "/events/batch", Duration::from_secs(5)).await;
    valid.await.expect("the valid traffic ran to its end");
}

/// Events each missing a field or carrying one of the wrong type, with the field at fault: the
/// answer must name it.
pub fn events_with_a_bad_field() -> Vec<(serde_json::Value, &'static str)> {
    use serde_json::json;
    vec![
        (json!({"ts": 1, "latitude": 0, "longitude": 0}), "deviceId"),
        (json!({"deviceId": "d", "latitude": 0, "longitude": 0}), "ts"),
        (
            json!({"deviceId": 7, "ts": 1, "latitude": 0, "longitude": 0}),
            "deviceId",
        ),
        (
            json!({"deviceId": "d", "ts": "now", "latitude": 0, "longitude": 0}),
            "ts",
        ),
        (
            json!({"deviceId": "d", "ts": 1, "latitude": "north", "longitude": 0}),
            "latitude",
        ),
        (
            json!({"deviceId": "d", "ts": 1, "latitude": 0, "longitude": []}),
            "longitude",
        ),
    ]
}
