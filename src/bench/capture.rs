//! Capture throughput, side by side with `pg_recvlogical` in the same run: one throwaway
//! cluster, workload W committed once, and for each run and transport two identical slots
//! created before the workload — one drained by `pg_recvlogical` into a file, the other by
//! `walshift capture` into a durable buffer, both to the same end LSN, both over the same
//! transport (Unix socket or TCP loopback). Runs alternate which tool goes first. Each tool's
//! user and system CPU is reported, and walshift's socket reads per second, bytes per read and
//! fsyncs per second, so a regression in the receive path shows in the output.

use std::path::Path;
use std::process::Command;

use super::workload::{self, Workload};
use super::{BenchError, dir_size, timed};
use crate::localpg::{Cluster, ClusterOptions};
use crate::lsn::Lsn;
use crate::source::slot::DEFAULT_PUBLICATION;

/// How both tools reach the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// The server's Unix-domain socket.
    Unix,
    /// TCP on 127.0.0.1.
    Tcp,
}

impl Transport {
    /// Parses `unix`, `tcp` or `both`.
    pub fn parse_list(s: &str) -> Result<Vec<Transport>, String> {
        match s {
            "unix" => Ok(vec![Transport::Unix]),
            "tcp" => Ok(vec![Transport::Tcp]),
            "both" => Ok(vec![Transport::Unix, Transport::Tcp]),
            other => Err(format!(
                "unknown transport {other:?}: use unix, tcp or both"
            )),
        }
    }

    fn conn_string(self, cluster: &Cluster) -> String {
        match self {
            Transport::Tcp => cluster.conn_string("postgres"),
            Transport::Unix => format!(
                "host={} port={} user=postgres dbname=postgres",
                cluster.socket_dir().display(),
                cluster.port()
            ),
        }
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Transport::Unix => "unix",
            Transport::Tcp => "tcp",
        })
    }
}

/// What to measure.
#[derive(Clone, Debug)]
pub struct CaptureBench {
    /// The workload (default W).
    pub workload: Workload,
    /// Measured runs per tool and transport. Default 3; each run needs two slots.
    pub runs: usize,
    /// Transports to measure, each with its own runs. Default both.
    pub transports: Vec<Transport>,
}

/// One tool's timing in one run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Timing {
    pub tool: &'static str,
    pub transport: Transport,
    pub run: usize,
    pub seconds: f64,
    pub changes_per_sec: f64,
    /// CPU seconds (user + system) the tool's process used.
    pub cpu_seconds: f64,
    pub user_seconds: f64,
    pub system_seconds: f64,
    pub output_bytes: u64,
    /// walshift only: socket reads that brought data, per second of streaming.
    pub reads_per_sec: Option<f64>,
    /// walshift only: bytes per socket read.
    pub bytes_per_read: Option<f64>,
    /// walshift only: buffer fsyncs per second of streaming.
    pub fsyncs_per_sec: Option<f64>,
}

/// The figures of one transport.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TransportSummary {
    pub transport: Transport,
    pub recvlogical_median: f64,
    pub recvlogical_best: f64,
    pub walshift_median: f64,
    pub walshift_best: f64,
    /// walshift / pg_recvlogical changes/s per run (same run, same slot position).
    pub ratios: Vec<f64>,
    /// Median of `ratios`.
    pub ratio_median: f64,
}

/// The whole measurement.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CaptureBenchReport {
    pub changes: i64,
    pub transactions: i64,
    pub end_lsn: Lsn,
    pub timings: Vec<Timing>,
    pub transports: Vec<TransportSummary>,
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
        let slots = 2 * self.runs * self.transports.len() + 4;
        let cluster = Cluster::start(
            ClusterOptions::default()
                .setting("max_wal_size", "'8GB'")
                .setting("checkpoint_timeout", "'30min'")
                .setting("max_replication_slots", &slots.to_string())
                .setting("max_wal_senders", &slots.to_string()),
        )?;
        let client = cluster.connect("postgres").await?;
        log(&format!("loading {} accounts", self.workload.initial_rows));
        workload::load(&client, &self.workload).await?;
        client
            .batch_execute(&format!(
                "CREATE PUBLICATION {DEFAULT_PUBLICATION} FOR TABLE accounts"
            ))
            .await?;
        for transport in &self.transports {
            for i in 0..self.runs {
                client
                    .batch_execute(&format!(
                        "SELECT pg_create_logical_replication_slot('recv_{transport}_{i}', 'pgoutput');
                         SELECT pg_create_logical_replication_slot('walshift_{transport}_{i}', 'pgoutput');"
                    ))
                    .await?;
            }
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
        let recvlogical = cluster.binaries().program("pg_recvlogical");
        let changes = self.workload.changes as f64;
        let mut timings = Vec::new();
        let mut summaries = Vec::new();
        for &transport in &self.transports {
            let conn = transport.conn_string(&cluster);
            for i in 0..self.runs {
                let mut recv = Command::new(&recvlogical);
                let out_file = scratch.path().join(format!("recv_{transport}_{i}.out"));
                recv.arg("-d")
                    .arg(&conn)
                    .arg(format!("--slot=recv_{transport}_{i}"))
                    .arg("--start")
                    .arg(format!("--endpos={end_lsn}"))
                    .arg("--no-loop")
                    .arg("-o")
                    .arg("proto_version=1")
                    .arg("-o")
                    .arg(format!("publication_names={DEFAULT_PUBLICATION}"))
                    .arg("-f")
                    .arg(&out_file);
                let mut ours = Command::new(walshift);
                let buf = scratch.path().join(format!("buffer_{transport}_{i}"));
                ours.arg("capture")
                    .arg("--source")
                    .arg(&conn)
                    .arg("--buffer")
                    .arg(&buf)
                    .arg(format!("--slot=walshift_{transport}_{i}"))
                    // Created before the workload, like pg_recvlogical's: the buffer takes it.
                    .arg("--adopt-slot")
                    .arg(format!("--publication={DEFAULT_PUBLICATION}"))
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
                    let seconds = run.wall.as_secs_f64();
                    let mut t = Timing {
                        tool,
                        transport,
                        run: i + 1,
                        seconds,
                        changes_per_sec: changes / seconds,
                        cpu_seconds: run.cpu.as_secs_f64(),
                        user_seconds: run.user.as_secs_f64(),
                        system_seconds: run.system.as_secs_f64(),
                        output_bytes: dir_size(out),
                        reads_per_sec: None,
                        bytes_per_read: None,
                        fsyncs_per_sec: None,
                    };
                    if tool == "walshift" {
                        self.check_walshift(&run.stdout, &mut t)?;
                    }
                    log(&t.line());
                    timings.push(t);
                }
            }
            summaries.push(summarize(transport, self.runs, &timings));
        }
        Ok(CaptureBenchReport {
            changes: self.workload.changes,
            transactions,
            end_lsn,
            timings,
            transports: summaries,
        })
    }

    /// Reads walshift's JSON report: the measurement counts only if everything arrived.
    fn check_walshift(&self, stdout: &str, t: &mut Timing) -> Result<(), BenchError> {
        let unreadable = |detail: String| BenchError::Tool {
            tool: t.tool.into(),
            status: "unreadable report".into(),
            stderr: detail,
        };
        let report: serde_json::Value =
            serde_json::from_str(stdout).map_err(|e| unreadable(format!("{e}: {stdout}")))?;
        let got = report["changes"].as_i64().unwrap_or(-1);
        if got != self.workload.changes {
            return Err(BenchError::Tool {
                tool: t.tool.into(),
                status: "incomplete capture".into(),
                stderr: format!(
                    "captured {got} changes, the workload made {}",
                    self.workload.changes
                ),
            });
        }
        let field = |name: &str| {
            report[name]
                .as_f64()
                .ok_or_else(|| unreadable(format!("no {name:?} in {stdout}")))
        };
        let streaming = field("elapsed")?.max(1e-9);
        let reads = field("socket_reads")?;
        t.reads_per_sec = Some(reads / streaming);
        t.bytes_per_read = Some(field("socket_read_bytes")? / reads.max(1.0));
        t.fsyncs_per_sec = Some(field("fsyncs")? / streaming);
        Ok(())
    }
}

impl Timing {
    fn line(&self) -> String {
        let mut line = format!(
            "{} run {}: {:<14} {:>7.2} s  {:>9.0} changes/s  cpu {:>5.2} s (user {:.2}, sys {:.2})  {:>6.1} MiB",
            self.transport,
            self.run,
            self.tool,
            self.seconds,
            self.changes_per_sec,
            self.cpu_seconds,
            self.user_seconds,
            self.system_seconds,
            self.output_bytes as f64 / 1048576.0
        );
        if let (Some(r), Some(b), Some(f)) =
            (self.reads_per_sec, self.bytes_per_read, self.fsyncs_per_sec)
        {
            line.push_str(&format!("  {r:.0} reads/s, {b:.0} B/read, {f:.1} fsyncs/s"));
        }
        line
    }
}

fn summarize(transport: Transport, runs: usize, timings: &[Timing]) -> TransportSummary {
    let rate = |tool: &str| {
        timings
            .iter()
            .filter(|t| t.tool == tool && t.transport == transport)
            .map(|t| t.changes_per_sec)
            .collect::<Vec<_>>()
    };
    let ratios: Vec<f64> = (1..=runs)
        .map(|r| {
            let get = |tool: &str| {
                timings
                    .iter()
                    .find(|t| t.tool == tool && t.transport == transport && t.run == r)
                    .map(|t| t.changes_per_sec)
                    .unwrap_or(0.0)
            };
            get("walshift") / get("pg_recvlogical").max(1e-9)
        })
        .collect();
    TransportSummary {
        transport,
        recvlogical_median: median(rate("pg_recvlogical")),
        recvlogical_best: rate("pg_recvlogical").into_iter().fold(0.0, f64::max),
        walshift_median: median(rate("walshift")),
        walshift_best: rate("walshift").into_iter().fold(0.0, f64::max),
        ratio_median: median(ratios.clone()),
        ratios,
    }
}

impl std::fmt::Display for CaptureBenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "capture throughput: {} row changes in {} transactions (end LSN {})",
            self.changes, self.transactions, self.end_lsn
        )?;
        writeln!(
            f,
            "| transport | run | tool | s | changes/s | user s | sys s | reads/s | B/read | fsyncs/s |"
        )?;
        writeln!(f, "|---|---|---|---|---|---|---|---|---|---|")?;
        for t in &self.timings {
            let opt = |v: Option<f64>, prec: usize| {
                v.map_or_else(|| "–".to_string(), |v| format!("{v:.prec$}"))
            };
            writeln!(
                f,
                "| {} | {} | {} | {:.2} | {:.0} | {:.2} | {:.2} | {} | {} | {} |",
                t.transport,
                t.run,
                t.tool,
                t.seconds,
                t.changes_per_sec,
                t.user_seconds,
                t.system_seconds,
                opt(t.reads_per_sec, 0),
                opt(t.bytes_per_read, 0),
                opt(t.fsyncs_per_sec, 1)
            )?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "| transport | pg_recvlogical changes/s median (best) | walshift changes/s median (best) | walshift / pg_recvlogical per run | median |"
        )?;
        writeln!(f, "|---|---|---|---|---|")?;
        for s in &self.transports {
            let ratios: Vec<String> = s.ratios.iter().map(|r| format!("{r:.2}")).collect();
            writeln!(
                f,
                "| {} | {:.0} ({:.0}) | {:.0} ({:.0}) | {} | **{:.2}×** |",
                s.transport,
                s.recvlogical_median,
                s.recvlogical_best,
                s.walshift_median,
                s.walshift_best,
                ratios.join(", "),
                s.ratio_median
            )?;
        }
        Ok(())
    }
}
