//! Replay throughput, side by side with PostgreSQL's native logical replication: the same
//! backlog applied three ways in one run, each into its own copy of the same starting table.
//!
//! Procedure (every step is deterministic except the timings):
//!
//! 1. Two throwaway clusters from [`crate::localpg`], same settings: a *source* and a *target*,
//!    fsync on, `max_wal_size` 16 GB and `checkpoint_timeout` 1 h so that no checkpoint starts
//!    on its own during the run, enough WAL senders and slots, `wal_retrieve_retry_interval`
//!    50 ms (the launcher otherwise waits up to 5 s before starting the second subscription's
//!    apply worker). On the source, `accounts` is
//!    loaded ([`workload::load`]) and `CREATE PUBLICATION walshift FOR TABLE accounts`. On the
//!    target, three databases — `ws`, `native_sync`, `native_async` — each loaded with the same
//!    initial rows ([`workload::load`] is deterministic).
//! 2. Before the workload, three pgoutput slots are created on the source: `walshift` (read
//!    later by `walshift capture`), `native_sync` and `native_async`. In the two native
//!    databases a subscription is created on its slot, disabled:
//!    `CREATE SUBSCRIPTION … PUBLICATION walshift WITH (create_slot = false, slot_name = …,
//!    copy_data = false, enabled = false, synchronous_commit = 'on' | 'off')`.
//! 3. The workload runs on the source ([`workload::run`]). The end position `END` is
//!    `pg_current_wal_insert_lsn()` (past every commit record even if the workload's
//!    asynchronous commits are not yet written), then a `CHECKPOINT` on the source flushes it.
//! 4. `walshift capture --until-lsn END` drains the `walshift` slot into a durable buffer. Not
//!    timed (capture has its own bench, `walshift bench capture`); it must report every change.
//!    The source's row count and checksum are taken.
//! 5. Timed, one after the other, each preceded by an untimed `CHECKPOINT` on the target so
//!    every method starts with a clean cluster:
//!    a. `walshift replay --buffer … --target …/ws --json` as a child process: wall time, CPU
//!    (user + system) and peak RSS from `wait4`.
//!    a'. With `--transform`, the same into database `wst`, which the release's migration
//!    (`--migration`, untimed, followed by `VACUUM ANALYZE` as the other targets had) brought
//!    to the mapping's schema after the initial load:
//!    `walshift replay --transform <mapping>`, verified against the source *through the
//!    mapping* ([`crate::verify`]); its rate over a.'s is reported (goal: within 20%).
//!    b. `ALTER SUBSCRIPTION native_sync ENABLE`, clock running until the last source
//!    transaction is applied **and flushed** on the target: the subscription's replication
//!    origin shows the last commit's end LSN (`remote_lsn`) and the target's WAL is flushed
//!    past the local commit (`local_lsn`), or the source slot's `confirmed_flush_lsn` reaches
//!    `END` — whichever is seen first, polled every 10 ms. (The origin condition is what the
//!    apply worker would report as its flush position, without its up-to-1 s feedback delay.)
//!    The subscription is disabled afterwards.
//!    c. The same for `native_async`.
//!
//!    Each method's server-side CPU is measured too: the CPU of every process of the target
//!    cluster (and of the source, where native apply's walsender decodes the WAL while the
//!    apply worker applies it; replay read a buffer captured beforehand), from `/proc`.
//! 6. Right after each method, its database is compared with the source: `count(*)` and
//!    `verify`'s checksum over `accounts` (order-independent, TimeZone UTC; the same md5-based
//!    row checksum `walshift verify` and cutover use).
//!    A difference is an error: the bench fails and reports no number.
//! 7. The report: per method changes/s, seconds, ratio to native (sync on) and native (sync
//!    off), CPU, and walshift's peak RSS. The brief's goals: replay ≥ 5× native sync on and
//!    ≥ 2× native sync off.
//!
//! Both clusters and the bench share the machine's cores, as in production on one host; the
//! methods run one at a time so none competes with another.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::workload::{self, Workload};
use super::{BenchError, dir_size, timed};
use crate::localpg::{Cluster, ClusterOptions};
use crate::lsn::Lsn;
use crate::source::slot::{DEFAULT_PUBLICATION, DEFAULT_SLOT};

/// What to measure.
#[derive(Clone, Debug, Default)]
pub struct ReplayBench {
    /// The workload (default W).
    pub workload: Workload,
    /// `--batch-rows` for `walshift replay`; `None` keeps replay's default.
    pub batch_rows: Option<usize>,
    /// `--apply-connections` for `walshift replay`; `None` keeps replay's default.
    pub apply_connections: Option<usize>,
    /// Also time replay through a migration mapping, into its own target database. Default
    /// none.
    pub transform: Option<TransformBench>,
}

/// Replay through a mapping, measured right after identity replay on the same backlog.
///
/// Its target database starts with the same rows as the others, then `migration` (the
/// release's SQL, untimed) brings it to the mapping's schema; after replay it is compared with
/// the source *through the mapping* ([`crate::verify`]).
#[derive(Clone, Debug)]
pub struct TransformBench {
    /// The mapping file (`walshift replay --transform`).
    pub mapping: std::path::PathBuf,
    /// SQL run on the transform target before replay, untimed.
    pub migration: Option<std::path::PathBuf>,
}

/// One method's measurement.
#[derive(Clone, Debug, serde::Serialize)]
pub struct MethodResult {
    /// `walshift replay`, `native sync on`, `native sync off`.
    pub method: &'static str,
    pub seconds: f64,
    pub changes_per_sec: f64,
    /// This method's changes/s over native (sync on)'s.
    pub vs_native_sync_on: f64,
    /// This method's changes/s over native (sync off)'s.
    pub vs_native_sync_off: f64,
    /// CPU seconds (user + system) of the walshift process; `None` for native apply.
    pub client_cpu_seconds: Option<f64>,
    /// Peak resident set of the walshift process in bytes; `None` for native apply.
    pub peak_rss_bytes: Option<u64>,
    /// CPU seconds used by all of the target cluster's processes during the run.
    pub target_cpu_seconds: f64,
    /// CPU seconds used by all of the source cluster's processes during the run.
    pub source_cpu_seconds: f64,
    /// Target transactions committed (walshift's batches; native commits one per source
    /// transaction).
    pub target_commits: Option<u64>,
}

/// The whole measurement.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ReplayBenchReport {
    pub changes: i64,
    pub transactions: i64,
    pub txn_size: i64,
    pub initial_rows: i64,
    /// `pg_current_wal_insert_lsn()` on the source after the workload.
    pub end_lsn: Lsn,
    /// End LSN of the last source transaction.
    pub last_commit_lsn: Lsn,
    /// `walshift capture` of the backlog (not part of the comparison).
    pub capture_seconds: f64,
    pub buffer_bytes: u64,
    /// Rows in `accounts` at the end, on the source and on every target.
    pub rows: i64,
    /// `verify`'s md5-based checksum of `accounts`, on the source and every target.
    pub checksum: String,
    pub results: Vec<MethodResult>,
    /// Replay ≥ 5× native (sync on).
    pub goal_sync_on_met: bool,
    /// Replay ≥ 2× native (sync off).
    pub goal_sync_off_met: bool,
    /// Replay through the mapping, changes/s over identity replay's (with `--transform`).
    pub transform_vs_identity: Option<f64>,
}

const WALSHIFT: &str = "walshift replay";
const NATIVE_SYNC: &str = "native sync on";
const NATIVE_ASYNC: &str = "native sync off";
const WALSHIFT_TRANSFORM: &str = "walshift replay + transform";

/// Native apply that makes no progress for this long is declared stuck.
const STALL: Duration = Duration::from_secs(120);

/// CPU time used so far by a cluster: every live process under its postmaster plus the
/// postmaster itself, including the children it has already reaped (`cutime`, `cstime`).
/// Differences of two readings give the cluster's CPU over an interval. Zero where `/proc`
/// is not readable (the measurement is then missing, not wrong).
fn cluster_cpu(cluster: &Cluster) -> Duration {
    let Some(pm) = std::fs::read_to_string(cluster.data_dir().join("postmaster.pid"))
        .ok()
        .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<u32>().ok()))
    else {
        return Duration::ZERO;
    };
    // Fields after the command name (which may hold spaces): state is index 0, ppid 1,
    // utime 11, stime 12, cutime 13, cstime 14.
    let fields = |pid: &str| -> Option<Vec<u64>> {
        let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let rest = &s[s.rfind(')')? + 2..];
        Some(
            rest.split_whitespace()
                .map(|f| f.parse::<i64>().unwrap_or(0).max(0) as u64)
                .collect(),
        )
    };
    let mut ticks = 0u64;
    if let Some(f) = fields(&pm.to_string())
        && f.len() > 14
    {
        ticks += f[11] + f[12] + f[13] + f[14];
    }
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let name = e.file_name();
            let Some(pid) = name.to_str() else { continue };
            if !pid.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            if let Some(f) = fields(pid)
                && f.len() > 12
                && f[1] == pm as u64
            {
                ticks += f[11] + f[12];
            }
        }
    }
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_nanos(ticks * 1_000_000_000 / hz)
}

/// Row count and order-independent checksum of `accounts`.
async fn fingerprint(client: &Client) -> Result<(i64, String), BenchError> {
    client.batch_execute("SET TimeZone = 'UTC'").await?;
    let columns: Vec<String> = ["id", "owner", "balance", "note", "updated_at"]
        .map(String::from)
        .into();
    let (rows, sum) = crate::verify::table_summary(
        client,
        &crate::transform::TableName::new("public", "accounts"),
        &columns,
        true,
    )
    .await?;
    Ok((rows, sum.unwrap_or_default()))
}

fn parse_lsn(method: &str, s: &str) -> Result<Lsn, BenchError> {
    s.parse().map_err(|_| BenchError::Check {
        method: method.into(),
        detail: format!("unreadable LSN {s:?} from the server"),
    })
}

/// Waits until a native subscription has applied and flushed everything up to `last_commit`
/// (see the module documentation).
async fn wait_native(
    method: &str,
    source: &Client,
    target: &Client,
    slot: &str,
    origin: &str,
    end: Lsn,
    last_commit: Lsn,
) -> Result<(), BenchError> {
    let mut progress = (Lsn::ZERO, Instant::now());
    loop {
        let row = target
            .query_opt(
                "SELECT remote_lsn::text, pg_current_wal_flush_lsn() >= local_lsn
                 FROM pg_replication_origin_status WHERE external_id = $1",
                &[&origin],
            )
            .await?;
        if let Some(row) = row {
            let remote: Option<String> = row.get(0);
            let flushed: Option<bool> = row.get(1);
            let remote = match remote {
                Some(r) => parse_lsn(method, &r)?,
                None => Lsn::ZERO,
            };
            if remote >= last_commit && flushed == Some(true) {
                return Ok(());
            }
            if remote > progress.0 {
                progress = (remote, Instant::now());
            }
        }
        let confirmed = crate::source::slot::read(source, slot)
            .await?
            .ok_or_else(|| BenchError::Check {
                method: method.into(),
                detail: format!("slot {slot:?} is gone from the source"),
            })?
            .confirmed_flush_lsn;
        if confirmed.is_some_and(|c| c >= end) {
            return Ok(());
        }
        if progress.1.elapsed() > STALL {
            let error: Option<String> = target
                .query_opt(
                    "SELECT 'apply worker pid ' || coalesce(pid::text, 'none') FROM pg_stat_subscription
                     WHERE subname = $1",
                    &[&slot],
                )
                .await?
                .map(|r| r.get(0));
            return Err(BenchError::Check {
                method: method.into(),
                detail: format!(
                    "no progress for {} s (applied up to {}, waiting for {last_commit}; {}); see the target's server log",
                    STALL.as_secs(),
                    progress.0,
                    error.unwrap_or_else(|| "no apply worker".into())
                ),
            });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Compares a target database with the source's fingerprint.
async fn verify(method: &str, target: &Client, expected: &(i64, String)) -> Result<(), BenchError> {
    let got = fingerprint(target).await?;
    if &got != expected {
        return Err(BenchError::Check {
            method: method.into(),
            detail: format!(
                "target differs from the source: {} rows, checksum {} (source: {} rows, checksum {})",
                got.0, got.1, expected.0, expected.1
            ),
        });
    }
    Ok(())
}

impl ReplayBench {
    /// Runs the measurement. `walshift` is the path of the walshift binary to measure.
    pub async fn run(
        &self,
        walshift: &Path,
        log: impl Fn(&str),
    ) -> Result<ReplayBenchReport, BenchError> {
        let w = &self.workload;
        let options = || {
            ClusterOptions::default()
                .setting("fsync", "on")
                // The logical replication launcher starts a subscription's apply worker at
                // most once per this interval (default 5 s): keep it from delaying the second
                // native run's start.
                .setting("wal_retrieve_retry_interval", "'50ms'")
                .setting("max_wal_size", "'16GB'")
                .setting("checkpoint_timeout", "'1h'")
                .setting("max_replication_slots", "10")
                .setting("max_wal_senders", "10")
        };
        log("starting the source and target clusters");
        let source_cluster = Cluster::start(options())?;
        let target_cluster = Cluster::start(options())?;
        let source = source_cluster.connect("postgres").await?;
        let source_conn = source_cluster.conn_string("postgres");

        log(&format!(
            "loading {} accounts on the source",
            w.initial_rows
        ));
        workload::load(&source, w).await?;
        source
            .batch_execute(&format!(
                "CREATE PUBLICATION {DEFAULT_PUBLICATION} FOR TABLE accounts"
            ))
            .await?;

        let natives = [
            (NATIVE_SYNC, "native_sync", "on"),
            (NATIVE_ASYNC, "native_async", "off"),
        ];
        source
            .batch_execute(&format!(
                "SELECT pg_create_logical_replication_slot('{DEFAULT_SLOT}', 'pgoutput');
                 SELECT pg_create_logical_replication_slot('native_sync', 'pgoutput');
                 SELECT pg_create_logical_replication_slot('native_async', 'pgoutput');",
            ))
            .await?;

        let mapping = match &self.transform {
            Some(t) => Some(crate::transform::Mapping::load(&t.mapping).map_err(|e| {
                BenchError::Check {
                    method: WALSHIFT_TRANSFORM.into(),
                    detail: e.to_string(),
                }
            })?),
            None => None,
        };
        let mut dbs = vec!["ws", "native_sync", "native_async"];
        if mapping.is_some() {
            dbs.push("wst");
        }
        let mut targets = Vec::new();
        for db in dbs {
            log(&format!(
                "loading {} accounts into target database {db}",
                w.initial_rows
            ));
            target_cluster.create_database(db).await?;
            let client = target_cluster.connect(db).await?;
            workload::load(&client, w).await?;
            if db == "wst"
                && let Some(sql) = self.transform.as_ref().and_then(|t| t.migration.as_ref())
            {
                log(&format!("running the migration {} on wst", sql.display()));
                client.batch_execute(&std::fs::read_to_string(sql)?).await?;
                // As after any backfill (and as `load` leaves the other targets): no dead
                // tuples from the migration's UPDATEs, fresh statistics.
                client.batch_execute("VACUUM ANALYZE").await?;
            }
            targets.push(client);
        }
        let mut origins = Vec::new();
        for (i, (_, name, sync)) in natives.iter().enumerate() {
            let client = &targets[i + 1];
            client
                .batch_execute(&format!(
                    "CREATE SUBSCRIPTION {name} CONNECTION '{}' PUBLICATION {DEFAULT_PUBLICATION}
                     WITH (create_slot = false, slot_name = '{name}', copy_data = false,
                           enabled = false, synchronous_commit = '{sync}')",
                    source_conn.replace('\'', "''")
                ))
                .await?;
            let oid: u32 = client
                .query_one(
                    "SELECT oid FROM pg_subscription WHERE subname = $1",
                    &[name],
                )
                .await?
                .get(0);
            origins.push(format!("pg_{oid}"));
        }

        log(&format!(
            "committing {} changes in transactions of {} on the source",
            w.changes, w.txn_size
        ));
        let transactions = workload::run(&source, w).await?;
        let end: String = source
            .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
            .await?
            .get(0);
        let end_lsn = parse_lsn("source", &end)?;
        source.batch_execute("CHECKPOINT").await?;
        let expected = fingerprint(&source).await?;

        log(&format!(
            "capturing the backlog up to {end_lsn} (not timed)"
        ));
        let scratch = tempfile::tempdir()?;
        let buffer = scratch.path().join("buffer");
        let mut capture = Command::new(walshift);
        capture
            .arg("capture")
            .arg("--source")
            .arg(&source_conn)
            .arg("--buffer")
            .arg(&buffer)
            .arg(format!("--slot={DEFAULT_SLOT}"))
            // Created above, before the workload, so the buffer takes it over.
            .arg("--adopt-slot")
            .arg(format!("--publication={DEFAULT_PUBLICATION}"))
            .arg(format!("--until-lsn={end_lsn}"))
            .arg("--no-progress")
            .arg("--json");
        let captured = timed("walshift capture", capture)?;
        let report = json_report("walshift capture", &captured.stdout)?;
        let got = report["changes"].as_i64().unwrap_or(-1);
        if got != w.changes {
            return Err(BenchError::Check {
                method: "walshift capture".into(),
                detail: format!("captured {got} changes, the workload made {}", w.changes),
            });
        }

        let mut results = Vec::new();

        // (a) walshift replay, then (a') through the mapping if asked.
        let mut runs = vec![(WALSHIFT, "ws", 0usize)];
        if mapping.is_some() {
            runs.push((WALSHIFT_TRANSFORM, "wst", 3));
        }
        let mut last_commit = Lsn::ZERO;
        for (method, db, idx) in runs {
            target_cluster.execute("postgres", "CHECKPOINT").await?;
            let mut replay = Command::new(walshift);
            replay
                .arg("replay")
                .arg("--buffer")
                .arg(&buffer)
                .arg("--target")
                .arg(target_cluster.conn_string(db))
                // The bench loads its targets itself, at the slot's snapshot.
                .arg("--target-not-cloned-by-walshift")
                .arg("--json");
            if let Some(n) = self.batch_rows {
                replay.arg(format!("--batch-rows={n}"));
            }
            if let Some(n) = self.apply_connections {
                replay.arg(format!("--apply-connections={n}"));
            }
            if method == WALSHIFT_TRANSFORM
                && let Some(t) = &self.transform
            {
                replay.arg("--transform").arg(&t.mapping);
            }
            log(&format!("timing {method}"));
            let (t0, s0) = (cluster_cpu(&target_cluster), cluster_cpu(&source_cluster));
            let ran = timed(method, replay)?;
            // Replay's server backend has its CPU counted once the postmaster has reaped it:
            // wait for it to leave (untimed), or a reading taken mid-exit would miss it.
            let settle = Instant::now();
            while settle.elapsed() < Duration::from_secs(5) {
                let others: i64 = targets[idx]
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity
                         WHERE datname = current_database() AND pid <> pg_backend_pid()",
                        &[],
                    )
                    .await?
                    .get(0);
                if others == 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            let (t1, s1) = (cluster_cpu(&target_cluster), cluster_cpu(&source_cluster));
            let report = json_report(method, &ran.stdout)?;
            let applied = report["changes"].as_i64().unwrap_or(-1);
            if applied != w.changes {
                return Err(BenchError::Check {
                    method: method.into(),
                    detail: format!("applied {applied} changes, the workload made {}", w.changes),
                });
            }
            last_commit = parse_lsn(method, report["applied_lsn"].as_str().unwrap_or(""))?;
            if last_commit > end_lsn || last_commit == Lsn::ZERO {
                return Err(BenchError::Check {
                    method: method.into(),
                    detail: format!(
                        "applied up to {last_commit}, outside the backlog (end {end_lsn})"
                    ),
                });
            }
            match &mapping {
                Some(m) if method == WALSHIFT_TRANSFORM => {
                    let v = crate::verify::verify(
                        &source,
                        &targets[idx],
                        m,
                        &[crate::transform::TableName::new("public", "accounts")],
                        &crate::verify::VerifyOptions::default(),
                    )
                    .await
                    .map_err(|e| BenchError::Check {
                        method: method.into(),
                        detail: format!("verify through the mapping failed: {e}"),
                    })?;
                    if !v.equal() {
                        return Err(BenchError::Check {
                            method: method.into(),
                            detail: format!(
                                "target differs from source + mapping: {}",
                                serde_json::to_string(&v).unwrap_or_default()
                            ),
                        });
                    }
                }
                _ => verify(method, &targets[idx], &expected).await?,
            }
            results.push(self.result(
                method,
                ran.wall,
                Some(ran.cpu),
                Some(ran.max_rss_bytes),
                t1.saturating_sub(t0),
                s1.saturating_sub(s0),
                report["batches"].as_u64(),
            ));
            log(&results.last().expect("pushed").line());
            log(&format!(
                "  {} target connection(s); writer busy {:.2} s; replay waited {:.2} s for it (the rest of the wall time it read and folded)",
                report["apply_connections"].as_u64().unwrap_or(1),
                report["writer_busy_secs"].as_f64().unwrap_or(0.0),
                report["applier_wait_secs"].as_f64().unwrap_or(0.0)
            ));
        }

        // (b), (c) native logical replication.
        for (i, (method, name, _)) in natives.iter().enumerate() {
            let client = &targets[i + 1];
            target_cluster.execute("postgres", "CHECKPOINT").await?;
            log(&format!("timing {method}"));
            let (t0, s0) = (cluster_cpu(&target_cluster), cluster_cpu(&source_cluster));
            let started = Instant::now();
            client
                .batch_execute(&format!("ALTER SUBSCRIPTION {name} ENABLE"))
                .await?;
            wait_native(
                method,
                &source,
                client,
                name,
                &origins[i],
                end_lsn,
                last_commit,
            )
            .await?;
            let took = started.elapsed();
            let (t1, s1) = (cluster_cpu(&target_cluster), cluster_cpu(&source_cluster));
            client
                .batch_execute(&format!("ALTER SUBSCRIPTION {name} DISABLE"))
                .await?;
            verify(method, client, &expected).await?;
            results.push(self.result(
                method,
                took,
                None,
                None,
                t1.saturating_sub(t0),
                s1.saturating_sub(s0),
                Some(transactions as u64),
            ));
            log(&results.last().expect("pushed").line());
        }

        let rate = |m: &str| {
            results
                .iter()
                .find(|r| r.method == m)
                .map(|r| r.changes_per_sec)
                .unwrap_or(0.0)
        };
        let (sync_on, sync_off) = (rate(NATIVE_SYNC), rate(NATIVE_ASYNC));
        for r in &mut results {
            r.vs_native_sync_on = r.changes_per_sec / sync_on.max(1e-9);
            r.vs_native_sync_off = r.changes_per_sec / sync_off.max(1e-9);
        }
        let ours = &results[0];
        let transform_vs_identity = results
            .iter()
            .find(|r| r.method == WALSHIFT_TRANSFORM)
            .map(|r| r.changes_per_sec / ours.changes_per_sec.max(1e-9));
        Ok(ReplayBenchReport {
            transform_vs_identity,
            changes: w.changes,
            transactions,
            txn_size: w.txn_size,
            initial_rows: w.initial_rows,
            end_lsn,
            last_commit_lsn: last_commit,
            capture_seconds: captured.wall.as_secs_f64(),
            buffer_bytes: dir_size(&buffer),
            rows: expected.0,
            checksum: expected.1.clone(),
            goal_sync_on_met: ours.vs_native_sync_on >= 5.0,
            goal_sync_off_met: ours.vs_native_sync_off >= 2.0,
            results,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn result(
        &self,
        method: &'static str,
        took: Duration,
        client_cpu: Option<Duration>,
        rss: Option<u64>,
        target_cpu: Duration,
        source_cpu: Duration,
        commits: Option<u64>,
    ) -> MethodResult {
        let seconds = took.as_secs_f64();
        MethodResult {
            method,
            seconds,
            changes_per_sec: self.workload.changes as f64 / seconds.max(1e-9),
            vs_native_sync_on: 0.0,
            vs_native_sync_off: 0.0,
            client_cpu_seconds: client_cpu.map(|d| d.as_secs_f64()),
            peak_rss_bytes: rss,
            target_cpu_seconds: target_cpu.as_secs_f64(),
            source_cpu_seconds: source_cpu.as_secs_f64(),
            target_commits: commits,
        }
    }
}

fn json_report(tool: &str, stdout: &str) -> Result<serde_json::Value, BenchError> {
    serde_json::from_str(stdout).map_err(|e| BenchError::Tool {
        tool: tool.into(),
        status: "unreadable report".into(),
        stderr: format!("{e}: {stdout}"),
    })
}

impl MethodResult {
    fn line(&self) -> String {
        format!(
            "{:<27} {:>7.2} s  {:>9.0} changes/s  target cpu {:>6.2} s  source cpu {:>6.2} s{}",
            self.method,
            self.seconds,
            self.changes_per_sec,
            self.target_cpu_seconds,
            self.source_cpu_seconds,
            match (self.client_cpu_seconds, self.peak_rss_bytes) {
                (Some(c), Some(r)) => format!(
                    "  walshift cpu {c:.2} s, peak RSS {:.1} MiB",
                    r as f64 / 1048576.0
                ),
                _ => String::new(),
            }
        )
    }
}

impl std::fmt::Display for ReplayBenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "replay vs native logical replication: {} row changes in {} transactions of {} on {} initial rows",
            self.changes, self.transactions, self.txn_size, self.initial_rows
        )?;
        writeln!(
            f,
            "backlog up to {} (last commit {}), captured untimed in {:.2} s into {:.1} MiB; every target verified equal to the source ({} rows, checksum {})",
            self.end_lsn,
            self.last_commit_lsn,
            self.capture_seconds,
            self.buffer_bytes as f64 / 1048576.0,
            self.rows,
            self.checksum
        )?;
        writeln!(
            f,
            "| method | changes/s | seconds | × native sync on | × native sync off | walshift CPU s | walshift peak RSS | target server CPU s | source server CPU s | target commits |"
        )?;
        writeln!(f, "|---|---|---|---|---|---|---|---|---|---|")?;
        for r in &self.results {
            writeln!(
                f,
                "| {} | {:.0} | {:.2} | {:.2} | {:.2} | {} | {} | {:.2} | {:.2} | {} |",
                r.method,
                r.changes_per_sec,
                r.seconds,
                r.vs_native_sync_on,
                r.vs_native_sync_off,
                r.client_cpu_seconds
                    .map(|c| format!("{c:.2}"))
                    .unwrap_or_else(|| "–".into()),
                r.peak_rss_bytes
                    .map(|b| format!("{:.1} MiB", b as f64 / 1048576.0))
                    .unwrap_or_else(|| "–".into()),
                r.target_cpu_seconds,
                r.source_cpu_seconds,
                r.target_commits
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "–".into()),
            )?;
        }
        let ours = &self.results[0];
        write!(
            f,
            "goals: replay ≥ 5× native sync on: {:.2}× ({}); ≥ 2× native sync off: {:.2}× ({})",
            ours.vs_native_sync_on,
            if self.goal_sync_on_met {
                "met"
            } else {
                "NOT met"
            },
            ours.vs_native_sync_off,
            if self.goal_sync_off_met {
                "met"
            } else {
                "NOT met"
            },
        )?;
        if let Some(r) = self.transform_vs_identity {
            write!(
                f,
                "\nreplay through the mapping: {r:.2}× identity replay's rate (goal: within 20%, ≥ 0.80×: {})",
                if r >= 0.8 { "met" } else { "NOT met" }
            )?;
        }
        Ok(())
    }
}
