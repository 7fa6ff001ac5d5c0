//! Rehearsal: replay a recorded fixture into a scratch target, as many times as needed, and
//! know the cutover window before release night.
//!
//! A fixture (`docs/fixtures.md`) is a directory: the source schema and starting rows at a
//! slot's snapshot, the buffer captured from that slot, the release's migration and mapping,
//! and `expect.json`. [`rehearse`] loads the starting state into an empty target database,
//! runs the migration ([`crate::migrate`]), replays the buffer through the mapping
//! ([`crate::apply::replay`]) — everything before the last `window_of` seconds of captured
//! traffic first, then that tail, timed: the projected cutover drain — and compares every
//! target table with the expectation (verify's count and checksum, `docs/verify.md`).
//! [`record()`] makes a fixture from a live source.
//!
//! Contracts:
//! - **Deterministic.** The same fixture gives the same final target state: the buffer is a
//!   fixed sequence of transactions applied exactly once in commit order, the starting rows are
//!   a dump (or deterministic SQL), and the checksums are order-independent.
//! - **Damage is an error.** Every buffer record's CRC is checked, and the buffer must match
//!   the manifest's transaction count, end LSN and per-segment SHA-256 ([`fixture::check_buffer`])
//!   before anything is written to the target.
//! - **The fixture is read-only.** Rehearsal writes nothing into the fixture directory unless
//!   asked to write `expect.json`.
//!
//! Files: `mod.rs` (options, the scratch target, loading, the timed replay, the comparison),
//! `fixture.rs` (the fixture directory and its integrity check), `record.rs` (a fixture from a
//! live source), `pg.rs` (its `psql` and `pg_dump` runs, through [`crate::pgtools`]).

pub mod fixture;
mod pg;
pub mod record;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::apply::replay::{self, ReplayConfig, ReplayError};
use crate::buffer::BufferError;
use crate::conn::ConnInfo;
use crate::error::SqlContext;
use crate::lsn::Lsn;
use crate::migrate::{self, MigrateError, MigrateOptions};
use crate::sql::quote_ident;
use crate::transform::TransformError;
use crate::verify::{self, VerifyError, VerifyOptions};
pub use fixture::{Expect, ExpectFrom, ExpectTable, Fixture, Manifest};
pub use record::{RecordOptions, RecordReport, record};

/// Default length of the captured tail whose drain time is the projected cutover window.
pub const DEFAULT_WINDOW_OF: Duration = Duration::from_secs(10);

/// Rehearsal failures (a target that differs from the expectation is a report, not an error:
/// see [`RehearseReport::equal`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RehearseError {
    #[error("could not {what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Manifest { path: PathBuf, message: String },
    #[error("the fixture is incomplete: {} is missing", .0.display())]
    MissingFile(PathBuf),
    #[error(
        "the fixture's buffer {} is corrupt: {detail}. Restore the fixture from version control or record it again",
        dir.display()
    )]
    Corrupt { dir: PathBuf, detail: String },
    #[error(transparent)]
    Buffer(#[from] BufferError),
    #[error(
        "the fixture has no expect.json: run `walshift rehearse --fixture … --write-expect` once to record \
         the first rehearsal's result as the expectation"
    )]
    NoExpect,
    #[error(transparent)]
    Tool(#[from] crate::pgtools::PgToolError),
    #[error(transparent)]
    Connect(#[from] crate::Error),
    #[error(transparent)]
    Sql(#[from] crate::error::SqlError),
    #[error("the fixture's migration failed")]
    Migrate(#[from] MigrateError),
    #[error(transparent)]
    Transform(#[from] TransformError),
    #[error("replaying the fixture failed")]
    Replay(#[from] ReplayError),
    #[error("checking the target failed")]
    Verify(#[from] VerifyError),
    #[error("cannot start a throwaway PostgreSQL cluster for the scratch target")]
    LocalPg(#[from] crate::localpg::LocalPgError),
    #[error(
        "the first replay stopped at {applied} instead of {expected}: the buffer does not line up with \
         the commit list read from it"
    )]
    Split { applied: Lsn, expected: Lsn },
    #[error(transparent)]
    Capture(#[from] crate::capture::CaptureError),
    #[error("{0}")]
    Record(String),
}

/// How to rehearse.
#[derive(Clone, Debug)]
pub struct RehearseOptions {
    /// Length of the captured tail whose drain is timed as the projected cutover window.
    /// Default 10 s ([`DEFAULT_WINDOW_OF`]). A fixture spanning less than this drains whole.
    pub window_of: Duration,
    /// Replay batch size (changes). Default replay's own, [`replay::DEFAULT_BATCH_ROWS`].
    pub batch_rows: usize,
    /// Write `expect.json` from this rehearsal's result instead of comparing with it. Default
    /// false.
    pub write_expect: bool,
}

impl Default for RehearseOptions {
    fn default() -> Self {
        RehearseOptions {
            window_of: DEFAULT_WINDOW_OF,
            batch_rows: replay::DEFAULT_BATCH_ROWS,
            write_expect: false,
        }
    }
}

/// What a rehearsal did and measured.
#[derive(Clone, Debug, Serialize)]
pub struct RehearseReport {
    pub fixture: String,
    /// The scratch target, without secrets.
    pub target: String,
    /// Seconds to load schema and starting rows.
    pub load_secs: f64,
    /// Seconds the migration took.
    pub migrate_secs: f64,
    pub replay: ReplayFigures,
    pub window: WindowFigures,
    /// Where the expectation came from; `None` when this run wrote it.
    pub expect_from: Option<ExpectFrom>,
    pub expect_written: bool,
    pub tables: Vec<TableOutcome>,
}

impl RehearseReport {
    /// Every target table matches the expectation (always true when the expectation was just
    /// written).
    pub fn equal(&self) -> bool {
        self.tables.iter().all(|t| t.equal)
    }
}

/// Replay of the whole buffer (both parts).
#[derive(Clone, Debug, Serialize)]
pub struct ReplayFigures {
    pub transactions: u64,
    pub changes: u64,
    /// Replay time, both parts, without connecting and compiling the mapping.
    pub secs: f64,
    pub changes_per_sec: f64,
    pub batches: u64,
}

/// The projected cutover window: draining the last `of_secs` of captured traffic.
#[derive(Clone, Debug, Serialize)]
pub struct WindowFigures {
    /// Requested tail length.
    pub of_secs: f64,
    /// Time between the fixture's first and last commit.
    pub captured_secs: f64,
    /// Replay was split after this commit (0/0: the whole buffer is the tail).
    pub split_lsn: Lsn,
    pub tail_transactions: u64,
    pub tail_changes: u64,
    /// Time replay took to apply the tail: the projected drain part of the cutover window.
    pub drain_secs: f64,
}

/// One target table against the expectation.
#[derive(Clone, Debug, Serialize)]
pub struct TableOutcome {
    pub source: String,
    pub target: String,
    pub rows: i64,
    pub checksum: String,
    pub expected_rows: Option<i64>,
    pub expected_checksum: Option<String>,
    pub equal: bool,
}

/// A scratch target: a throwaway localpg cluster or a given database.
pub struct Scratch {
    pub conn: ConnInfo,
    cluster: Option<crate::localpg::Cluster>,
}

impl Scratch {
    /// A new throwaway cluster (deleted when dropped) with an empty database `dbname`.
    pub async fn throwaway(dbname: &str) -> Result<Scratch, RehearseError> {
        let cluster = tokio::task::spawn_blocking(|| {
            crate::localpg::Cluster::start(
                crate::localpg::ClusterOptions::default()
                    .setting("fsync", "off")
                    .setting("timezone", "UTC"),
            )
        })
        .await
        .expect("cluster start does not panic")?;
        cluster.create_database(dbname).await?;
        let conn = ConnInfo::parse(&cluster.conn_string(dbname))?;
        Ok(Scratch {
            conn,
            cluster: Some(cluster),
        })
    }

    /// A given (empty) database.
    pub fn given(conn: ConnInfo) -> Scratch {
        Scratch {
            conn,
            cluster: None,
        }
    }

    /// Another empty database on a throwaway cluster (`None` for a given target).
    pub async fn another_database(&self, dbname: &str) -> Result<Option<ConnInfo>, RehearseError> {
        match &self.cluster {
            Some(c) => {
                c.create_database(dbname).await?;
                Ok(Some(ConnInfo::parse(&c.conn_string(dbname))?))
            }
            None => Ok(None),
        }
    }
}

/// Loads the fixture's schema and starting rows into `target` and runs its migration.
/// Returns (load seconds, migrate seconds).
pub async fn load_and_migrate(
    fixture: &Fixture,
    target: &ConnInfo,
) -> Result<(f64, f64), RehearseError> {
    let t = Instant::now();
    pg::psql_file(target, &fixture.schema_path(), false).await?;
    let replica = fixture.manifest.rows == fixture::RowsFile::Data;
    pg::psql_file(target, &fixture.rows_path(), replica).await?;
    let client = target.connect().await?;
    client
        .batch_execute("ANALYZE")
        .await
        .sql_context("analyzing the loaded target")?;
    let load = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let paths = fixture.migration_paths();
    if !paths.is_empty() {
        let scripts = migrate::load_scripts(&paths)?;
        migrate::migrate(&MigrateOptions::new(target.clone()), &scripts, |_| {}).await?;
        client
            .batch_execute("ANALYZE")
            .await
            .sql_context("analyzing the migrated target")?;
    }
    Ok((load, t.elapsed().as_secs_f64()))
}

/// Rehearses `fixture` into `scratch` (an empty database): load, migrate, replay (the tail
/// timed), compare with `expect.json` (or write it with `write_expect`).
pub async fn rehearse(
    fixture: &Fixture,
    scratch: &Scratch,
    opts: &RehearseOptions,
) -> Result<RehearseReport, RehearseError> {
    let txns = fixture::check_buffer(fixture)?;
    let expect = fixture.expect()?;
    if expect.is_none() && !opts.write_expect {
        return Err(RehearseError::NoExpect);
    }
    let mapping = Arc::new(fixture.mapping()?);
    let target = &scratch.conn;
    let (load_secs, migrate_secs) = load_and_migrate(fixture, target).await?;

    // The tail: transactions committed in the last `window_of` of the capture.
    let last_us = txns.last().map(|t| t.commit_time_us).unwrap_or(0);
    let first_us = txns.first().map(|t| t.commit_time_us).unwrap_or(0);
    let tail_from = last_us - opts.window_of.as_micros() as i64;
    let split = txns
        .iter()
        .rev()
        .find(|t| t.commit_time_us < tail_from)
        .map(|t| t.end_lsn)
        .unwrap_or(Lsn::ZERO);
    let tail: Vec<_> = txns.iter().filter(|t| t.end_lsn > split).collect();

    let mut cfg = ReplayConfig::new(fixture.buffer_dir(), target.clone());
    cfg.transform = Some(mapping.clone());
    cfg.batch_rows = opts.batch_rows;
    // Loaded just above from the fixture's dump, taken at the slot's snapshot.
    cfg.target_origin = replay::TargetOrigin::LoadedElsewhere;
    let mut secs = 0.0;
    let (mut transactions, mut changes, mut batches) = (0, 0, 0);
    if !split.is_zero() {
        let mut head = cfg.clone();
        head.until_lsn = Some(split);
        let r = replay::run(head, std::future::pending::<()>()).await?;
        if r.applied_lsn != split {
            return Err(RehearseError::Split {
                applied: r.applied_lsn,
                expected: split,
            });
        }
        secs += r.elapsed_secs;
        transactions += r.transactions;
        changes += r.changes;
        batches += r.batches;
    }
    let r = replay::run(cfg, std::future::pending::<()>()).await?;
    let drain_secs = r.elapsed_secs;
    secs += r.elapsed_secs;
    transactions += r.transactions;
    changes += r.changes;
    batches += r.batches;

    let measured = measure(fixture, scratch, &mapping).await?;
    let mut tables = Vec::new();
    for (source, tgt, columns, rows, checksum) in &measured {
        let want = expect.as_ref().and_then(|e| {
            e.tables
                .iter()
                .find(|t| &t.source == source && &t.target == tgt)
        });
        let equal = opts.write_expect
            || want.is_some_and(|w| {
                w.rows == *rows && &w.checksum == checksum && &w.columns == columns
            });
        tables.push(TableOutcome {
            source: source.clone(),
            target: tgt.clone(),
            rows: *rows,
            checksum: checksum.clone(),
            expected_rows: want.map(|w| w.rows),
            expected_checksum: want.map(|w| w.checksum.clone()),
            equal,
        });
    }
    if !opts.write_expect
        && let Some(e) = &expect
    {
        // A table the expectation names that this rehearsal did not produce.
        for w in &e.tables {
            if !tables
                .iter()
                .any(|t| t.source == w.source && t.target == w.target)
            {
                tables.push(TableOutcome {
                    source: w.source.clone(),
                    target: w.target.clone(),
                    rows: 0,
                    checksum: String::new(),
                    expected_rows: Some(w.rows),
                    expected_checksum: Some(w.checksum.clone()),
                    equal: false,
                });
            }
        }
    }
    if opts.write_expect {
        let end = txns.last().map(|t| t.end_lsn).unwrap_or(Lsn::ZERO);
        fixture.write_expect(&Expect {
            expect_from: ExpectFrom::Rehearsal,
            end_lsn: end.to_string(),
            tables: measured
                .into_iter()
                .map(|(source, target, columns, rows, checksum)| ExpectTable {
                    source,
                    target,
                    columns,
                    rows,
                    checksum,
                })
                .collect(),
        })?;
    }
    Ok(RehearseReport {
        fixture: fixture.manifest.name.clone(),
        target: target.redacted(),
        load_secs,
        migrate_secs,
        replay: ReplayFigures {
            transactions,
            changes,
            secs,
            changes_per_sec: if secs > 0.0 {
                changes as f64 / secs
            } else {
                0.0
            },
            batches,
        },
        window: WindowFigures {
            of_secs: opts.window_of.as_secs_f64(),
            captured_secs: (last_us - first_us) as f64 / 1e6,
            split_lsn: split,
            tail_transactions: tail.len() as u64,
            tail_changes: tail.iter().map(|t| t.changes).sum(),
            drain_secs,
        },
        expect_from: if opts.write_expect {
            None
        } else {
            expect.map(|e| e.expect_from)
        },
        expect_written: opts.write_expect,
        tables,
    })
}

/// Verify evaluates and prints values with the target session's `TimeZone`, `DateStyle`,
/// `IntervalStyle` and `extra_float_digits`: fixed here, so an expectation recorded on one
/// machine holds on another whatever the servers' defaults.
pub(crate) async fn fixed_settings(client: &tokio_postgres::Client) -> Result<(), RehearseError> {
    client
        .batch_execute(
            "SET TimeZone = 'UTC'; SET DateStyle = 'ISO, MDY'; SET IntervalStyle = 'postgres'; \
             SET extra_float_digits = 1",
        )
        .await
        .sql_context("setting the verify session's formatting")?;
    Ok(())
}

/// (source, target, columns, rows, checksum) per target table, as verify computes the target
/// side. The mapping is compiled against the source tables' shapes taken from the fixture's
/// `schema.sql`, loaded into a second, empty database next to the target (created and dropped
/// here; on a given target this needs the CREATEDB privilege).
async fn measure(
    fixture: &Fixture,
    scratch: &Scratch,
    mapping: &crate::transform::Mapping,
) -> Result<Vec<(String, String, Vec<String>, i64, String)>, RehearseError> {
    let name = format!("walshift_fixture_source_{}", std::process::id());
    let (shape_db, created) = match scratch.another_database(&name).await? {
        Some(c) => (c, false),
        None => {
            let client = scratch.conn.connect().await?;
            client
                .batch_execute(&format!("CREATE DATABASE {}", quote_ident(&name)))
                .await
                .sql_context("creating a scratch database for the source schema next to the target (needs CREATEDB)",)?;
            (scratch.conn.with_dbname(&name), true)
        }
    };
    let result = async {
        pg::psql_file(&shape_db, &fixture.schema_path(), false).await?;
        let source = shape_db.connect().await?;
        let target = scratch.conn.connect().await?;
        fixed_settings(&target).await?;
        let report = verify::verify(
            &source,
            &target,
            mapping,
            &fixture.tables()?,
            &VerifyOptions {
                max_keys: 0,
                ..VerifyOptions::default()
            },
        )
        .await?;
        Ok::<_, RehearseError>(
            report
                .tables
                .into_iter()
                .map(|t| {
                    (
                        t.source.to_string(),
                        t.target.to_string(),
                        t.columns,
                        t.target_rows,
                        t.target_checksum,
                    )
                })
                .collect(),
        )
    }
    .await;
    if created {
        let client = scratch.conn.connect().await?;
        let _ = client
            .batch_execute(&format!("DROP DATABASE IF EXISTS {}", quote_ident(&name)))
            .await;
    }
    result
}
