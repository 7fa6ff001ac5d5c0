//! `bench cutover --pooler`: the cutover window and what clients see of it when PgBouncer
//! holds them. Each run is a fresh release — clusters, `pgbench -i`, `walshift run` cloning and
//! streaming — behind a new throwaway PgBouncer (transaction pooling), because after the switch
//! the copy takes pgbench's writes and is no longer a copy to cut over again. pgbench runs
//! through PgBouncer at `--rate` for the warm-up, across a dry run and the cutover (pooler
//! mode, read-only fence on top, no switch hook), and on the copy until its `-T` ends; its
//! per-transaction log (`-l`) gives the client-visible stall (latency max and p99, and the
//! max including schedule lag), its summary the failed transactions.

use std::process::Stdio;
use std::time::{Duration, Instant};

use super::BenchError;
use super::cutover::{CutoverBench, CutoverBenchReport, cut_over};
use crate::conn::ConnInfo;
use crate::cutover::{CutoverConfig, PoolerConfig};
use crate::localpg::{PgBouncer, PoolerOptions};

/// The client-visible stall's goal: no transaction slower than this, in milliseconds.
pub const GOAL_STALL_MS: f64 = 500.0;

/// The pooler's name for the bench database.
const POOL: &str = "bench";

/// Seconds pgbench runs after the warm-up: the dry run and the cutover happen in them, and
/// pgbench then runs on the copy.
const LOAD_AFTER_SECS: u64 = 12;

/// What pgbench's clients saw over one run's whole load.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct ClientView {
    /// Transactions pgbench reports processed.
    pub transactions: u64,
    /// Transactions pgbench reports failed.
    pub failed: u64,
    /// pgbench exited with an error (a client aborted: an error it does not retry).
    pub aborted: bool,
    /// Longest transaction latency.
    pub max_ms: f64,
    /// 99th percentile of transaction latency.
    pub p99_ms: f64,
    /// Longest latency plus schedule lag (how late against `--rate`'s schedule a transaction
    /// finished: a client held by the pause also starts its next transactions late).
    pub max_with_lag_ms: f64,
}

impl ClientView {
    /// Failed transactions, plus one for an aborted pgbench.
    pub fn errors(&self) -> u64 {
        self.failed + u64::from(self.aborted)
    }
}

impl std::fmt::Display for ClientView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} transactions, {} failed{}; latency max {:.1} ms, p99 {:.1} ms; with schedule lag max {:.1} ms",
            self.transactions,
            self.failed,
            if self.aborted {
                ", pgbench ABORTED"
            } else {
                ""
            },
            self.max_ms,
            self.p99_ms,
            self.max_with_lag_ms
        )
    }
}

/// Reads pgbench's per-transaction log lines (`client_id transaction_no time script_no
/// time_epoch time_us [schedule_lag …]`; `time` is the latency in µs, or `failed` / `skipped`):
/// latencies in ms, latencies plus schedule lag in ms, and the failed count.
pub fn read_log(text: &str) -> (Vec<f64>, Vec<f64>, u64) {
    let (mut lat, mut with_lag, mut failed) = (Vec::new(), Vec::new(), 0);
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let Some(time) = f.get(2) else { continue };
        match time.parse::<f64>() {
            Ok(us) => {
                let lag = f.get(6).and_then(|l| l.parse::<f64>().ok()).unwrap_or(0.0);
                lat.push(us / 1000.0);
                with_lag.push((us + lag) / 1000.0);
            }
            Err(_) if *time == "failed" => failed += 1,
            Err(_) => {}
        }
    }
    (lat, with_lag, failed)
}

/// Max and 99th percentile (nearest rank) of `v`, 0 when empty.
fn max_p99(mut v: Vec<f64>) -> (f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((v.len() as f64) * 0.99).ceil() as usize;
    (v[v.len() - 1], v[rank.clamp(1, v.len()) - 1])
}

/// A number after `prefix` on a line of pgbench's summary (`123` or `123/456`).
fn summary_number(stdout: &str, prefix: &str) -> Option<u64> {
    stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix(prefix))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.split('/').next())
        .and_then(|n| n.parse().ok())
}

fn check(method: String, detail: impl std::fmt::Display) -> BenchError {
    BenchError::Check {
        method,
        detail: detail.to_string(),
    }
}

impl CutoverBench {
    /// The pooler variant of [`CutoverBench::run`] (see the module docs).
    pub(super) async fn run_pooled(
        &self,
        walshift: &std::path::Path,
        log: impl Fn(&str),
    ) -> Result<CutoverBenchReport, BenchError> {
        let mut runs = Vec::new();
        for i in 1..=self.runs {
            log(&format!(
                "run {i}: a fresh release behind a new PgBouncer (the copy takes the writes after each switch)"
            ));
            let release = self.prepare(walshift, &log).await?;
            let bouncer = PgBouncer::start(PoolerOptions::new().database(
                POOL,
                &format!(
                    "host=127.0.0.1 port={} dbname=postgres",
                    release.source.port()
                ),
            ))?;
            let logs = tempfile::tempdir()?;
            let secs = self.warmup.as_secs() + LOAD_AFTER_SECS;
            let pb_port = bouncer.port().to_string();
            let mut bench = tokio::process::Command::new(&release.pgbench)
                .args(["-n", "-j", "2", "-T", &secs.to_string()])
                .args(["-c", &self.clients.to_string()])
                .args(["-R", &self.rate.to_string(), "-l", "--log-prefix"])
                .arg(logs.path().join("tx"))
                .args(["-h", "127.0.0.1", "-p", &pb_port, "-U", "postgres", POOL])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .spawn()?;
            let direct = release.source.connect("postgres").await?;
            let count = "SELECT count(*) FROM pgbench_history";
            let before: i64 = direct.query_one(count, &[]).await?.get(0);
            let load_start = Instant::now();
            tokio::time::sleep(self.warmup).await;
            if bench.try_wait()?.is_some() {
                let out = bench.wait_with_output().await?;
                return Err(super::cutover::tool_error(
                    "pgbench (through PgBouncer)",
                    out.status,
                    &out.stderr,
                ));
            }
            let after: i64 = direct.query_one(count, &[]).await?.get(0);
            drop(direct);
            let tps = (after - before) as f64 / load_start.elapsed().as_secs_f64();

            let conn = |c: &crate::localpg::Cluster| {
                ConnInfo::parse(&c.conn_string("postgres")).map_err(|e| check("cutover".into(), e))
            };
            let mut cfg = CutoverConfig::new(
                conn(&release.source)?,
                conn(&release.target)?,
                release.dir.path(),
            );
            cfg.verify = self.verify;
            cfg.verify_sessions = self.verify_sessions;
            cfg.preflight_timeout = Some(Duration::from_secs(300));
            cfg.pooler = Some(PoolerConfig {
                admin: ConnInfo::parse(&bouncer.admin_conn_string())
                    .map_err(|e| check("cutover --pooler".into(), e))?,
                database: POOL.into(),
                databases_file: bouncer.databases_file(),
                target_entry: None,
            });
            let (mut r, _) = cut_over(i, cfg, tps, &log).await?;
            if bench.try_wait()?.is_some() {
                return Err(check(
                    format!("bench cutover --pooler run {i}"),
                    format!(
                        "pgbench's load ({secs} s) ended before the cutover did: the stall was not seen \
                         whole; lower --warmup-secs or find why preflight waited"
                    ),
                ));
            }
            let out =
                tokio::time::timeout(Duration::from_secs(secs + 60), bench.wait_with_output())
                    .await
                    .map_err(|_| check(format!("pgbench run {i}"), "did not end"))??;
            let stdout = String::from_utf8_lossy(&out.stdout);
            let mut text = String::new();
            for entry in std::fs::read_dir(logs.path())? {
                text.push_str(&std::fs::read_to_string(entry?.path())?);
            }
            let (lat, with_lag, failed_logged) = read_log(&text);
            let (max_ms, p99_ms) = max_p99(lat);
            let view = ClientView {
                transactions: summary_number(&stdout, "number of transactions actually processed:")
                    .unwrap_or(0),
                failed: summary_number(&stdout, "number of failed transactions:")
                    .unwrap_or(0)
                    .max(failed_logged),
                aborted: !out.status.success(),
                max_ms,
                p99_ms,
                max_with_lag_ms: max_p99(with_lag).0,
            };
            log(&format!("run {i}: clients {view}"));
            if view.aborted {
                log(&format!(
                    "run {i}: pgbench's errors:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            r.clients = Some(view);
            runs.push(r);
            release.stop().await;
            drop(bouncer);
        }
        Ok(self.report(runs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_latencies_lag_and_failures_from_pgbench_logs() {
        let log = "0 1 2500 0 1700000000 1000 300\n\
                   1 1 120000 0 1700000000 2000 50000\n\
                   2 1 failed 0 1700000000 3000 0\n\
                   3 1 skipped 0 1700000000 4000 0\n\
                   garbage\n";
        let (lat, with_lag, failed) = read_log(log);
        assert_eq!(lat, [2.5, 120.0]);
        assert_eq!(with_lag, [2.8, 170.0]);
        assert_eq!(failed, 1);
    }

    #[test]
    fn max_and_nearest_rank_p99() {
        assert_eq!(max_p99(vec![]), (0.0, 0.0));
        let v: Vec<f64> = (1..=200).map(f64::from).collect();
        assert_eq!(max_p99(v), (200.0, 198.0));
        assert_eq!(max_p99(vec![5.0]), (5.0, 5.0));
    }

    #[test]
    fn summary_numbers() {
        let out = "number of transactions actually processed: 4000/4000\nnumber of failed transactions: 0 (0.000%)\n";
        assert_eq!(
            summary_number(out, "number of transactions actually processed:"),
            Some(4000)
        );
        assert_eq!(
            summary_number(out, "number of failed transactions:"),
            Some(0)
        );
    }
}
