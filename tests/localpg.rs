//! The throwaway cluster harness itself: it must start a logical-replication-ready server on
//! loopback and leave nothing behind.

mod common;

use walshift::localpg::{Cluster, ClusterOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_starts_ready_for_logical_replication_and_cleans_up() {
    let cluster = Cluster::start(ClusterOptions::default().setting("work_mem", "'8MB'")).unwrap();
    let client = cluster.connect("postgres").await.unwrap();
    let row = client.query_one("SHOW wal_level", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "logical");
    let row = client.query_one("SHOW work_mem", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "8MB");
    let row = client
        .query_one("SELECT inet_server_addr()::text", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "127.0.0.1/32");
    cluster.create_database("shop").await.unwrap();
    cluster
        .execute(
            "shop",
            "CREATE TABLE t(id int primary key); INSERT INTO t VALUES (1)",
        )
        .await
        .unwrap();

    let dir = cluster.data_dir();
    let port = cluster.port();
    assert!(dir.join("PG_VERSION").is_file());
    drop(client);
    drop(cluster);
    assert!(
        !dir.exists(),
        "cluster directory {} must be removed",
        dir.display()
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "server must be stopped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clusters_run_side_by_side() {
    let (a, b) = common::pair::clusters();
    assert_ne!(a.port(), b.port());
    a.execute("postgres", "CREATE TABLE only_in_a(x int)")
        .await
        .unwrap();
    let err = b
        .execute("postgres", "SELECT * FROM only_in_a")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("only_in_a"), "{err}");
}

#[test]
fn cluster_is_stopped_when_a_test_panics() {
    let dir = std::sync::Arc::new(std::sync::Mutex::new(None));
    let d2 = dir.clone();
    let res = std::panic::catch_unwind(move || {
        let c = common::cluster();
        *d2.lock().unwrap() = Some(c.data_dir());
        panic!("test failure while a cluster is up");
    });
    assert!(res.is_err());
    let d = dir.lock().unwrap().clone().unwrap();
    assert!(
        !d.exists(),
        "cluster directory must be removed after a panic"
    );
}
