//! Issue 13, items 1 and 7: walshift never writes into the source by accident, and replay
//! writes only into a target cloned from its buffer's source and slot (or one the operator
//! vouches for with `--target-not-cloned-by-walshift`).

mod common;

use common::cli::{stderr, walshift};
use common::pair::{self, Pair};
use walshift::apply::replay::{ReplayConfig, ReplayError, TargetOrigin};
use walshift::identity::IdentityError;
use walshift::localpg::Cluster;

async fn scalar(c: &Cluster, db: &str, sql: &str) -> String {
    c.connect(db)
        .await
        .unwrap()
        .query_one(&format!("SELECT ({sql})::text"), &[])
        .await
        .unwrap()
        .get(0)
}

const SHOP: &str = "CREATE TABLE orders (id int PRIMARY KEY, amount int);
    INSERT INTO orders SELECT g, g FROM generate_series(1, 5000) g;";

/// The reproduction: `capture --clone-to <the source itself> --force` truncated 5000
/// live rows. Now refused before anything is created on either side; another database of the
/// same cluster is a valid target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clone_into_the_source_is_refused_even_with_force() {
    let source = common::cluster();
    source.execute("postgres", SHOP).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let buf = dir.path().join("buf");
    let conn = source.conn_string("postgres");
    let until = common::capture::current_lsn(&source).await.to_string();
    for force in [true, false] {
        let mut args = vec![
            "capture",
            "--source",
            &conn,
            "--buffer",
            buf.to_str().unwrap(),
            "--clone-to",
            &conn,
            "--until-lsn",
            &until,
        ];
        if force {
            args.push("--force");
        }
        let out = walshift(&args);
        let err = stderr(&out);
        assert!(!out.status.success(), "force={force}: {err}");
        assert!(err.contains("is the source database itself"), "{err}");
        assert!(err.contains("dbname=postgres"), "names the target: {err}");
        assert!(!err.contains("pass --force"), "{err}");
    }
    assert_eq!(
        scalar(&source, "postgres", "SELECT count(*) FROM orders").await,
        "5000"
    );
    assert_eq!(
        scalar(
            &source,
            "postgres",
            "SELECT (SELECT count(*) FROM pg_replication_slots) + (SELECT count(*) FROM pg_publication)"
        )
        .await,
        "0",
        "nothing was created on the source"
    );
    assert_eq!(
        scalar(&source, "postgres", "to_regnamespace('walshift') IS NULL").await,
        "true"
    );

    // Another database of the same cluster is not the source.
    source
        .execute("postgres", "CREATE DATABASE copy")
        .await
        .unwrap();
    let copy = source.conn_string("copy");
    let until = common::capture::current_lsn(&source).await.to_string();
    let out = walshift(&[
        "capture",
        "--source",
        &conn,
        "--buffer",
        buf.to_str().unwrap(),
        "--clone-to",
        &copy,
        "--until-lsn",
        &until,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        scalar(&source, "copy", "SELECT count(*) FROM orders").await,
        "5000"
    );
    assert_eq!(
        scalar(
            &source,
            "copy",
            "SELECT source_slot || ' ' || source_database || ' ' || (consistent_lsn IS NOT NULL) FROM walshift.clone_state"
        )
        .await,
        "walshift postgres true",
        "the clone records its buffer"
    );
}

/// The `--force` advice says what it destroys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_force_advice_says_what_it_destroys() {
    let (source, target) = common::pair::clusters();
    source.execute("postgres", SHOP).await.unwrap();
    target
        .execute(
            "postgres",
            "CREATE TABLE orders (id int PRIMARY KEY, amount int)",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let until = common::capture::current_lsn(&source).await.to_string();
    let out = walshift(&[
        "capture",
        "--source",
        &source.conn_string("postgres"),
        "--buffer",
        dir.path().join("b").to_str().unwrap(),
        "--clone-to",
        &target.conn_string("postgres"),
        "--until-lsn",
        &until,
    ]);
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("--force would TRUNCATE"), "{err}");
    assert!(
        err.contains("every row they hold there is deleted"),
        "{err}"
    );
}

/// Replay into the source itself is refused before the `walshift` schema is created there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_into_the_source_is_refused() {
    let (source, dir) = common::capture::source_with_buffer(SHOP).await;
    source
        .execute("postgres", "UPDATE orders SET amount = 0 WHERE id <= 10")
        .await
        .unwrap();
    common::capture::until_now(&source, dir.path()).await;
    for origin in [
        TargetOrigin::ClonedByWalshift,
        TargetOrigin::LoadedElsewhere,
    ] {
        let mut cfg = ReplayConfig::new(dir.path(), pair::conn(&source));
        cfg.target_origin = origin;
        let err = pair::replay(cfg)
            .await
            .expect_err("replay into the source must be refused");
        assert!(
            matches!(
                err,
                ReplayError::Identity(IdentityError::TargetIsSource { .. })
            ),
            "{origin:?}: {err}"
        );
        assert!(err.to_string().contains("No flag overrides this"), "{err}");
    }
    assert_eq!(
        scalar(&source, "postgres", "to_regnamespace('walshift') IS NULL").await,
        "true",
        "no walshift schema on the source"
    );
    // The same through the command line, with the flag: still refused.
    let out = walshift(&[
        "replay",
        "--buffer",
        dir.path().to_str().unwrap(),
        "--target",
        &source.conn_string("postgres"),
        "--target-not-cloned-by-walshift",
        "--no-progress",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("is the source database itself"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        scalar(&source, "postgres", "to_regnamespace('walshift') IS NULL").await,
        "true"
    );
}

/// An unrelated database with the same tables (never cloned from this buffer) is refused
/// with the way out; `--target-not-cloned-by-walshift` lets the operator vouch for it, and
/// later replays of the same buffer need no flag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_into_an_unrelated_database_is_refused_unless_vouched_for() {
    let Pair {
        source,
        target: unrelated,
        dir,
    } = Pair::capturing(SHOP, SHOP).await;
    source
        .execute("postgres", "UPDATE orders SET amount = -1 WHERE id <= 3")
        .await
        .unwrap();
    common::capture::until_now(&source, dir.path()).await;
    let buf = dir.path().to_str().unwrap();
    let target = unrelated.conn_string("postgres");
    let replay = |extra: &[&str]| {
        let mut args = vec![
            "replay",
            "--buffer",
            buf,
            "--target",
            &target,
            "--no-progress",
        ];
        args.extend_from_slice(extra);
        walshift(&args)
    };
    let out = replay(&[]);
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("no walshift clone record"), "{err}");
    assert!(err.contains("--target-not-cloned-by-walshift"), "{err}");
    assert_eq!(
        scalar(
            &unrelated,
            "postgres",
            "SELECT count(*) FROM orders WHERE amount = -1"
        )
        .await,
        "0",
        "nothing applied"
    );
    assert_eq!(
        scalar(
            &unrelated,
            "postgres",
            "to_regnamespace('walshift') IS NULL"
        )
        .await,
        "true",
        "nothing created"
    );

    // A clone record of another source is refused too, naming what it says.
    unrelated
        .execute(
            "postgres",
            "CREATE SCHEMA walshift; CREATE TABLE walshift.clone_state (id int PRIMARY KEY, \
             snapshot text, state text, source_system_identifier text, source_database text, \
             source_slot text); INSERT INTO walshift.clone_state VALUES \
             (1, 's', 'done', '42', 'postgres', 'walshift')",
        )
        .await
        .unwrap();
    let out = replay(&[]);
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("its clone record names source system identifier 42"),
        "{err}"
    );

    let out = replay(&["--target-not-cloned-by-walshift"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        scalar(
            &unrelated,
            "postgres",
            "SELECT count(*) FROM orders WHERE amount = -1"
        )
        .await,
        "3"
    );
    // Replay accepted this target for this buffer once: the next run needs no flag.
    let out = replay(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
}
