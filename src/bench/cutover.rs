//! The cutover window under steady write load: throwaway source and target clusters,
//! `pgbench -i -s <scale>` on the source (with a primary key added to `pgbench_history`, which
//! has none), `walshift run` as a separate process (clone, capture, replay following), then
//! `runs` times: `pgbench` at `--rate` tps for a warm-up, `walshift cutover --dry-run` (the
//! projection, under the same load), then right after it the real `walshift cutover` (in this
//! process, read-only fence, `--switch true`, `--verify counts`), the source unfenced again.
//! Every phase of every run, real and projected, is kept; min / median / max per phase, and
//! per run the projected window, the real one and the projection's error, are reported.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use super::BenchError;
use crate::conn::ConnInfo;
use crate::cutover::{self, CutoverConfig, Outcome, VerifyMode};
use crate::localpg::{Cluster, ClusterOptions};

/// What to measure.
#[derive(Clone, Debug)]
pub struct CutoverBench {
    /// `pgbench` scale (100 000 accounts per unit). Default 10.
    pub scale: u32,
    /// `pgbench --rate`, transactions per second on the source. Default 500.
    pub rate: u32,
    /// `pgbench` clients. Default 4.
    pub clients: u32,
    /// Measured cutovers. Default 5.
    pub runs: usize,
    /// Load before each cutover. Default 5 s.
    pub warmup: Duration,
    /// Verification inside the window. Default counts (cutover's default).
    pub verify: VerifyMode,
    /// Cutover's [`crate::cutover::CutoverConfig::verify_sessions`]. Default cutover's.
    pub verify_sessions: usize,
    /// pgbench goes through a throwaway PgBouncer and each cutover runs in pooler mode (PAUSE,
    /// repoint, RESUME; the read-only fence on top): a fresh release per run, since the copy
    /// takes the writes after each switch. Reports what clients saw (latency max / p99,
    /// failed transactions). Default false (direct pgbench, read-only fence, `--switch true`).
    pub pooler: bool,
}

impl Default for CutoverBench {
    fn default() -> Self {
        CutoverBench {
            scale: 10,
            rate: 500,
            clients: 4,
            runs: 5,
            warmup: Duration::from_secs(5),
            verify: VerifyMode::Counts,
            verify_sessions: crate::cutover::verify::SESSIONS_PER_SIDE,
            pooler: false,
        }
    }
}

/// One cutover.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Run {
    pub run: usize,
    pub window_secs: f64,
    /// The dry run's projected window, measured right before.
    pub projected_secs: f64,
    /// (projected − real) / real, in percent.
    pub projection_error_pct: f64,
    /// (phase, seconds) in timeline order.
    pub phases: Vec<(String, f64)>,
    /// The dry run's phases.
    pub projected_phases: Vec<(String, f64)>,
    pub transactions_drained: u64,
    pub changes_drained: u64,
    pub sessions_terminated: u64,
    /// pgbench transactions per second achieved during the warm-up.
    pub source_tps: f64,
    /// Through PgBouncer only: what pgbench's clients saw over the whole load.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clients: Option<super::pooler::ClientView>,
}

/// Min / median / max of one phase over the runs, and the dry runs' median.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Stat {
    pub name: String,
    pub min_ms: f64,
    pub median_ms: f64,
    pub max_ms: f64,
    pub projected_median_ms: f64,
}

/// The window's goal: median at most this, in milliseconds.
pub const GOAL_WINDOW_MS: f64 = 100.0;

/// The projection's goal: within this many percent of the real window, in every run.
pub const GOAL_PROJECTION_PCT: f64 = 20.0;

/// The whole measurement.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CutoverBenchReport {
    pub scale: u32,
    pub rate: u32,
    pub clients: u32,
    pub verify: String,
    /// Cutover's `--verify-sessions`.
    pub verify_sessions: usize,
    /// pgbench through PgBouncer, cutover in pooler mode.
    pub pooler: bool,
    pub runs: Vec<Run>,
    /// Per phase, then `window` last.
    pub stats: Vec<Stat>,
    pub median_window_ms: f64,
    /// The largest projection error of any run, in percent (signed).
    pub worst_projection_error_pct: f64,
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.total_cmp(b));
    v
}

fn median_ms(v: &[f64]) -> f64 {
    v.get(v.len() / 2).copied().unwrap_or(0.0) * 1000.0
}

fn stat(name: &str, real: Vec<f64>, projected: Vec<f64>) -> Stat {
    let v = sorted(real);
    let pick = |i: usize| v.get(i).copied().unwrap_or(0.0) * 1000.0;
    Stat {
        name: name.to_owned(),
        min_ms: pick(0),
        median_ms: median_ms(&v),
        max_ms: pick(v.len().saturating_sub(1)),
        projected_median_ms: median_ms(&sorted(projected)),
    }
}

impl std::fmt::Display for CutoverBenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "cutover window under pgbench (scale {}, --rate {} tps, {} clients{}), verify {} over {} session(s) per side, {} runs",
            self.scale,
            self.rate,
            self.clients,
            if self.pooler {
                ", through PgBouncer: cutover --pooler"
            } else {
                ""
            },
            self.verify,
            self.verify_sessions,
            self.runs.len()
        )?;
        writeln!(
            f,
            "{:<11} {:>10} {:>10} {:>10} {:>14}",
            "phase", "min ms", "median ms", "max ms", "dry-run median"
        )?;
        for s in &self.stats {
            writeln!(
                f,
                "{:<11} {:>10.1} {:>10.1} {:>10.1} {:>14.1}",
                s.name, s.min_ms, s.median_ms, s.max_ms, s.projected_median_ms
            )?;
        }
        for r in &self.runs {
            writeln!(
                f,
                "run {}: window {:.1} ms, projected {:.1} ms ({:+.1} %), drained {} transactions / {} changes, \
                 {} sessions terminated, source at {:.0} tps",
                r.run,
                r.window_secs * 1000.0,
                r.projected_secs * 1000.0,
                r.projection_error_pct,
                r.transactions_drained,
                r.changes_drained,
                r.sessions_terminated,
                r.source_tps
            )?;
        }
        let seen: Vec<&super::pooler::ClientView> = self
            .runs
            .iter()
            .filter_map(|r| r.clients.as_ref())
            .collect();
        for (r, c) in self
            .runs
            .iter()
            .filter_map(|r| r.clients.as_ref().map(|c| (r, c)))
        {
            writeln!(f, "run {}: clients {c}", r.run)?;
        }
        if !seen.is_empty() {
            let max = seen.iter().map(|c| c.max_ms).fold(0.0, f64::max);
            let errors: u64 = seen.iter().map(|c| c.errors()).sum();
            writeln!(
                f,
                "max client stall {max:.1} ms (goal ≤ {:.0} ms), client errors {errors} (goal 0)",
                super::pooler::GOAL_STALL_MS
            )?;
        }
        writeln!(
            f,
            "worst projection error {:+.1} % (goal within ±{GOAL_PROJECTION_PCT:.0} % in every run)",
            self.worst_projection_error_pct
        )?;
        write!(
            f,
            "median window {:.1} ms (goal ≤ {GOAL_WINDOW_MS:.0} ms)",
            self.median_window_ms
        )
    }
}

pub(super) fn tool_error(tool: &str, status: impl std::fmt::Display, stderr: &[u8]) -> BenchError {
    BenchError::Tool {
        tool: tool.into(),
        status: status.to_string(),
        stderr: String::from_utf8_lossy(stderr).into_owned(),
    }
}

/// A release under way: both clusters (pgbench's tables on the source, cloned to the target)
/// and `walshift run` streaming between them.
pub(super) struct Release {
    pub(super) source: Cluster,
    pub(super) target: Cluster,
    pub(super) dir: tempfile::TempDir,
    pub(super) run: tokio::process::Child,
    pub(super) pgbench: std::path::PathBuf,
}

impl Release {
    /// Stops `walshift run` (its control socket, then a kill after 30 s).
    pub(super) async fn stop(mut self) {
        let _ = crate::run::control::request(self.dir.path(), "stop").await;
        if tokio::time::timeout(Duration::from_secs(30), self.run.wait())
            .await
            .is_err()
        {
            let _ = self.run.kill().await;
        }
    }
}

impl CutoverBench {
    /// Throwaway clusters, `pgbench -i` on the source (with a primary key added to
    /// `pgbench_history`), `walshift run` cloning and then streaming.
    pub(super) async fn prepare(
        &self,
        walshift: &Path,
        log: &impl Fn(&str),
    ) -> Result<Release, BenchError> {
        let opts = || {
            ClusterOptions::default()
                .setting("max_wal_size", "'4GB'")
                .setting("checkpoint_timeout", "'30min'")
        };
        let (a, b) = (
            std::thread::spawn(move || Cluster::start(opts())),
            std::thread::spawn(move || Cluster::start(opts())),
        );
        let source = a.join().expect("cluster thread")?;
        let target = b.join().expect("cluster thread")?;
        let pgbench = source.binaries().program("pgbench");
        let port = source.port().to_string();
        let pg_args = ["-h", "127.0.0.1", "-p", port.as_str(), "-U", "postgres"];

        log(&format!("pgbench -i -s {} on the source", self.scale));
        let out = tokio::process::Command::new(&pgbench)
            .args(["-i", "-q", "-s", &self.scale.to_string()])
            .args(pg_args)
            .arg("postgres")
            .output()
            .await?;
        if !out.status.success() {
            return Err(tool_error("pgbench -i", out.status, &out.stderr));
        }
        source
            .execute(
                "postgres",
                "ALTER TABLE pgbench_history ADD COLUMN id bigserial PRIMARY KEY",
            )
            .await?;

        let dir = tempfile::tempdir()?;
        let (sc, tc) = (
            source.conn_string("postgres"),
            target.conn_string("postgres"),
        );
        log("walshift run: clone, then capture and replay following");
        let mut run = tokio::process::Command::new(walshift)
            .args([
                "run",
                "--no-progress",
                "--source",
                &sc,
                "--target",
                &tc,
                "--buffer",
            ])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let started = Instant::now();
        loop {
            if let Ok(Some(v)) = crate::run::control::request(dir.path(), "status").await
                && v["phase"] == "streaming"
                && v["applied_lsn"].is_string()
            {
                break;
            }
            if let Some(status) = run.try_wait()? {
                let out = run.wait_with_output().await?;
                return Err(tool_error("walshift run", status, &out.stderr));
            }
            if started.elapsed() > Duration::from_secs(600) {
                return Err(BenchError::Check {
                    method: "walshift run".into(),
                    detail: "did not start streaming within 10 minutes".into(),
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        log(&format!(
            "clone done in {:.1} s",
            started.elapsed().as_secs_f64()
        ));

        Ok(Release {
            source,
            target,
            dir,
            run,
            pgbench,
        })
    }
}

impl CutoverBench {
    /// Runs the measurement. `walshift` is the binary started as `walshift run`.
    pub async fn run(
        &self,
        walshift: &Path,
        log: impl Fn(&str),
    ) -> Result<CutoverBenchReport, BenchError> {
        if self.pooler {
            return self.run_pooled(walshift, log).await;
        }
        let Release {
            source,
            target,
            dir,
            run,
            pgbench,
        } = self.prepare(walshift, &log).await?;
        let port = source.port().to_string();
        let pg_args = ["-h", "127.0.0.1", "-p", port.as_str(), "-U", "postgres"];
        let (sc, tc) = (
            source.conn_string("postgres"),
            target.conn_string("postgres"),
        );

        let mut runs = Vec::new();
        for i in 1..=self.runs {
            // A new session each time: the previous cutover's fence terminated the last one.
            let admin = source.connect("postgres").await?;
            admin
                .batch_execute("SET default_transaction_read_only = off")
                .await?;
            admin
                .batch_execute("ALTER DATABASE postgres RESET default_transaction_read_only")
                .await?;
            let before: i64 = admin
                .query_one("SELECT count(*) FROM pgbench_history", &[])
                .await?
                .get(0);
            let load_start = Instant::now();
            let mut bench = tokio::process::Command::new(&pgbench)
                .args(["-n", "-T", "600", "-j", "2"])
                .args([
                    "-c",
                    &self.clients.to_string(),
                    "-R",
                    &self.rate.to_string(),
                ])
                .args(pg_args)
                .arg("postgres")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()?;
            tokio::time::sleep(self.warmup).await;
            if let Some(status) = bench.try_wait()? {
                return Err(tool_error("pgbench", status, b"ended before the cutover"));
            }
            let after: i64 = admin
                .query_one("SELECT count(*) FROM pgbench_history", &[])
                .await?
                .get(0);
            let tps = (after - before) as f64 / load_start.elapsed().as_secs_f64();

            let mut cfg = CutoverConfig::new(
                ConnInfo::parse(&sc).map_err(|e| BenchError::Check {
                    method: "cutover".into(),
                    detail: e.to_string(),
                })?,
                ConnInfo::parse(&tc).map_err(|e| BenchError::Check {
                    method: "cutover".into(),
                    detail: e.to_string(),
                })?,
                dir.path(),
            );
            cfg.verify = self.verify;
            cfg.verify_sessions = self.verify_sessions;
            cfg.switch = Some("true".into());
            cfg.preflight_timeout = Some(Duration::from_secs(300));
            let (r, _) = cut_over(i, cfg, tps, &log).await?;
            runs.push(r);
            // A switched cutover's journal makes every later cutover of the buffer refuse (the
            // switch is never repeated); this buffer and its clusters are throwaway, and the
            // next run unfences the source first.
            let journal = dir.path().join(cutover::journal::JOURNAL_FILE);
            std::fs::remove_file(&journal)?;
            // pgbench's sessions were terminated by the fence: it ends with an error.
            if tokio::time::timeout(Duration::from_secs(10), bench.wait())
                .await
                .is_err()
            {
                let _ = bench.kill().await;
            }
        }
        let admin = source.connect("postgres").await?;
        admin
            .batch_execute("SET default_transaction_read_only = off")
            .await?;
        admin
            .batch_execute("ALTER DATABASE postgres RESET default_transaction_read_only")
            .await?;
        Release {
            source,
            target,
            dir,
            run,
            pgbench,
        }
        .stop()
        .await;
        Ok(self.report(runs))
    }

    /// Min / median / max per phase, the window, the worst projection.
    pub(super) fn report(&self, runs: Vec<Run>) -> CutoverBenchReport {
        let mut stats = Vec::new();
        for name in [
            "preflight",
            "fence",
            "marker",
            "drain",
            "sequences",
            "verify",
            "switch",
        ] {
            let of = |phases: &[(String, f64)]| phases.iter().find(|(n, _)| n == name).map(|p| p.1);
            stats.push(stat(
                name,
                runs.iter().filter_map(|r| of(&r.phases)).collect(),
                runs.iter()
                    .filter_map(|r| of(&r.projected_phases))
                    .collect(),
            ));
        }
        let window = stat(
            "window",
            runs.iter().map(|r| r.window_secs).collect(),
            runs.iter().map(|r| r.projected_secs).collect(),
        );
        let median_window_ms = window.median_ms;
        stats.push(window);
        let worst_projection_error_pct = runs
            .iter()
            .map(|r| r.projection_error_pct)
            .max_by(|a, b| a.abs().total_cmp(&b.abs()))
            .unwrap_or(0.0);
        CutoverBenchReport {
            scale: self.scale,
            rate: self.rate,
            clients: self.clients,
            verify: self.verify.as_str().into(),
            verify_sessions: self.verify_sessions,
            pooler: self.pooler,
            runs,
            stats,
            median_window_ms,
            worst_projection_error_pct,
        }
    }
}

/// A dry run, then right after it the cutover itself (which must switch); the run's figures
/// (client-side ones left empty) and the cutover's report.
pub(super) async fn cut_over(
    i: usize,
    cfg: CutoverConfig,
    tps: f64,
    log: &impl Fn(&str),
) -> Result<(Run, cutover::CutoverReport), BenchError> {
    let mut dry = cfg.clone();
    dry.dry_run = true;
    let projection = cutover::run(dry, std::future::pending())
        .await
        .map_err(|e| BenchError::Check {
            method: format!("cutover --dry-run {i}"),
            detail: e.to_string(),
        })?;
    let Some(projected) = projection.window_secs else {
        return Err(BenchError::Check {
            method: format!("cutover --dry-run {i}"),
            detail: format!("no projected window:\n{projection}"),
        });
    };
    let report = cutover::run(cfg, std::future::pending())
        .await
        .map_err(|e| BenchError::Check {
            method: format!("cutover run {i}"),
            detail: e.to_string(),
        })?;
    if report.outcome != Outcome::Switched {
        return Err(BenchError::Check {
            method: format!("cutover run {i}"),
            detail: format!("{report}"),
        });
    }
    let window = report.window_secs.unwrap_or(0.0);
    let timeline = |r: &cutover::CutoverReport| -> Vec<(String, f64)> {
        r.phases
            .iter()
            .map(|p| (p.name.clone(), p.duration_secs))
            .collect()
    };
    let r = Run {
        run: i,
        window_secs: window,
        projected_secs: projected,
        projection_error_pct: if window > 0.0 {
            (projected - window) / window * 100.0
        } else {
            0.0
        },
        phases: timeline(&report),
        projected_phases: timeline(&projection),
        transactions_drained: report.transactions_drained,
        changes_drained: report.changes_drained,
        sessions_terminated: report.sessions_terminated,
        source_tps: tps,
        clients: None,
    };
    let phases = |p: &[(String, f64)]| {
        p.iter()
            .map(|(n, s)| format!("{n} {:.1}", s * 1000.0))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let verify_note = |r: &cutover::CutoverReport| {
        r.phases
            .iter()
            .find(|p| p.name == "verify")
            .map(|p| p.note.clone())
            .unwrap_or_default()
    };
    log(&format!(
        "run {i}: window {:.1} ms ({}); projected {:.1} ms ({}), error {:+.1} %; \
             verify: {} (dry run: {})",
        r.window_secs * 1000.0,
        phases(&r.phases),
        r.projected_secs * 1000.0,
        phases(&r.projected_phases),
        r.projection_error_pct,
        verify_note(&report),
        verify_note(&projection),
    ));
    Ok((r, report))
}
