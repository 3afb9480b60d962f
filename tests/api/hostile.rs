//! Hostile and broken clients, spoken to over raw TCP: bodies that lie, callbacks with wrong
//! tokens and huge bodies, connections that never finish their headers or never leave.

use crate::backend_tests;
use crate::support::*;
use falgate::emulator::EmulatorConfig;
use serde_json::Value;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};

/// An HTTP/1.1 response as read off the wire.
struct RawResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl std::fmt::Debug for RawResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {:?} {}",
            self.status,
            self.headers,
            String::from_utf8_lossy(&self.body)
        )
    }
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The problem document of an error response, with its envelope checked.
    fn problem(&self, status: u16, code: &str) -> Value {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json"),
            "{self:?}"
        );
        let body: Value = serde_json::from_slice(&self.body).expect("a JSON problem");
        assert_eq!(body["code"], code, "{body}");
        assert_eq!(body["status"], status);
        body
    }
}

/// Reads one response: the head, then a `Content-Length` body (or everything up to EOF).
async fn read_response(stream: &mut (impl AsyncRead + Unpin)) -> std::io::Result<RawResponse> {
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "closed before a full response head: {:?}",
                    String::from_utf8_lossy(&buf)
                ),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .expect("a status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_owned(), value.trim().to_owned()))
        .collect();
    let mut body = buf[head_end..].to_vec();
    let length = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse::<usize>().ok());
    let bodiless = (100..200).contains(&status) || status == 204 || status == 304;
    match length {
        _ if bodiless => body.clear(),
        Some(length) => {
            while body.len() < length {
                let mut chunk = [0u8; 4096];
                let n = stream.read(&mut chunk).await?;
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
            body.truncate(length);
        }
        None => {
            stream.read_to_end(&mut body).await?;
        }
    }
    Ok(RawResponse {
        status,
        headers,
        body,
    })
}

/// Sends `request` on a new connection and reads the answer, within a few seconds.
async fn exchange(addr: SocketAddr, request: &[u8]) -> RawResponse {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("send");
    timeout(Duration::from_secs(10), read_response(&mut stream))
        .await
        .expect("an answer within 10 s")
        .expect("a response")
}

/// A GET on a new connection that asks to be closed after the answer.
async fn get(addr: SocketAddr, path: &str, key: Option<&str>) -> RawResponse {
    let auth = key
        .map(|key| format!("Authorization: Bearer {key}\r\n"))
        .unwrap_or_default();
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: falgate\r\n{auth}Connection: close\r\n\r\n");
    exchange(addr, request.as_bytes()).await
}

/// A GET at the connection cap, as a client there makes it. While newcomers keep arriving, a
/// connection accepted a moment ago can itself be the one closed to make room before its request
/// was read (it is reset); the client connects again, as clients do when a kept-alive or fresh
/// connection is closed under them.
async fn get_at_cap(addr: SocketAddr, path: &str, key: Option<&str>) -> RawResponse {
    let auth = key
        .map(|key| format!("Authorization: Bearer {key}\r\n"))
        .unwrap_or_default();
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: falgate\r\n{auth}Connection: close\r\n\r\n");
    eventually(format_args!("{path} to answer at the cap"))
        // No pause between tries: each exchange paces the next.
        .every(Duration::ZERO)
        .or_last(async || {
            let mut stream = TcpStream::connect(addr).await.expect("connect");
            stream.write_all(request.as_bytes()).await?;
            timeout(Duration::from_secs(10), read_response(&mut stream))
                .await
                .expect("an answer within 10 s")
        })
        .await
        .unwrap_or_else(|err| panic!("{path} never answered at the cap: {err}"))
}

/// Waits until the server closes `stream` (EOF or reset), answering how long that took, or
/// `None` if it is still open after `patience`. Whatever the server sends first is discarded.
async fn closed_by_server(stream: &mut TcpStream, patience: Duration) -> Option<Duration> {
    let started = Instant::now();
    let drained = timeout(patience, async {
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    drained.ok().map(|()| started.elapsed())
}

// A chunk-size line that is not hexadecimal is a broken request, not a large one.
backend_tests!(malformed_chunked_body_is_a_bad_request);
async fn malformed_chunked_body_is_a_bad_request(app: &TestApp) {
    let request = format!(
        "POST /v1/jobs HTTP/1.1\r\nHost: falgate\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n\
         zz\r\n{{}}\r\n0\r\n\r\n",
        app.key
    );
    let response = exchange(app.app.local_addr(), request.as_bytes()).await;
    let problem = response.problem(400, "bad_request");
    assert!(
        problem["detail"].as_str().unwrap().contains("body"),
        "{problem}"
    );
    // Nothing was stored.
    let list = app.get_json("/v1/jobs").await;
    assert_eq!(list["items"].as_array().unwrap().len(), 0);
}

const HUGE_CALLBACK: usize = 31 << 20;

fn callback_head(job: uuid::Uuid, token: &str, length: usize) -> String {
    format!(
        "POST /v1/fal/webhook/{job}?token={token} HTTP/1.1\r\nHost: falgate\r\n\
         Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    )
}

// The token is in the URL, so a caller without it is turned away before its body is read:
// here the body is never even sent.
backend_tests!(callback_with_wrong_token_is_refused_before_its_body);
async fn callback_with_wrong_token_is_refused_before_its_body(app: &TestApp) {
    let mut stream = TcpStream::connect(app.app.local_addr()).await.unwrap();
    let head = callback_head(uuid::Uuid::now_v7(), "not-our-token", HUGE_CALLBACK);
    stream.write_all(head.as_bytes()).await.unwrap();
    let response = timeout(Duration::from_secs(5), read_response(&mut stream))
        .await
        .expect("answered without waiting for the body")
        .expect("a response");
    response.problem(401, "unauthorized");
}

/// A `falgate serve` process, killed when dropped.
struct Spawned {
    child: tokio::process::Child,
    addr: SocketAddr,
}

impl Spawned {
    /// Starts the binary through `sh` (so that `shell_prefix` can set limits first), pointed at
    /// `fal`, and waits until it serves.
    async fn start(
        database_url: &str,
        fal: &falgate::emulator::EmulatorHandle,
        shell_prefix: &str,
        env: &[(&str, &str)],
    ) -> Self {
        let port = free_port();
        let mut command = tokio::process::Command::new("sh");
        command
            .arg("-c")
            .arg(format!("{shell_prefix} exec \"$0\" serve"))
            .arg(env!("CARGO_BIN_EXE_falgate"))
            .envs(spawned_server_env(database_url, fal, port))
            .kill_on_drop(true);
        for (name, value) in env {
            command.env(name, value);
        }
        let child = command.spawn().expect("start falgate");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        eventually("falgate to start")
            .every(Duration::from_millis(25))
            .until(async || {
                let mut stream = timeout(Duration::from_secs(1), TcpStream::connect(addr))
                    .await
                    .ok()?
                    .ok()?;
                let probe = b"GET /healthz HTTP/1.1\r\nHost: falgate\r\nConnection: close\r\n\r\n";
                stream.write_all(probe).await.ok()?;
                let response = timeout(Duration::from_secs(2), read_response(&mut stream))
                    .await
                    .ok()?
                    .ok()?;
                (response.status == 200).then_some(())
            })
            .await;
        Self { child, addr }
    }

    /// A line of `/proc/<pid>/status`, in KiB.
    fn memory_kib(&self, field: &str) -> u64 {
        let pid = self.child.id().expect("running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
        status
            .lines()
            .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in {status}"))
    }

    async fn stop(mut self) {
        self.child.kill().await.ok();
    }
}

/// Runs `test` against a spawned server with its own database and emulator, handing it the
/// server's address and an API key.
async fn with_spawned<F, Fut>(backend: Backend, shell_prefix: &str, env: &[(&str, &str)], test: F)
where
    F: FnOnce(SocketAddr, String, Spawned) -> Fut,
    Fut: std::future::Future<Output = Spawned>,
{
    falgate::install_crypto_provider();
    let Some(database) = TestDatabase::create(backend).await else {
        return;
    };
    let fal = falgate::emulator::spawn(
        EmulatorConfig::fast(),
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
    )
    .await;
    let server = Spawned::start(&database.url, &fal, shell_prefix, env).await;
    let key = {
        let store = bare_store(&database).await;
        let (_, key) = store.issue_api_key("hostile").await.expect("issue a key");
        store.close().await;
        key.secret
    };
    let outcome = futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(test(
        server.addr,
        key,
        server,
    )))
    .await;
    fal.shutdown().await;
    database.drop_database().await;
    match outcome {
        Ok(server) => server.stop().await,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// One caller with a wrong token pushing a 31 MiB body; answers the status it was given, if
/// any reached it before the server hung up.
async fn hostile_callback(addr: SocketAddr) -> Option<u16> {
    let stream = TcpStream::connect(addr).await.ok()?;
    let (mut reader, mut writer) = stream.into_split();
    let head = callback_head(uuid::Uuid::now_v7(), "forged", HUGE_CALLBACK);
    let push = tokio::spawn(async move {
        writer.write_all(head.as_bytes()).await?;
        let chunk = vec![b' '; 256 * 1024];
        let mut sent = 0;
        while sent < HUGE_CALLBACK {
            writer.write_all(&chunk).await?;
            sent += chunk.len();
        }
        std::io::Result::Ok(())
    });
    let answer = timeout(Duration::from_secs(30), read_response(&mut reader))
        .await
        .ok()
        .and_then(Result::ok)
        .map(|response| response.status);
    push.abort();
    answer
}

/// 32 callers with a wrong token and a 31 MiB body each, all at once: none of them gets the
/// process to hold their bodies.
async fn wrong_token_callbacks_keep_memory_bounded(backend: Backend) {
    with_spawned(backend, "", &[], |addr, _key, server| async move {
        let callers: Vec<_> = (0..32)
            .map(|_| tokio::spawn(hostile_callback(addr)))
            .collect();
        let mut refused = 0;
        for caller in callers {
            if caller.await.unwrap() == Some(401) {
                refused += 1;
            }
        }
        let peak_kib = server.memory_kib("VmHWM");
        let now_kib = server.memory_kib("VmRSS");
        assert!(
            peak_kib <= 80 * 1024,
            "peak RSS {} MiB (now {} MiB) under 32 wrong-token callbacks of 31 MiB",
            peak_kib / 1024,
            now_kib / 1024
        );
        assert_eq!(refused, 32, "every caller is told 401");
        // And the service still answers.
        assert_eq!(get(addr, "/healthz", None).await.status, 200);
        server
    })
    .await;
}

backend_tests!(wrong_token_callbacks_keep_memory_bounded(Backend));

/// Opens a connection and makes one kept-alive request on it, which must answer 200.
async fn kept_alive(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: falgate\r\n\r\n")
        .await
        .expect("send");
    let response = timeout(Duration::from_secs(10), read_response(&mut stream))
        .await
        .expect("an answer")
        .expect("a response");
    assert_eq!(response.status, 200, "{response:?}");
    stream
}

// A client that starts a request and never finishes its head is cut off after the header
// timeout, even while it keeps trickling bytes, and so is one that connects and sends nothing.
backend_tests!(slow_request_heads_are_cut_off, |config| {
    config.connections.header_timeout = Duration::from_secs(1);
    config.connections.idle_timeout = Duration::from_secs(60);
});
async fn slow_request_heads_are_cut_off(app: &TestApp) {
    let addr = app.app.local_addr();
    let mut trickling = TcpStream::connect(addr).await.unwrap();
    let started = Instant::now();
    let head =
        b"GET /healthz HTTP/1.1\r\nHost: falgate\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let mut ticks = tokio::time::interval(Duration::from_millis(100));
    let mut cut_off = false;
    for byte in head.iter().cycle().take(200) {
        ticks.tick().await;
        if trickling.write_all(&[*byte]).await.is_err() {
            cut_off = true;
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "a trickled head was never cut off"
        );
    }
    if !cut_off {
        // The server's close may only show on a read.
        assert!(
            closed_by_server(&mut trickling, Duration::from_secs(5))
                .await
                .is_some(),
            "a trickled head was never cut off"
        );
    }
    let lasted = started.elapsed();
    assert!(
        lasted >= Duration::from_millis(900) && lasted < Duration::from_secs(10),
        "cut off after {lasted:?}"
    );

    let mut silent = TcpStream::connect(addr).await.unwrap();
    let lasted = closed_by_server(&mut silent, Duration::from_secs(10))
        .await
        .expect("a silent connection is closed");
    assert!(
        lasted >= Duration::from_millis(900),
        "closed after {lasted:?}"
    );

    // Others are served all along.
    assert_eq!(get(addr, "/healthz", None).await.status, 200);
}

// A kept-alive connection serves several requests, then is closed once it has waited for the
// next one longer than the idle timeout.
backend_tests!(idle_kept_alive_connections_are_closed, |config| {
    config.connections.header_timeout = Duration::from_secs(60);
    config.connections.idle_timeout = Duration::from_secs(1);
});
async fn idle_kept_alive_connections_are_closed(app: &TestApp) {
    let addr = app.app.local_addr();
    let mut stream = kept_alive(addr).await;
    stream
        .write_all(b"GET /readyz HTTP/1.1\r\nHost: falgate\r\n\r\n")
        .await
        .unwrap();
    let second = timeout(Duration::from_secs(10), read_response(&mut stream))
        .await
        .expect("an answer")
        .expect("the connection is kept alive");
    assert_eq!(second.status, 200, "{second:?}");
    let lasted = closed_by_server(&mut stream, Duration::from_secs(10))
        .await
        .expect("an idle connection is closed");
    assert!(
        lasted >= Duration::from_millis(900),
        "closed after {lasted:?}"
    );
}

// With every connection under the cap idle, a newcomer is served in full (the API, not only
// the probes), and the connection idle the longest makes room for it.
backend_tests!(
    at_the_connection_cap_the_longest_idle_connection_makes_room,
    |config| {
        config.connections.max_connections = 4;
        config.connections.header_timeout = Duration::from_secs(60);
        config.connections.idle_timeout = Duration::from_secs(60);
    }
);
async fn at_the_connection_cap_the_longest_idle_connection_makes_room(app: &TestApp) {
    let addr = app.app.local_addr();
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(kept_alive(addr).await);
    }
    let _newcomer = kept_alive(addr).await;
    assert!(
        closed_by_server(&mut idle[0], Duration::from_secs(5))
            .await
            .is_some(),
        "the longest idle connection made room"
    );
    let jobs = get(addr, "/v1/jobs", Some(&app.key)).await;
    assert_eq!(jobs.status, 200, "{jobs:?}");
    assert!(
        closed_by_server(&mut idle[1], Duration::from_secs(5))
            .await
            .is_some(),
        "the next longest idle connection made room"
    );
    // The most recent ones are still open and usable.
    let last = idle.last_mut().unwrap();
    last.write_all(b"GET /healthz HTTP/1.1\r\nHost: falgate\r\n\r\n")
        .await
        .unwrap();
    let response = timeout(Duration::from_secs(10), read_response(last))
        .await
        .expect("an answer")
        .expect("still open");
    assert_eq!(response.status, 200);
}

/// Starts a request whose body never comes, and returns once the server is reading it (it
/// answers `Expect: 100-continue`): a connection whose request is still on its way counts as
/// idle, and may be closed to make room.
async fn request_in_flight(addr: SocketAddr, key: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "POST /v1/jobs HTTP/1.1\r\nHost: falgate\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\nExpect: 100-continue\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.expect("send");
    let expected = b"HTTP/1.1 100 Continue\r\n\r\n";
    let mut interim = vec![0; expected.len()];
    timeout(PATIENCE, stream.read_exact(&mut interim))
        .await
        .expect("the server to read the body within the patience")
        .expect("100 Continue");
    assert_eq!(interim, expected, "{}", String::from_utf8_lossy(&interim));
    stream
}

/// Starts a request whose body never comes, so that it stays in flight.
async fn stuck_request(addr: SocketAddr, key: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "POST /v1/jobs HTTP/1.1\r\nHost: falgate\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{"
    );
    stream.write_all(head.as_bytes()).await.expect("send");
    stream
}

// With every connection under the cap busy, the health probes still answer, the rest of the
// API says 503 with a problem document, and once connections free up the API answers again.
backend_tests!(
    at_the_connection_cap_with_every_connection_busy_healthz_still_answers,
    |config| {
        config.connections.max_connections = 3;
        config.connections.header_timeout = Duration::from_secs(60);
        config.connections.idle_timeout = Duration::from_secs(60);
    }
);
async fn at_the_connection_cap_with_every_connection_busy_healthz_still_answers(app: &TestApp) {
    let addr = app.app.local_addr();
    let mut busy = Vec::new();
    for _ in 0..3 {
        busy.push(request_in_flight(addr, &app.key).await);
    }
    let refused = eventually("the cap to hold")
        // No pause between tries: each exchange paces the next.
        .every(Duration::ZERO)
        .until(async || {
            let response = get(addr, "/v1/jobs", Some(&app.key)).await;
            if response.status != 503 {
                assert_eq!(response.status, 200, "{response:?}");
            }
            (response.status == 503).then_some(response)
        })
        .await;
    refused.problem(503, "service_unavailable");
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert_eq!(get(addr, "/healthz", None).await.status, 200);
    assert_eq!(get(addr, "/readyz", None).await.status, 200);

    drop(busy);
    eventually("the API to answer again")
        // No pause between tries: each exchange paces the next.
        .every(Duration::ZERO)
        .until(async || {
            let response = get(addr, "/v1/jobs", Some(&app.key)).await;
            if response.status != 200 {
                assert_eq!(response.status, 503, "{response:?}");
            }
            (response.status == 200).then_some(())
        })
        .await;
}

/// 300 connections that send nothing, to a process allowed 256 open files: the cap fitted
/// to that limit keeps it answering.
async fn idle_connections_beyond_the_open_files_limit(backend: Backend) {
    let env = [
        ("FALGATE_HEADER_TIMEOUT_SECS", "600"),
        ("FALGATE_IDLE_TIMEOUT_SECS", "600"),
    ];
    with_spawned(
        backend,
        "ulimit -S -n 256 &&",
        &env,
        |addr, key, server| async move {
            let mut idle = Vec::new();
            for _ in 0..300 {
                idle.push(TcpStream::connect(addr).await.expect("connect"));
            }
            assert_eq!(get_at_cap(addr, "/healthz", None).await.status, 200);
            let jobs = get_at_cap(addr, "/v1/jobs", Some(&key)).await;
            assert_eq!(jobs.status, 200, "{jobs:?}");
            drop(idle);
            server
        },
    )
    .await;
}

backend_tests!(idle_connections_beyond_the_open_files_limit(Backend));

/// Shutting down closes idle connections at once but lets a request in flight finish.
async fn shutdown_lets_the_request_in_flight_finish(backend: Backend) {
    falgate::install_crypto_provider();
    let Some(database) = TestDatabase::create(backend).await else {
        return;
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut config = config_for(&database.url);
    config.run_workers = false;
    let storage_dir = config.avatars.storage_dir.clone();
    let app = falgate::app::App::build(config, listener).await.unwrap();
    let addr = app.local_addr();
    let (_, key) = app.store().issue_api_key("shutdown").await.unwrap();

    let mut idle = kept_alive(addr).await;
    // `Expect: 100-continue` makes the server say when the handler starts reading the body:
    // from then on the request is in flight.
    let body =
        br#"{"endpoint": "fal-ai/flux-lora", "input": {"prompt": "finished after the signal"}}"#;
    let mut in_flight = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/jobs HTTP/1.1\r\nHost: falgate\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        key.secret,
        body.len()
    );
    in_flight.write_all(head.as_bytes()).await.unwrap();
    let go_on = timeout(Duration::from_secs(10), read_response(&mut in_flight))
        .await
        .expect("an interim answer")
        .expect("100 Continue");
    assert_eq!(go_on.status, 100, "{go_on:?}");

    let shutting_down = tokio::spawn(app.shutdown());
    assert!(
        closed_by_server(&mut idle, Duration::from_secs(10))
            .await
            .is_some(),
        "an idle connection is closed on shutdown"
    );
    assert!(
        !shutting_down.is_finished(),
        "shutdown waits for the request"
    );
    in_flight.write_all(body).await.unwrap();
    let created = timeout(Duration::from_secs(10), read_response(&mut in_flight))
        .await
        .expect("an answer")
        .expect("the response");
    assert_eq!(created.status, 202, "{created:?}");
    timeout(Duration::from_secs(10), shutting_down)
        .await
        .expect("shutdown ends once the request is answered")
        .unwrap();
    assert!(TcpStream::connect(addr).await.is_err());
    database.drop_database().await;
    let _ = std::fs::remove_dir_all(storage_dir);
}

backend_tests!(shutdown_lets_the_request_in_flight_finish(Backend));

// Callbacks have their own body limit, neither the JSON one nor the uploads' one: under it a
// body is read and judged by its signature, over it the answer is a 413 and nothing is kept.
backend_tests!(callback_bodies_have_their_own_limit, |config| {
    config.run_workers = false;
    config.body_limit = 2048;
    config.callback_body_limit = 64 * 1024;
});
async fn callback_bodies_have_their_own_limit(app: &TestApp) {
    let job = app.create_job(&app.key, "limits").await;
    let id: uuid::Uuid = job["id"].as_str().unwrap().parse().unwrap();
    let url = app.app.state().callback_url(id).expect("a callback URL");
    let send = |size: usize| {
        let (client, url) = (app.client.clone(), url.clone());
        async move {
            let body = format!("{{\"pad\": \"{}\"}}", "x".repeat(size));
            client
                .post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap()
        }
    };
    problem(
        send(100 * 1024).await,
        reqwest::StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    )
    .await;
    assert!(app.store().list_callbacks(id).await.unwrap().is_empty());
    // Larger than a JSON body may be, yet read: refused for its missing signature, and kept.
    problem(
        send(48 * 1024).await,
        reqwest::StatusCode::UNAUTHORIZED,
        "unauthorized",
    )
    .await;
    assert_eq!(app.store().list_callbacks(id).await.unwrap().len(), 1);
}

/// Three uploads of 40 MiB each at once: the process streams them to disk and holds a small
/// part at most.
async fn concurrent_large_uploads_are_not_held_in_memory(backend: Backend) {
    let env = [("FALGATE_MAX_UPLOAD_BYTES", "67108864")];
    with_spawned(backend, "", &env, |addr, key, server| async move {
        let base = format!("http://{addr}");
        let client = reqwest::Client::new();
        let avatar: serde_json::Value = client
            .post(format!("{base}/v1/avatars"))
            .bearer_auth(&key)
            .json(&serde_json::json!({"name": "Ada", "kind": "character"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let path = format!(
            "{base}/v1/avatars/{}/photos",
            avatar["id"].as_str().unwrap()
        );
        // Two files of nearly 20 MiB each (the largest size) per upload, in 64 KiB chunks
        // shared between them, so that the client holds little of it either.
        let size = (20 << 20) - 4096;
        let send = |n: u8| {
            let boundary = new_boundary();
            let chunk = bytes::Bytes::from(vec![n; 64 << 10]);
            let mut pieces: Vec<bytes::Bytes> = Vec::new();
            for file in 0..2 {
                let head = part_head(&boundary, &format!("big-{n}-{file}.bin"));
                pieces.push(head.into());
                for _ in 0..size / chunk.len() {
                    pieces.push(chunk.clone());
                }
                pieces.push(bytes::Bytes::from(vec![n; size % chunk.len()]));
                pieces.push(bytes::Bytes::from_static(b"\r\n"));
            }
            pieces.push(format!("--{boundary}--\r\n").into_bytes().into());
            client
                .post(&path)
                .bearer_auth(&key)
                .header("content-type", multipart_content_type(&boundary))
                .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
                    pieces.into_iter().map(Ok::<_, std::io::Error>),
                )))
                .send()
        };
        let before_kib = server.memory_kib("VmHWM");
        let answers = futures_util::future::join_all([send(1), send(2), send(3)]).await;
        for answer in answers {
            // Each file is refused for what it is; the point is what the process held.
            assert_eq!(answer.unwrap().status(), 422);
        }
        let grew_kib = server.memory_kib("VmHWM").saturating_sub(before_kib);
        assert!(
            grew_kib < 48 * 1024,
            "peak RSS grew by {} MiB while 120 MiB were uploaded",
            grew_kib / 1024
        );
        server
    })
    .await;
}

backend_tests!(concurrent_large_uploads_are_not_held_in_memory(Backend));

// A request whose body stops coming is answered 400 once its client has been silent for the
// idle timeout, instead of holding its connection for good; nothing is stored.
backend_tests!(
    a_request_whose_body_stalls_is_answered_and_its_connection_freed,
    |config| {
        config.connections.header_timeout = Duration::from_secs(60);
        config.connections.idle_timeout = Duration::from_secs(1);
    }
);
async fn a_request_whose_body_stalls_is_answered_and_its_connection_freed(app: &TestApp) {
    let addr = app.app.local_addr();
    let mut stream = stuck_request(addr, &app.key).await;
    let started = Instant::now();
    let response = timeout(Duration::from_secs(10), read_response(&mut stream))
        .await
        .expect("an answer within the idle timeout")
        .expect("a response");
    assert!(started.elapsed() >= Duration::from_millis(900));
    let problem = response.problem(400, "bad_request");
    assert!(
        problem["detail"].as_str().unwrap().contains("stalled"),
        "{problem}"
    );
    let jobs = get(addr, "/v1/jobs", Some(&app.key)).await;
    assert_eq!(jobs.status, 200);
    let page: Value = serde_json::from_slice(&jobs.body).unwrap();
    assert!(page["items"].as_array().unwrap().is_empty(), "{page}");
}
