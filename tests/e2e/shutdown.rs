//! SIGTERM to the real `silo-router` binary: a request in flight completes, new connections
//! are refused, and the process exits 0 within its shutdown deadline.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use secrecy::ExposeSecret;
use silo_tests::stack::{Stack, StackOptions};
use silo_tests::unique_name;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_in_flight_requests_finish_and_exits_in_time() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let slug = unique_name("term");
    let key = stack.create_tenant(&slug).await.unwrap();

    let mut router = Command::new(silo_tests::workspace_binary("silo-router"))
        .arg("--config")
        .arg(stack.dir().join("silo.toml"))
        .env("SILO_CATALOG_PASSWORD", stack.pg().password().expose_secret())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Read stdout to the end on its own thread: the router still prints while it stops, and
    // a closed pipe would make that fail.
    let stdout = router.stdout.take().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(addr) = line.strip_prefix("router listening on http://") {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(addr.trim().to_owned());
                }
            }
        }
    });
    let addr = rx.await.expect("the router never said where it listens");

    // A request whose body is still arriving when SIGTERM comes.
    let body = r#"{"title":"written during shutdown"}"#;
    let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /api/v1/tasks HTTP/1.1\r\nHost: {slug}.localhost\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(&body.as_bytes()[..10]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let term_at = Instant::now();
    kill(Pid::from_raw(router.id() as i32), Signal::SIGTERM).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        tokio::net::TcpStream::connect(&addr).await.is_err(),
        "no new connections once shutdown started"
    );
    conn.write_all(&body.as_bytes()[10..]).await.unwrap();
    let mut response = String::new();
    conn.read_to_string(&mut response).await.unwrap();
    assert!(
        response.starts_with("HTTP/1.1 201"),
        "the in-flight request completed: {response}"
    );
    assert!(response.contains("written during shutdown"), "{response}");

    let deadline = term_at + Duration::from_secs(12);
    let status = loop {
        if let Some(status) = router.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the router did not exit within its shutdown deadline"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit status {status}");
    stack.stop().await.unwrap();
}
