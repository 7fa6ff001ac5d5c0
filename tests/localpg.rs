//! The throwaway cluster harness itself: it must start a logical-replication-ready server on
//! loopback and leave nothing behind. Likewise the PgBouncer put in front of clusters
//! (`localpg::pgbouncer`, a real PgBouncer): pooling, its admin console, RELOAD onto another
//! cluster, PAUSE/RESUME.

mod common;

use std::time::Duration;

use tokio_postgres::{Client, NoTls, SimpleQueryMessage, SimpleQueryRow};
use walshift::localpg::{Cluster, ClusterOptions, PgBouncer, PoolerOptions};

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

async fn connect(conn: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(conn, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting with {conn:?}: {e}"));
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

fn rows(messages: Vec<SimpleQueryMessage>) -> Vec<SimpleQueryRow> {
    messages
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .collect()
}

/// The first column of the first row of `sql`, run with the simple query protocol (PgBouncer
/// 1.18 in transaction mode does not carry named prepared statements between transactions).
async fn value(client: &Client, sql: &str) -> String {
    let rows = rows(client.simple_query(sql).await.unwrap());
    rows[0].get(0).unwrap().to_owned()
}

/// The `SHOW DATABASES` row of the pooler's database `name`.
async fn pooler_database(admin: &Client, name: &str) -> SimpleQueryRow {
    rows(admin.simple_query("SHOW DATABASES").await.unwrap())
        .into_iter()
        .find(|r| r.get("name") == Some(name))
        .unwrap_or_else(|| panic!("SHOW DATABASES has no row for {name}"))
}

fn backend(cluster: &Cluster) -> String {
    format!("host=127.0.0.1 port={} dbname=postgres", cluster.port())
}

/// A cluster whose table `marker` holds the one row `label`.
async fn marked_cluster(label: &str) -> Cluster {
    let cluster = common::cluster();
    cluster
        .execute(
            "postgres",
            &format!("CREATE TABLE marker(v text); INSERT INTO marker VALUES ('{label}')"),
        )
        .await
        .unwrap();
    cluster
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbouncer_pools_a_cluster_answers_its_consoles_and_stops_on_drop() {
    let cluster = marked_cluster("first").await;
    let pooler =
        PgBouncer::start(PoolerOptions::new().database("app", &backend(&cluster))).unwrap();
    assert!(PgBouncer::available());

    let client = connect(&pooler.conn_string("app")).await;
    assert_eq!(value(&client, "SELECT v FROM marker").await, "first");
    let port = value(&client, "SELECT inet_server_port()").await;
    assert_eq!(port, cluster.port().to_string(), "{}", pooler.log());

    let admin = connect(&pooler.admin_conn_string()).await;
    let app = pooler_database(&admin, "app").await;
    assert_eq!(app.get("host"), Some("127.0.0.1"));
    assert_eq!(app.get("port"), Some(cluster.port().to_string().as_str()));
    assert_eq!(app.get("database"), Some("postgres"));
    let config = rows(admin.simple_query("SHOW CONFIG").await.unwrap());
    let pool_mode = config
        .iter()
        .find(|r| r.get("key") == Some("pool_mode"))
        .expect("SHOW CONFIG lists pool_mode");
    assert_eq!(pool_mode.get("value"), Some("transaction"));

    let stats = connect(&pooler.stats_conn_string()).await;
    pooler_database(&stats, "app").await;
    let err = stats.simple_query("PAUSE app").await.unwrap_err();
    let message = err.as_db_error().map(|e| e.message().to_owned());
    assert_eq!(message.as_deref(), Some("admin access needed"), "{err}");
    assert_eq!(
        pooler_database(&admin, "app").await.get("paused"),
        Some("0")
    );

    let pid = pooler.pid().expect("running");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        assert_ne!(uid, "0", "PgBouncer must not run as root");
    }
    let dir = pooler.config_path().parent().unwrap().to_owned();
    let pooler_port = pooler.port();
    drop(pooler);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "pgbouncer (pid {pid}) must be stopped"
    );
    assert!(!dir.exists(), "{} must be removed", dir.display());
    assert!(std::net::TcpStream::connect(("127.0.0.1", pooler_port)).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbouncer_reload_sends_new_transactions_to_the_rewritten_entry() {
    let first = marked_cluster("first").await;
    let second = marked_cluster("second").await;
    let pooler = PgBouncer::start(PoolerOptions::new().database("app", &backend(&first))).unwrap();
    let client = connect(&pooler.conn_string("app")).await;
    assert_eq!(value(&client, "SELECT v FROM marker").await, "first");

    pooler
        .set_databases(&[("app".to_owned(), backend(&second))])
        .unwrap();
    let written = std::fs::read_to_string(pooler.databases_file()).unwrap();
    assert_eq!(written, format!("app = {}\n", backend(&second)));
    let admin = connect(&pooler.admin_conn_string()).await;
    admin.simple_query("RELOAD").await.unwrap();
    let app = pooler_database(&admin, "app").await;
    assert_eq!(
        app.get("port"),
        Some(second.port().to_string().as_str()),
        "{}",
        pooler.log()
    );

    assert_eq!(value(&client, "SELECT v FROM marker").await, "second");
    let fresh = connect(&pooler.conn_string("app")).await;
    assert_eq!(value(&fresh, "SELECT v FROM marker").await, "second");
    fresh
        .simple_query("INSERT INTO marker VALUES ('via pooler')")
        .await
        .unwrap();
    let direct = second.connect("postgres").await.unwrap();
    let n: i64 = direct
        .query_one("SELECT count(*) FROM marker WHERE v = 'via pooler'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbouncer_pause_holds_queries_until_resume() {
    let cluster = marked_cluster("first").await;
    let pooler =
        PgBouncer::start(PoolerOptions::new().database("app", &backend(&cluster))).unwrap();
    let client = connect(&pooler.conn_string("app")).await;
    assert_eq!(value(&client, "SELECT v FROM marker").await, "first");

    let admin = connect(&pooler.admin_conn_string()).await;
    admin.simple_query("PAUSE app").await.unwrap();
    assert_eq!(
        pooler_database(&admin, "app").await.get("paused"),
        Some("1")
    );

    let mut held = tokio::spawn(async move { value(&client, "SELECT v FROM marker").await });
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut held)
            .await
            .is_err(),
        "a query through a paused database must wait for RESUME"
    );
    admin.simple_query("RESUME app").await.unwrap();
    let v = tokio::time::timeout(Duration::from_secs(60), held)
        .await
        .unwrap_or_else(|_| panic!("query still held after RESUME; log:\n{}", pooler.log()))
        .unwrap();
    assert_eq!(v, "first");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbouncer_pause_waits_for_the_transaction_in_flight() {
    let cluster = marked_cluster("first").await;
    let pooler =
        PgBouncer::start(PoolerOptions::new().database("app", &backend(&cluster))).unwrap();
    let client = connect(&pooler.conn_string("app")).await;
    client
        .simple_query("BEGIN; INSERT INTO marker VALUES ('in flight')")
        .await
        .unwrap();

    let admin = connect(&pooler.admin_conn_string()).await;
    let mut pause =
        tokio::spawn(async move { admin.simple_query("PAUSE app").await.map(|_| admin) });
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut pause)
            .await
            .is_err(),
        "PAUSE must wait for the open transaction"
    );
    let n = value(&client, "SELECT count(*) FROM marker").await;
    assert_eq!(
        n, "2",
        "the transaction in flight goes on while PAUSE waits"
    );
    client.simple_query("COMMIT").await.unwrap();
    let admin = tokio::time::timeout(Duration::from_secs(60), pause)
        .await
        .unwrap_or_else(|_| panic!("PAUSE still waiting after COMMIT; log:\n{}", pooler.log()))
        .unwrap()
        .unwrap();
    admin.simple_query("RESUME app").await.unwrap();
    let direct = cluster.connect("postgres").await.unwrap();
    let n: i64 = direct
        .query_one("SELECT count(*) FROM marker WHERE v = 'in flight'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
}

#[test]
fn pgbouncer_is_stopped_when_a_test_panics() {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(None));
    let s2 = seen.clone();
    let res = std::panic::catch_unwind(move || {
        let pooler = PgBouncer::start(PoolerOptions::new()).unwrap();
        *s2.lock().unwrap() = Some((pooler.pid().unwrap(), pooler.config_path()));
        panic!("test failure while a pooler is up");
    });
    assert!(res.is_err());
    let (pid, config) = seen.lock().unwrap().clone().unwrap();
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    assert!(!config.exists(), "the pooler's directory must be removed");
}

#[test]
fn pgbouncer_refuses_a_database_name_it_cannot_write() {
    let err = PgBouncer::start(PoolerOptions::new().database("my app", "host=127.0.0.1"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("\"my app\""), "{err}");
}
