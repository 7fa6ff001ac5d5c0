//! `walshift fixture record`: a fixture from a live source.
//!
//! 1. Capture's own preparation ([`capture::prepare`]) creates the publication (if missing) and
//!    a slot with an exported snapshot; while its replication connection holds the snapshot,
//!    `pg_dump --snapshot` writes `schema.sql` (the whole database's schema) and `data.sql`
//!    (the captured tables' rows), exactly as of the slot's consistent point.
//! 2. [`capture::run`] streams the slot into `buffer/` until `until_lsn`, or until `stop`
//!    resolves and then up to the source's end of WAL at that moment.
//! 3. The expectation: on a quiescent source (its end of WAL does not move while the source
//!    side is computed), verify's source side through the mapping — per target table, row count
//!    and checksum — against a scratch target holding the migrated schema. Otherwise (or with
//!    `until_lsn`, where the source has moved on) from the first rehearsal.
//! 4. The slot is dropped, and the publication if this run created it — also after a failure:
//!    a recorder never leaves a slot holding WAL on the source.
//! 5. A rehearsal of the new fixture checks it (and writes the expectation when it comes from
//!    the rehearsal).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use super::fixture::{
    self, Expect, ExpectFrom, ExpectTable, Fixture, Manifest, Recorded, RowsFile,
};
use super::{RehearseError, RehearseOptions, RehearseReport, Scratch, pg};
use crate::buffer::BufferConfig;
use crate::capture::{self, CaptureConfig};
use crate::conn::ConnInfo;
use crate::error::SqlContext;
use crate::lsn::Lsn;
use crate::source::replication::ReplicationConnection;
use crate::source::slot;
use crate::sql::quote_qualified;
use crate::transform::{Mapping, TableName};
use crate::verify::{self, VerifyOptions};

/// Where the expectation comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ExpectMode {
    /// From the source when it is quiescent at the end and no `until_lsn` was given, else from
    /// the first rehearsal. Default.
    #[default]
    Auto,
    /// From the source; an error if it does not stay quiescent.
    Source,
    /// From the first rehearsal.
    Rehearsal,
}

/// What to record. Every field documents its default.
#[derive(Clone, Debug)]
pub struct RecordOptions {
    /// The live source (a role with REPLICATION that can `pg_dump` the database).
    pub source: ConnInfo,
    /// The fixture directory to create; must not exist or be empty.
    pub out: PathBuf,
    /// Fixture name. Default: the directory's name.
    pub name: Option<String>,
    /// Description for `fixture.toml`. Default empty.
    pub description: String,
    /// What it exercises (tags). Default none.
    pub exercises: Vec<String>,
    /// Tables to capture (`schema.table`). Default: every user table.
    pub tables: Option<Vec<String>>,
    /// Stop once everything up to this LSN is captured (the expectation then comes from the
    /// rehearsal). Default: stop when the `stop` future resolves.
    pub until_lsn: Option<Lsn>,
    /// The release's mapping file, copied as `mapping.toml`. Default none (identity).
    pub mapping: Option<PathBuf>,
    /// The release's migration scripts, copied under their names. Default none.
    pub migration: Vec<PathBuf>,
    /// Deterministic SQL producing the starting rows, shipped as `generate.sql` instead of
    /// `data.sql` (for large but regular tables, e.g. `pgbench -i`). The caller vouches that it
    /// reproduces the snapshot; an expectation from the source then checks it. Default none.
    pub generate: Option<PathBuf>,
    /// Slot created (and dropped) for the recording. Default `walshift_fixture`.
    pub slot: String,
    /// Publication used; created (and dropped afterwards) if missing. Default `walshift_fixture`.
    pub publication: String,
    /// Buffer segment size. Default 1 MiB: a fixture spans several segments, so rehearsals read
    /// across segment boundaries and relation preambles.
    pub segment_size: u64,
    /// Where the expectation comes from. Default [`ExpectMode::Auto`].
    pub expect: ExpectMode,
    /// Rehearse the new fixture once (on a throwaway cluster) to check it. Default true; always
    /// done when the expectation comes from the rehearsal.
    pub check: bool,
}

impl RecordOptions {
    pub fn new(source: ConnInfo, out: impl Into<PathBuf>) -> Self {
        RecordOptions {
            source,
            out: out.into(),
            name: None,
            description: String::new(),
            exercises: Vec::new(),
            tables: None,
            until_lsn: None,
            mapping: None,
            migration: Vec::new(),
            generate: None,
            slot: "walshift_fixture".into(),
            publication: "walshift_fixture".into(),
            segment_size: 1 << 20,
            expect: ExpectMode::Auto,
            check: true,
        }
    }
}

/// What a recording produced.
#[derive(Clone, Debug, Serialize)]
pub struct RecordReport {
    pub dir: PathBuf,
    pub consistent_point: Lsn,
    pub end_lsn: Lsn,
    pub transactions: u64,
    pub changes: u64,
    /// Bytes of the buffer's segments.
    pub buffer_bytes: u64,
    pub expect_from: ExpectFrom,
    /// Why the expectation does not come from the source, when it does not.
    pub expect_note: Option<String>,
    /// The checking rehearsal.
    pub rehearsal: Option<RehearseReport>,
}

async fn current_lsn(client: &tokio_postgres::Client) -> Result<Lsn, RehearseError> {
    let s: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .sql_context("reading the source's end of WAL")?
        .get(0);
    s.parse()
        .map_err(|e| RehearseError::Record(format!("bad LSN {s:?} from the source: {e}")))
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> RehearseError + 'a {
    move |source| RehearseError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

fn copy_into(from: &Path, dir: &Path, name: &str) -> Result<(), RehearseError> {
    std::fs::copy(from, dir.join(name))
        .map(|_| ())
        .map_err(io("copying", from))
}

/// Records a fixture (see the module documentation). `stop` ends the capture (unless
/// `until_lsn` is set); it is first polled once the snapshot is dumped and streaming runs, so
/// a future that *makes* the traffic (and returns when done) records exactly that traffic.
pub async fn record(
    opts: &RecordOptions,
    stop: impl Future<Output = ()>,
) -> Result<RecordReport, RehearseError> {
    let out = &opts.out;
    if out.exists()
        && std::fs::read_dir(out)
            .map_err(io("reading", out))?
            .next()
            .is_some()
    {
        return Err(RehearseError::Record(format!(
            "{} exists and is not empty: record into a new directory",
            out.display()
        )));
    }
    std::fs::create_dir_all(out).map_err(io("creating", out))?;
    let mapping = match &opts.mapping {
        Some(p) => Mapping::load(p)?,
        None => Mapping::identity(),
    };
    let migration_names: Vec<String> = opts
        .migration
        .iter()
        .map(|p| {
            p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .ok_or_else(|| RehearseError::Record(format!("{} is not a file", p.display())))
        })
        .collect::<Result<_, _>>()?;

    let client = opts.source.connect().await?;
    let slot_exists = slot::exists(&client, &opts.slot)
        .await
        .sql_context("looking up the slot")?;
    if slot_exists {
        return Err(RehearseError::Record(format!(
            "slot {:?} already exists on the source: another recording runs, or one was interrupted \
             (drop it with SELECT pg_drop_replication_slot('{}')), or choose --slot",
            opts.slot, opts.slot
        )));
    }
    let publication_created = !slot::publication_exists(&client, &opts.publication)
        .await
        .sql_context("looking up the publication")?;
    let server_version: String = client
        .query_one("SELECT current_setting('server_version')", &[])
        .await
        .sql_context("reading the source's version")?
        .get(0);

    let mut cfg = CaptureConfig::new(opts.source.clone(), out.join("buffer"));
    cfg.slot = opts.slot.clone();
    cfg.publication = opts.publication.clone();
    cfg.tables = opts.tables.clone();
    cfg.buffer = BufferConfig::default().with_segment_size(opts.segment_size);

    let result = record_inner(opts, &cfg, &client, &mapping, stop).await;
    // Never leave the slot (it holds WAL on the source) nor a publication made for us.
    let cleanup = cleanup(opts, &client, publication_created).await;
    let (consistent_point, tables, expect, note) = result?;
    cleanup?;

    // The fixture's files.
    if let Some(m) = &opts.mapping {
        copy_into(m, out, "mapping.toml")?;
    }
    for (p, n) in opts.migration.iter().zip(&migration_names) {
        copy_into(p, out, n)?;
    }
    // The capture's writer lock is not part of the fixture (readers take no lock).
    let lock = cfg.buffer_dir.join("writer.lock");
    if lock.exists() {
        std::fs::remove_file(&lock).map_err(io("removing", &lock))?;
    }
    let summary = fixture::summarize(&cfg.buffer_dir)?;
    let manifest = Manifest {
        format_version: fixture::FORMAT_VERSION,
        name: opts.name.clone().unwrap_or_else(|| {
            out.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "fixture".into())
        }),
        description: opts.description.clone(),
        exercises: opts.exercises.clone(),
        tables: tables.iter().map(|t| t.to_string()).collect(),
        rows: if opts.generate.is_some() {
            RowsFile::Generate
        } else {
            RowsFile::Data
        },
        migration: migration_names,
        mapping: opts.mapping.as_ref().map(|_| "mapping.toml".to_owned()),
        recorded: Recorded {
            server_version,
            consistent_point: consistent_point.to_string(),
            at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        },
        buffer: summary.clone(),
    };
    let text = toml::to_string_pretty(&manifest)
        .map_err(|e| RehearseError::Record(format!("cannot write fixture.toml: {e}")))?;
    let manifest_path = out.join("fixture.toml");
    std::fs::write(&manifest_path, text).map_err(io("writing", &manifest_path))?;
    let fixture = Fixture::open(out)?;
    let expect_from = match &expect {
        Some(e) => {
            fixture.write_expect(e)?;
            ExpectFrom::Source
        }
        None => ExpectFrom::Rehearsal,
    };

    let rehearsal = if opts.check || expect.is_none() {
        let scratch = Scratch::throwaway("rehearsal").await?;
        let report = super::rehearse(
            &fixture,
            &scratch,
            &RehearseOptions {
                write_expect: expect.is_none(),
                ..RehearseOptions::default()
            },
        )
        .await?;
        if !report.equal() {
            let diff: Vec<String> = report
                .tables
                .iter()
                .filter(|t| !t.equal)
                .map(|t| {
                    format!(
                        "{} → {}: {} rows (source says {:?})",
                        t.source, t.target, t.rows, t.expected_rows
                    )
                })
                .collect();
            return Err(RehearseError::Record(format!(
                "the fixture in {} was written, but rehearsing it does not give the source's final state: {}",
                out.display(),
                diff.join("; ")
            )));
        }
        Some(report)
    } else {
        None
    };
    Ok(RecordReport {
        dir: out.clone(),
        consistent_point,
        end_lsn: summary.end_lsn.parse().unwrap_or(Lsn::ZERO),
        transactions: summary.transactions,
        changes: summary.changes,
        buffer_bytes: summary.segments.iter().map(|s| s.bytes).sum(),
        expect_from,
        expect_note: note,
        rehearsal,
    })
}

type Recorded_ = (Lsn, Vec<TableName>, Option<Expect>, Option<String>);

async fn record_inner(
    opts: &RecordOptions,
    cfg: &CaptureConfig,
    client: &tokio_postgres::Client,
    mapping: &Mapping,
    stop: impl Future<Output = ()>,
) -> Result<Recorded_, RehearseError> {
    let out = &opts.out;
    let prepared = capture::prepare(cfg, None).await?;
    let (Some(snapshot), Some(consistent_point)) =
        (prepared.snapshot.clone(), prepared.consistent_point)
    else {
        return Err(RehearseError::Record(
            "the slot was not created by this run".into(),
        ));
    };
    let tables: Vec<TableName> = prepared
        .tables
        .iter()
        .map(|t| TableName::new(t.schema.clone(), t.name.clone()))
        .collect();
    // Schema and rows as of the snapshot, while the exporting connection stays idle.
    pg::pg_dump(&opts.source, &snapshot, &out.join("schema.sql"), true, &[]).await?;
    match &opts.generate {
        Some(g) => copy_into(g, out, "generate.sql")?,
        None => {
            let patterns: Vec<String> = prepared
                .tables
                .iter()
                .map(|t| quote_qualified(&t.schema, &t.name))
                .collect();
            pg::pg_dump(
                &opts.source,
                &snapshot,
                &out.join("data.sql"),
                false,
                &patterns,
            )
            .await?;
        }
    }
    let _ = prepared.conn.close().await;

    // Stream: until the LSN, or until `stop` and then to the end of WAL at that moment.
    let mut run_cfg = cfg.clone();
    run_cfg.until_lsn = opts.until_lsn;
    // The slot was created just above for this buffer.
    run_cfg.adopt_slot = true;
    let mut durable = match opts.until_lsn {
        Some(_) => capture::run(run_cfg, std::future::pending::<()>()).await?,
        None => capture::run(run_cfg, stop).await?,
    }
    .durable_lsn;
    if opts.until_lsn.is_none() {
        durable = capture_to(cfg, client, durable).await?.1;
    }

    let why_not = match (opts.expect, opts.until_lsn) {
        (ExpectMode::Rehearsal, _) => Some("asked for (--expect-from-rehearsal)".to_owned()),
        (ExpectMode::Auto, Some(_)) => {
            Some("--until-lsn given: the source may have moved past the capture's end".to_owned())
        }
        _ => None,
    };
    if let Some(why) = why_not {
        return Ok((consistent_point, tables, None, Some(why)));
    }

    // The expectation from the source, through the mapping, against a scratch target holding
    // the migrated schema. Quiescent: the end of WAL is the same before and after the source
    // side is read, and the buffer holds everything up to it.
    let scratch = Scratch::throwaway("expect").await?;
    pg::psql_file(&scratch.conn, &out.join("schema.sql"), false).await?;
    if !opts.migration.is_empty() {
        let scripts = crate::migrate::load_scripts(&opts.migration)?;
        crate::migrate::migrate(
            &crate::migrate::MigrateOptions::new(scratch.conn.clone()),
            &scripts,
            |_| {},
        )
        .await?;
    }
    let target = scratch.conn.connect().await?;
    super::fixed_settings(&target).await?;
    for _attempt in 0..5 {
        let (before, d) = capture_to(cfg, client, durable).await?;
        durable = d;
        let report = verify::verify(
            client,
            &target,
            mapping,
            &tables,
            &VerifyOptions {
                max_keys: 0,
                ..VerifyOptions::default()
            },
        )
        .await?;
        let after = current_lsn(client).await?;
        if before == after {
            let expect = Expect {
                expect_from: ExpectFrom::Source,
                end_lsn: String::new(),
                tables: report
                    .tables
                    .into_iter()
                    .map(|t| ExpectTable {
                        source: t.source.to_string(),
                        target: t.target.to_string(),
                        columns: t.columns,
                        rows: t.source_rows,
                        checksum: t.source_checksum,
                    })
                    .collect(),
            };
            let end = fixture::scan_transactions(&cfg.buffer_dir)?
                .last()
                .map(|t| t.end_lsn)
                .unwrap_or(Lsn::ZERO);
            return Ok((
                consistent_point,
                tables,
                Some(Expect {
                    end_lsn: end.to_string(),
                    ..expect
                }),
                None,
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let why = "the source kept writing while its side was computed".to_owned();
    if opts.expect == ExpectMode::Source {
        return Err(RehearseError::Record(format!(
            "cannot take the expectation from the source: {why}; stop the writers, or record with \
             --expect-from-rehearsal"
        )));
    }
    Ok((consistent_point, tables, None, Some(why)))
}

/// Captures up to the source's current end of WAL; returns (that end, durable LSN).
async fn capture_to(
    cfg: &CaptureConfig,
    client: &tokio_postgres::Client,
    durable: Lsn,
) -> Result<(Lsn, Lsn), RehearseError> {
    let end = current_lsn(client).await?;
    if durable >= end {
        return Ok((end, durable));
    }
    let mut c = cfg.clone();
    c.until_lsn = Some(end);
    let report = tokio::time::timeout(
        Duration::from_secs(60),
        capture::run(c, std::future::pending::<()>()),
    )
    .await
    .map_err(|_| {
        RehearseError::Record(format!(
            "capture did not reach the source's end of WAL ({end}) within 60 s"
        ))
    })??;
    Ok((end, report.durable_lsn))
}

/// Drops the recording's slot (waiting until its walsender let go) and the publication if
/// this run created it.
async fn cleanup(
    opts: &RecordOptions,
    client: &tokio_postgres::Client,
    publication_created: bool,
) -> Result<(), RehearseError> {
    let exists = slot::exists(client, &opts.slot)
        .await
        .sql_context("looking up the slot")?;
    if exists {
        let mut conn = ReplicationConnection::connect(&opts.source)
            .await
            .map_err(|e| RehearseError::Record(format!("cannot drop slot {:?}: {e}", opts.slot)))?;
        conn.drop_slot(&opts.slot, true)
            .await
            .map_err(|e| RehearseError::Record(format!("cannot drop slot {:?}: {e}", opts.slot)))?;
        let _ = conn.close().await;
    }
    if publication_created {
        slot::drop_publication_if_exists(client, &opts.publication)
            .await
            .sql_context("dropping the recording's publication")?;
    }
    Ok(())
}
