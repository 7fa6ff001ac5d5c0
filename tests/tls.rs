//! TLS against real servers: `sslmode` checks (CA, host name, refusal of plain text), client
//! certificate auth, and capture → clone → replay with every connection over TLS.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use walshift::apply::replay::ReplayConfig;
use walshift::capture::{self, CaptureConfig};
use walshift::clone::CloneOptions;
use walshift::conn::ConnInfo;
use walshift::localpg::{Cluster, ClusterOptions, ServerTls};
use walshift::source::replication::ReplicationConnection;

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    /// (certificate PEM, key PEM) for `cn` with subject alternative names `sans`.
    fn issue(&self, cn: &str, sans: &[&str]) -> (String, String) {
        let mut p =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

fn write(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

/// A TLS server on 127.0.0.1 and 127.0.0.2 whose certificate names 127.0.0.1 and localhost.
fn tls_cluster(ca: &Ca, client_ca: Option<&Ca>) -> Cluster {
    let (cert_pem, key_pem) = ca.issue("db", &["127.0.0.1", "localhost"]);
    Cluster::start(
        ClusterOptions::default()
            .setting("listen_addresses", "'127.0.0.1,127.0.0.2'")
            .tls(ServerTls {
                cert_pem,
                key_pem,
                client_ca_pem: client_ca.map(|c| c.cert.pem()),
            }),
    )
    .unwrap()
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn conn(host: &str, port: u16, user: &str, extra: &str) -> ConnInfo {
    ConnInfo::parse(&format!(
        "host={host} port={port} user={user} dbname=postgres password=s3cret-pw {extra}"
    ))
    .unwrap()
}

/// Whether the SQL session and a replication connection made with `info` both use TLS.
async fn sessions_use_tls(info: &ConnInfo) -> Result<(bool, bool), String> {
    let client = info.connect().await.map_err(|e| chain(&e))?;
    let sql: bool = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let repl = ReplicationConnection::connect(info)
        .await
        .map_err(|e| chain(&e))?;
    let walsender: bool = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = $1",
            &[&repl.process_id()],
        )
        .await
        .unwrap()
        .get(0);
    repl.close().await.unwrap();
    Ok((sql, walsender))
}

fn assert_clean(msg: &str, secrets: &[&str]) {
    for s in secrets.iter().chain(&["s3cret-pw", "PRIVATE KEY"]) {
        assert!(!msg.contains(s), "output leaks {s:?}: {msg}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_checks_the_ca_and_the_host_name() {
    let ca = Ca::new("walshift test CA");
    let other = Ca::new("some other CA");
    let cluster = tls_cluster(&ca, None);
    let port = cluster.port();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = write(dir.path(), "ca.pem", &ca.cert.pem(), 0o644);
    let other_file = write(dir.path(), "other.pem", &other.cert.pem(), 0o644);
    let full = format!("sslmode=verify-full sslrootcert={}", ca_file.display());

    for host in ["127.0.0.1", "localhost"] {
        let info = conn(host, port, "postgres", &full);
        assert_eq!(sessions_use_tls(&info).await, Ok((true, true)), "{host}");
    }
    // URL form and the environment variables' spelling reach the same settings.
    let url = format!(
        "postgresql://postgres@127.0.0.1:{port}/postgres?sslmode=verify-full&sslrootcert={}",
        ca_file.display()
    );
    let info = ConnInfo::parse(&url).unwrap();
    assert_eq!(sessions_use_tls(&info).await, Ok((true, true)));

    let wrong_ca = conn(
        "127.0.0.1",
        port,
        "postgres",
        &format!("sslmode=verify-full sslrootcert={}", other_file.display()),
    );
    let err = sessions_use_tls(&wrong_ca).await.unwrap_err();
    assert!(err.contains("not signed by a CA in sslrootcert="), "{err}");
    let err = ReplicationConnection::connect(&wrong_ca).await.unwrap_err();
    let err = chain(&err);
    assert!(err.contains("not signed by a CA in sslrootcert="), "{err}");
    assert_clean(&err, &[]);

    // 127.0.0.2 reaches the same server, but the certificate does not name it.
    let wrong_host = conn("127.0.0.2", port, "postgres", &full);
    let err = sessions_use_tls(&wrong_host).await.unwrap_err();
    assert!(err.contains("does not name 127.0.0.2"), "{err}");
    let err = chain(
        &ReplicationConnection::connect(&wrong_host)
            .await
            .unwrap_err(),
    );
    assert!(err.contains("does not name 127.0.0.2"), "{err}");
    assert_clean(&err, &[]);
    // verify-ca checks the CA only.
    let ca_only = conn(
        "127.0.0.2",
        port,
        "postgres",
        &format!("sslmode=verify-ca sslrootcert={}", ca_file.display()),
    );
    assert_eq!(sessions_use_tls(&ca_only).await, Ok((true, true)));
    // require without a root certificate: encrypted, not verified; prefer takes TLS too.
    for mode in ["require", "prefer"] {
        let info = conn("127.0.0.2", port, "postgres", &format!("sslmode={mode}"));
        assert_eq!(sessions_use_tls(&info).await, Ok((true, true)), "{mode}");
    }
    let plain = conn("127.0.0.1", port, "postgres", "sslmode=disable");
    assert_eq!(sessions_use_tls(&plain).await, Ok((false, false)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_never_falls_back_to_plain_text() {
    let cluster = common::cluster();
    let port = cluster.port();
    for mode in ["require", "verify-ca sslrootcert=system", "verify-full"] {
        let r = ConnInfo::parse(&format!(
            "host=127.0.0.1 port={port} user=postgres dbname=postgres sslmode={mode}"
        ));
        let Ok(info) = r else {
            // verify-* without a CA file or with system roots + verify-ca: refused at parse.
            let e = r.unwrap_err().to_string();
            assert!(e.contains("sslrootcert"), "{e}");
            continue;
        };
        let err = chain(&info.connect().await.unwrap_err());
        assert!(err.contains("server does not support TLS"), "{err}");
        let err = chain(&ReplicationConnection::connect(&info).await.unwrap_err());
        assert!(err.contains("does not accept TLS connections"), "{err}");
        assert!(err.contains(&format!("sslmode={mode}")), "{err}");
    }
    let prefer = conn("127.0.0.1", port, "postgres", "");
    assert_eq!(sessions_use_tls(&prefer).await, Ok((false, false)));
    let bad = ConnInfo::parse("host=127.0.0.1 sslmode=verify").unwrap_err();
    assert!(bad.to_string().contains("not an sslmode"), "{bad}");
    let bad = ConnInfo::parse("host=127.0.0.1 sslcrl=/x.pem").unwrap_err();
    assert!(bad.to_string().contains("not supported"), "{bad}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificate_authentication() {
    let ca = Ca::new("server CA");
    let clients = Ca::new("client CA");
    let cluster = tls_cluster(&ca, Some(&clients));
    cluster
        .execute("postgres", "CREATE ROLE app LOGIN SUPERUSER REPLICATION")
        .await
        .unwrap();
    cluster
        .set_hba(
            "local all all trust\n\
             host all postgres 127.0.0.1/32 trust\n\
             hostssl all app 127.0.0.1/32 cert\n",
        )
        .unwrap();
    let port = cluster.port();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = write(dir.path(), "ca.pem", &ca.cert.pem(), 0o644);
    let (cert, key) = clients.issue("app", &[]);
    let cert_file = write(dir.path(), "app.crt", &cert, 0o644);
    let key_file = write(dir.path(), "app.key", &key, 0o600);
    let base = format!("sslmode=verify-full sslrootcert={}", ca_file.display());

    let with_cert = conn(
        "127.0.0.1",
        port,
        "app",
        &format!(
            "{base} sslcert={} sslkey={}",
            cert_file.display(),
            key_file.display()
        ),
    );
    assert_eq!(sessions_use_tls(&with_cert).await, Ok((true, true)));

    let without = conn("127.0.0.1", port, "app", &base);
    let err = sessions_use_tls(&without).await.unwrap_err();
    assert!(err.contains("certificate"), "{err}");
    let err = chain(&ReplicationConnection::connect(&without).await.unwrap_err());
    assert!(err.contains("certificate"), "{err}");

    // A key others may read is refused, as libpq does, without printing it.
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = ConnInfo::parse(&format!(
        "host=127.0.0.1 port={port} user=app {base} sslcert={} sslkey={}",
        cert_file.display(),
        key_file.display()
    ))
    .unwrap_err()
    .to_string();
    assert!(err.contains("permissions 644"), "{err}");
    assert_clean(&err, &[key.lines().nth(1).unwrap()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_clone_and_replay_over_tls_only() {
    let ca = Ca::new("walshift test CA");
    let clients = Ca::new("client CA");
    let source = tls_cluster(&ca, Some(&clients));
    let target = tls_cluster(&ca, Some(&clients));
    // The role walshift uses may connect over TLS with its client certificate only (pg_dump
    // and psql children included).
    let hba = "local all all trust\n\
               host all postgres 127.0.0.1/32 trust\n\
               hostssl all app 127.0.0.1/32 cert\n";
    for c in [&source, &target] {
        c.execute("postgres", "CREATE ROLE app LOGIN SUPERUSER REPLICATION")
            .await
            .unwrap();
        c.set_hba(hba).unwrap();
    }
    source
        .execute(
            "postgres",
            "CREATE TABLE t (id int PRIMARY KEY, v text);
             INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 1000) g;",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = write(dir.path(), "ca.pem", &ca.cert.pem(), 0o644);
    let buffer = dir.path().join("buffer");
    let (cert, key) = clients.issue("app", &[]);
    let tls = format!(
        "sslmode=verify-full sslrootcert={} sslcert={} sslkey={}",
        ca_file.display(),
        write(dir.path(), "app.crt", &cert, 0o644).display(),
        write(dir.path(), "app.key", &key, 0o600).display(),
    );
    let src = conn("127.0.0.1", source.port(), "app", &tls);
    let tgt = conn("localhost", target.port(), "app", &tls);
    // Plain text is refused for app, so everything below proves TLS end to end.
    let plain = conn("127.0.0.1", source.port(), "app", "sslmode=disable");
    assert!(plain.connect().await.is_err());

    let mut cfg = CaptureConfig::new(src.clone(), &buffer);
    cfg.clone = Some(CloneOptions::new(src.clone(), tgt.clone()));
    let cap = common::capture::Running::cloned(cfg, std::time::Duration::from_secs(180)).await;
    source
        .execute(
            "postgres",
            "UPDATE t SET v = v || '!' WHERE id % 3 = 0; DELETE FROM t WHERE id % 7 = 0;
             INSERT INTO t SELECT g, 'n' FROM generate_series(1001, 1200) g;",
        )
        .await
        .unwrap();
    let until = common::capture::current_lsn(&source).await;
    cap.stop().await.expect("capture with clone over TLS");
    let mut cfg = CaptureConfig::new(src.clone(), &buffer);
    cfg.until_lsn = Some(until);
    capture::run(cfg, std::future::pending::<()>())
        .await
        .expect("capture over TLS");
    let report = common::pair::replay(ReplayConfig::new(&buffer, tgt.clone()))
        .await
        .expect("replay over TLS");
    assert!(report.changes > 0);
    common::digest::assert_same(&source, &target, &["t"]).await;
}
