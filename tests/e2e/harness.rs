//! The harness itself: clusters start with SCRAM auth and refuse wrong passwords.

use silo_tests::pg::TestCluster;
use sqlx::ConnectOptions;

#[tokio::test(flavor = "multi_thread")]
async fn cluster_requires_the_password() {
    let pg = TestCluster::start().await.unwrap();
    let mut conn = pg.admin_options("postgres").connect().await.unwrap();
    let method: String = sqlx::query_scalar("SELECT current_setting('password_encryption')")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(method, "scram-sha-256");
    let wrong = pg.admin_options("postgres").password("wrong");
    let err = wrong.connect().await.unwrap_err().to_string();
    assert!(err.contains("password authentication failed"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn stopped_cluster_leaves_no_server() {
    let pg = TestCluster::start().await.unwrap();
    let port = pg.port();
    pg.stop();
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    pg.restart().await.unwrap();
    pg.admin_options("postgres").connect().await.unwrap();
}
