//! Opening a PostgreSQL connection without slowing the tokio workers down.
//!
//! sqlx's SCRAM-SHA-256 client yields to the scheduler every 5 PBKDF2 iterations: 819 times
//! per login with PostgreSQL's 4096. On a worker of a multi-thread runtime every yield is a
//! pass through the scheduler (a zero-timeout poll of the I/O driver, often a wake-up of
//! another worker): a connect took ~1 ms longer there than on a thread of its own on an idle
//! 2-core machine, and ~3 ms longer in a router serving requests (docs/BENCHMARKS.md,
//! "Where a connection's time goes"). So [`connect`] runs it on a blocking-pool thread under
//! [`Handle::block_on`], where a yield costs nothing. The socket is still registered with the
//! runtime's I/O driver, so the connection is then used from the workers like any other.

use std::io;
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, PgConnection};
use tokio::runtime::{Handle, RuntimeFlavor};

/// A new connection with `options`, given up after `timeout` (the blocking thread stops
/// waiting too: nothing is left running after a timeout).
pub async fn connect(options: &PgConnectOptions, timeout: Duration) -> Result<PgConnection, sqlx::Error> {
    let handle = Handle::current();
    // A current-thread runtime has no other worker to wake, and only its own thread drives
    // the I/O a blocking thread would wait for.
    if handle.runtime_flavor() == RuntimeFlavor::CurrentThread {
        return bounded(options.clone(), timeout).await;
    }
    let options = options.clone();
    tokio::task::spawn_blocking(move || handle.block_on(bounded(options, timeout)))
        .await
        .map_err(|error| sqlx::Error::Io(io::Error::other(format!("the connect task ended: {error}"))))?
}

async fn bounded(options: PgConnectOptions, timeout: Duration) -> Result<PgConnection, sqlx::Error> {
    match tokio::time::timeout(timeout, options.connect()).await {
        Ok(connected) => connected,
        Err(_) => Err(sqlx::Error::Io(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connecting took longer than {timeout:?}"),
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nothing listens on the port: the error comes back on either kind of runtime.
    fn refused_options() -> PgConnectOptions {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free port")
            .port();
        PgConnectOptions::new_without_pgpass()
            .host("127.0.0.1")
            .port(port)
            .username("nobody")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_connect_is_an_error_on_a_multi_thread_runtime() {
        let error = connect(&refused_options(), Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(error, sqlx::Error::Io(_)), "{error:?}");
    }

    #[tokio::test]
    async fn a_refused_connect_is_an_error_on_a_current_thread_runtime() {
        let error = connect(&refused_options(), Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(error, sqlx::Error::Io(_)), "{error:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connect_that_gets_no_answer_times_out() {
        // A listener that accepts but never answers the startup message.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let silent = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let options = PgConnectOptions::new_without_pgpass()
            .host("127.0.0.1")
            .port(port)
            .username("nobody")
            .ssl_mode(sqlx::postgres::PgSslMode::Disable);
        let started = std::time::Instant::now();
        let error = connect(&options, Duration::from_millis(300)).await.unwrap_err();
        assert!(
            matches!(&error, sqlx::Error::Io(e) if e.kind() == io::ErrorKind::TimedOut),
            "{error:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
        silent.abort();
    }
}
