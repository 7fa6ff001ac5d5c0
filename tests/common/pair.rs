//! A source and a target cluster with a buffer directory, and replay into a target the test
//! built itself.

use std::path::Path;

use tempfile::TempDir;
use walshift::apply::replay::{self, ReplayConfig, ReplayError, ReplayReport, TargetOrigin};
use walshift::conn::ConnInfo;
use walshift::localpg::{Cluster, ClusterOptions};

/// A source, a target and a buffer directory. Destructure it to keep the usual names:
/// `let Pair { source, target, dir } = Pair::with_schema(SCHEMA).await;`
pub struct Pair {
    pub source: Cluster,
    pub target: Cluster,
    pub dir: TempDir,
}

impl Pair {
    /// Two clusters with the default options, started side by side, and an empty buffer
    /// directory.
    pub fn start() -> Pair {
        let (source, target) = clusters();
        Pair {
            source,
            target,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// As [`Pair::start`], with `schema` (and rows) run in both `postgres` databases.
    pub async fn with_schema(schema: &str) -> Pair {
        Pair::with_schemas(schema, schema).await
    }

    /// As [`Pair::start`], with `source_sql` run on the source and `target_sql` on the target
    /// (the release's schema, say).
    pub async fn with_schemas(source_sql: &str, target_sql: &str) -> Pair {
        let p = Pair::start();
        p.source.execute("postgres", source_sql).await.unwrap();
        p.target.execute("postgres", target_sql).await.unwrap();
        p
    }

    /// As [`Pair::with_schemas`], then a first capture: the slot and the publication exist and
    /// the buffer starts right after the schemas and their rows.
    pub async fn capturing(source_sql: &str, target_sql: &str) -> Pair {
        let p = Pair::with_schemas(source_sql, target_sql).await;
        super::capture::until_now(&p.source, p.dir.path()).await;
        p
    }

    /// A source (started with `source_opts`) holding `schema`, cloned into the target by
    /// capture `--clone-to` at a new slot's snapshot; the buffer holds everything committed up
    /// to then.
    pub async fn cloned(source_opts: ClusterOptions, schema: &str) -> Pair {
        let (source, target) = clusters_with(source_opts);
        source.execute("postgres", schema).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        super::capture::with_clone(&source, &target, dir.path())
            .await
            .expect("capture with clone");
        Pair {
            source,
            target,
            dir,
        }
    }
}

/// One cluster with the databases `src` (`source_sql` run in it) and `dst` (`target_sql`): a
/// source and a target side by side, where nothing streams between them (verify).
pub async fn two_databases(source_sql: &str, target_sql: &str) -> Cluster {
    let cluster = super::cluster();
    for (db, sql) in [("src", source_sql), ("dst", target_sql)] {
        cluster.create_database(db).await.unwrap();
        cluster.execute(db, sql).await.unwrap();
    }
    cluster
}

/// Two clusters with the default options, started side by side.
pub fn clusters() -> (Cluster, Cluster) {
    clusters_with(ClusterOptions::default())
}

/// A source started with `source_opts` and a target with the default options, side by side.
pub fn clusters_with(source_opts: ClusterOptions) -> (Cluster, Cluster) {
    let source = std::thread::spawn(move || Cluster::start(source_opts).unwrap());
    let target = super::cluster();
    (source.join().unwrap(), target)
}

/// The cluster's `postgres` database.
pub fn conn(c: &Cluster) -> ConnInfo {
    ConnInfo::parse(&c.conn_string("postgres")).unwrap()
}

/// Replay of `dir` into `target`'s `postgres` database, which the test loaded itself (no
/// clone record: [`TargetOrigin::LoadedElsewhere`]).
pub fn replay_config(target: &Cluster, dir: &Path) -> ReplayConfig {
    let mut cfg = ReplayConfig::new(dir, conn(target));
    cfg.target_origin = TargetOrigin::LoadedElsewhere;
    cfg
}

/// Runs replay to the end of the buffer.
pub async fn replay(cfg: ReplayConfig) -> Result<ReplayReport, ReplayError> {
    replay::run(cfg, std::future::pending::<()>()).await
}
