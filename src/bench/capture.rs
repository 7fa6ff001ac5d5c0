//! Capture throughput, side by side with `pg_recvlogical` in the same run: one throwaway
//! cluster, workload W committed once, and for each run two identical slots created before the
//! workload — one drained by `pg_recvlogical` into a file, the other by `walshift capture` into
//! a durable buffer, both to the same end LSN. Runs alternate which tool goes first.

use std::path::Path;
use std::process::Command;

use super::workload::{self, Workload};
use super::{BenchError, dir_size, timed};
use crate::lsn::Lsn;
use crate::testkit::{Cluster, ClusterOptions};

/// What to measure.
#[derive(Clone, Debug)]
pub struct CaptureBench {
    /// The workload (default W).
    pub workload: Workload,
    /// Measured runs per tool. Default 3; each run needs two slots.
    pub runs: usize,
}

/// One tool's timing in one run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Timing {
    pub tool: &'static str,
    pub run: usize,
    pub seconds: f64,
    pub changes_per_sec: f64,
    /// CPU seconds (user + system) the tool's process used.
    pub cpu_seconds: f64,
    pub output_bytes: u64,
}

/// The whole measurement.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CaptureBenchReport {
    pub changes: i64,
    pub transactions: i64,
    pub end_lsn: Lsn,
    pub timings: Vec<Timing>,
    pub recvlogical_median: f64,
    pub recvlogical_best: f64,
    pub walshift_median: f64,
    pub walshift_best: f64,
    /// Median over runs of walshift / pg_recvlogical changes/s (same run, same slot position).
    pub ratio_median: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

impl CaptureBench {
    /// Runs the measurement. `walshift` is the path of the walshift binary to measure.
    pub async fn run(
        &self,
        walshift: &Path,
        log: impl Fn(&str),
    ) -> Result<CaptureBenchReport, BenchError> {
        let cluster = Cluster::start(
            ClusterOptions::default()
                .setting("max_wal_size", "'8GB'")
                .setting("checkpoint_timeout", "'30min'")
                .setting("max_replication_slots", &(2 * self.runs + 4).to_string())
                .setting("max_wal_senders", &(2 * self.runs + 4).to_string()),
        )?;
        let client = cluster.connect("postgres").await?;
        log(&format!("loading {} accounts", self.workload.initial_rows));
        workload::load(&client, &self.workload).await?;
        client
            .batch_execute("CREATE PUBLICATION walshift FOR TABLE accounts")
            .await?;
        for i in 0..self.runs {
            client
                .batch_execute(&format!(
                    "SELECT pg_create_logical_replication_slot('recv_{i}', 'pgoutput');
                     SELECT pg_create_logical_replication_slot('walshift_{i}', 'pgoutput');"
                ))
                .await?;
        }
        log(&format!(
            "committing {} changes in transactions of {}",
            self.workload.changes, self.workload.txn_size
        ));
        let transactions = workload::run(&client, &self.workload).await?;
        let end: String = client
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await?
            .get(0);
        let end_lsn: Lsn = end.parse().expect("server LSN");
        let scratch = tempfile::tempdir()?;
        let conn = cluster.conn_string("postgres");
        let recvlogical = cluster.binaries().program("pg_recvlogical");
        let changes = self.workload.changes as f64;
        let mut timings = Vec::new();
        for i in 0..self.runs {
            let mut recv = Command::new(&recvlogical);
            let out_file = scratch.path().join(format!("recv_{i}.out"));
            recv.arg("-d")
                .arg(&conn)
                .arg(format!("--slot=recv_{i}"))
                .arg("--start")
                .arg(format!("--endpos={end_lsn}"))
                .arg("--no-loop")
                .arg("-o")
                .arg("proto_version=1")
                .arg("-o")
                .arg("publication_names=walshift")
                .arg("-f")
                .arg(&out_file);
            let mut ours = Command::new(walshift);
            let buf = scratch.path().join(format!("buffer_{i}"));
            ours.arg("capture")
                .arg("--source")
                .arg(&conn)
                .arg("--buffer")
                .arg(&buf)
                .arg(format!("--slot=walshift_{i}"))
                .arg("--publication=walshift")
                .arg(format!("--until-lsn={end_lsn}"))
                .arg("--no-progress")
                .arg("--json");
            let order: [(&'static str, &mut Command, &Path); 2] = if i % 2 == 0 {
                [
                    ("pg_recvlogical", &mut recv, out_file.as_path()),
                    ("walshift", &mut ours, buf.as_path()),
                ]
            } else {
                [
                    ("walshift", &mut ours, buf.as_path()),
                    ("pg_recvlogical", &mut recv, out_file.as_path()),
                ]
            };
            for (tool, cmd, out) in order {
                let cmd = std::mem::replace(cmd, Command::new("true"));
                let run = timed(tool, cmd)?;
                let (took, cpu, stdout) = (run.wall, run.cpu, run.stdout);
                if tool == "walshift" {
                    // The measurement counts only if everything arrived.
                    let report: serde_json::Value =
                        serde_json::from_str(&stdout).map_err(|e| BenchError::Tool {
                            tool: tool.into(),
                            status: "unreadable report".into(),
                            stderr: format!("{e}: {stdout}"),
                        })?;
                    let got = report["changes"].as_i64().unwrap_or(-1);
                    if got != self.workload.changes {
                        return Err(BenchError::Tool {
                            tool: tool.into(),
                            status: "incomplete capture".into(),
                            stderr: format!(
                                "captured {got} changes, the workload made {}",
                                self.workload.changes
                            ),
                        });
                    }
                }
                let t = Timing {
                    tool,
                    run: i + 1,
                    seconds: took.as_secs_f64(),
                    changes_per_sec: changes / took.as_secs_f64(),
                    cpu_seconds: cpu.as_secs_f64(),
                    output_bytes: dir_size(out),
                };
                log(&format!(
                    "run {}: {:<14} {:>7.2} s  {:>9.0} changes/s  cpu {:>5.2} s  {:>6.1} MiB",
                    t.run,
                    t.tool,
                    t.seconds,
                    t.changes_per_sec,
                    t.cpu_seconds,
                    t.output_bytes as f64 / 1048576.0
                ));
                timings.push(t);
            }
        }
        let rate = |tool: &str| {
            timings
                .iter()
                .filter(|t| t.tool == tool)
                .map(|t| t.changes_per_sec)
                .collect::<Vec<_>>()
        };
        let ratios: Vec<f64> = (1..=self.runs)
            .map(|r| {
                let get = |tool: &str| {
                    timings
                        .iter()
                        .find(|t| t.tool == tool && t.run == r)
                        .map(|t| t.changes_per_sec)
                        .unwrap_or(0.0)
                };
                get("walshift") / get("pg_recvlogical").max(1e-9)
            })
            .collect();
        Ok(CaptureBenchReport {
            changes: self.workload.changes,
            transactions,
            end_lsn,
            recvlogical_median: median(rate("pg_recvlogical")),
            recvlogical_best: rate("pg_recvlogical").into_iter().fold(0.0, f64::max),
            walshift_median: median(rate("walshift")),
            walshift_best: rate("walshift").into_iter().fold(0.0, f64::max),
            ratio_median: median(ratios),
            timings,
        })
    }
}

impl std::fmt::Display for CaptureBenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "capture throughput: {} row changes in {} transactions (end LSN {})",
            self.changes, self.transactions, self.end_lsn
        )?;
        writeln!(f, "| tool | changes/s median | best |")?;
        writeln!(f, "|---|---|---|")?;
        writeln!(
            f,
            "| pg_recvlogical → file | {:.0} | {:.0} |",
            self.recvlogical_median, self.recvlogical_best
        )?;
        writeln!(
            f,
            "| walshift capture → durable buffer | {:.0} | {:.0} |",
            self.walshift_median, self.walshift_best
        )?;
        write!(
            f,
            "walshift / pg_recvlogical, median of per-run ratios: {:.2}×",
            self.ratio_median
        )
    }
}
