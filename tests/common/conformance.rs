//! The conformance harness: runs a SQL workload folder (`tests/conformance/<folder>/`, format in
//! `tests/conformance/peer-workloads-README.md`) through the built `walshift` binary — capture
//! with `--clone-to`, `replay --until-lsn` at every sync point — and compares the source with the
//! copies by itself (row count and md5 of the rows' text forms in the C collation), never through
//! walshift's own verify code.
//!
//! One source cluster and one target cluster per run. Each phase gets fresh databases: the source
//! database, copy `a1` (the clone, replayed with `--apply-connections 1`) and copy `a2` (made from
//! `a1` with `CREATE DATABASE … TEMPLATE` right after the clone, before any replay, and replayed
//! with `--apply-connections 2`). Both copies read the same buffer.
//!
//! A run collects every problem (a difference, a failed replay, a missing refusal) instead of
//! stopping at the first, so that one run lists everything a workload finds; a copy whose replay
//! failed is not replayed or compared again.
//!
//! A folder may hold `walshift-plan.sql` (harness-owned, not vendored), one directive a line:
//! - `-- @phase`: starts a phase (fresh databases); without any, phases start at each file named
//!   `00-*` or `NN-schema*`, which are that phase's setup files, the others its stream files.
//! - `-- @load-pagila`: load `tests/conformance/pagila/` into the source first.
//! - `-- @setup <file>` / `-- @stream <file>`: the phase's files, in that order (setup files run
//!   on the source before capture starts; stream files while it runs).
//! - `-- @expect-refusal <text>`: capture must refuse before creating anything (no slot, no table
//!   on the copy) with a message containing `<text>` (every such line must appear).
//! - `-- @fix`: the SQL lines that follow (up to the next directive) run on the source after the
//!   expected refusal, then capture runs again and must start.
//! - `-- @expect-warning <text>`: capture's output must contain `<text>`.
//! - `-- @not-replicated <"schema"."table">`: compared right after the clone only (walshift says
//!   it copies the table once and does not carry its later changes; use with `@expect-warning`).
//! - `-- @stop-at <text>`: at the sync point whose label contains `<text>`, capture must have
//!   stopped by itself (within 60 s), on a change it cannot carry, with a message containing
//!   every `-- @expect-stop <text>`. Then every copy replays what the buffer holds, the SQL lines
//!   after `-- @stop-fix` run on every copy (the fix the message names), capture runs again with
//!   the extra arguments of `-- @restart-arg <arg>` (one per line), and the sync goes on.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use walshift::localpg::{Cluster, ClusterOptions};
use walshift::pgtools::PgBinaries;
use walshift::sql::{quote_ident, quote_qualified};

const POLL: Duration = Duration::from_millis(50);
const SLOT: &str = "walshift";

/// Where the vendored workloads live.
pub fn workloads_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/conformance")
}

/// Where SQL of a segment runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dest {
    Source,
    /// Every copy.
    Targets,
    /// Every copy, then the source.
    Both,
}

/// One step of a stream file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    Run { dest: Dest, sql: String },
    Sync { label: String },
    RestartSource,
}

fn marker(line: &str) -> Option<(&str, &str)> {
    let rest = line.trim().strip_prefix("-- @")?;
    let (word, arg) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    Some((word, arg.trim()))
}

fn has_sql(text: &str) -> bool {
    text.lines().any(|l| {
        let t = l.trim();
        !t.is_empty() && !t.starts_with("--")
    })
}

/// Splits a workload file into steps, following its markers (see the workloads' README).
pub fn parse_segments(text: &str) -> Result<Vec<Step>, String> {
    let mut steps = Vec::new();
    let mut prelude = String::new();
    let mut in_prelude = false;
    let mut dest = Dest::Source;
    let mut buf = String::new();
    let flush = |buf: &mut String, prelude: &str, dest: Dest, steps: &mut Vec<Step>| {
        if has_sql(buf) {
            steps.push(Step::Run {
                dest,
                sql: format!("{prelude}\n{buf}"),
            });
        }
        buf.clear();
    };
    for line in text.lines() {
        let Some((word, arg)) = marker(line) else {
            if in_prelude {
                prelude.push_str(line);
                prelude.push('\n');
            } else {
                buf.push_str(line);
                buf.push('\n');
            }
            continue;
        };
        flush(&mut buf, &prelude, dest, &mut steps);
        in_prelude = false;
        match word {
            "prelude" => {
                in_prelude = true;
                prelude.clear();
            }
            "src" => dest = Dest::Source,
            "sync" | "both" | "target" => {
                steps.push(Step::Sync {
                    label: arg.to_owned(),
                });
                dest = match word {
                    "sync" => Dest::Source,
                    "both" => Dest::Both,
                    _ => Dest::Targets,
                };
            }
            "restart-source" => steps.push(Step::RestartSource),
            other => return Err(format!("unknown workload marker `-- @{other}`")),
        }
    }
    flush(&mut buf, &prelude, dest, &mut steps);
    Ok(steps)
}

/// One phase of a workload: fresh databases, setup, capture, stream.
#[derive(Clone, Debug, Default)]
pub struct Phase {
    pub load_pagila: bool,
    pub setup: Vec<PathBuf>,
    pub stream: Vec<PathBuf>,
    pub expect_refusal: Vec<String>,
    pub fix: String,
    pub expect_warning: Vec<String>,
    pub not_replicated: Vec<String>,
    pub stop_at: Option<String>,
    pub expect_stop: Vec<String>,
    pub stop_fix: String,
    pub restart_args: Vec<String>,
}

/// Reads a folder's phases: from `walshift-plan.sql` if present, else from the file names.
pub fn plan(dir: &Path) -> Result<Vec<Phase>, String> {
    let plan_file = dir.join("walshift-plan.sql");
    if plan_file.exists() {
        return parse_plan(
            dir,
            &fs::read_to_string(&plan_file).map_err(|e| e.to_string())?,
        );
    }
    let mut files: Vec<String> = fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| is_workload_file(n))
        .collect();
    files.sort();
    let mut phases: Vec<Phase> = Vec::new();
    for f in files {
        let setup = f.starts_with("00-") || f.get(2..).is_some_and(|r| r.starts_with("-schema"));
        if setup && phases.last().is_none_or(|p| !p.stream.is_empty()) {
            phases.push(Phase::default());
        }
        let phase = phases
            .last_mut()
            .ok_or_else(|| format!("{f}: a stream file before any setup file"))?;
        if setup {
            phase.setup.push(dir.join(f));
        } else {
            phase.stream.push(dir.join(f));
        }
    }
    Ok(phases)
}

fn is_workload_file(name: &str) -> bool {
    let b = name.as_bytes();
    name.ends_with(".sql")
        && b.len() > 3
        && b[0].is_ascii_digit()
        && b[1].is_ascii_digit()
        && b[2] == b'-'
}

pub fn parse_plan(dir: &Path, text: &str) -> Result<Vec<Phase>, String> {
    let mut phases: Vec<Phase> = Vec::new();
    let mut in_fix = false;
    let mut in_stop_fix = false;
    for line in text.lines() {
        let Some((word, arg)) = marker(line) else {
            if let Some(p) = phases.last_mut() {
                let into = if in_fix {
                    Some(&mut p.fix)
                } else if in_stop_fix {
                    Some(&mut p.stop_fix)
                } else {
                    None
                };
                if let Some(sql) = into {
                    sql.push_str(line);
                    sql.push('\n');
                }
            }
            continue;
        };
        in_fix = false;
        in_stop_fix = false;
        if word == "phase" {
            phases.push(Phase::default());
            continue;
        }
        let p = phases
            .last_mut()
            .ok_or_else(|| format!("walshift-plan.sql: `-- @{word}` before `-- @phase`"))?;
        let file = || {
            let f = dir.join(arg);
            if f.is_file() {
                Ok(f)
            } else {
                Err(format!("walshift-plan.sql: no file {}", f.display()))
            }
        };
        match word {
            "load-pagila" => p.load_pagila = true,
            "setup" => p.setup.push(file()?),
            "stream" => p.stream.push(file()?),
            "expect-refusal" => p.expect_refusal.push(arg.to_owned()),
            "fix" => in_fix = true,
            "expect-warning" => p.expect_warning.push(arg.to_owned()),
            "not-replicated" => p.not_replicated.push(arg.to_owned()),
            "stop-at" => p.stop_at = Some(arg.to_owned()),
            "expect-stop" => p.expect_stop.push(arg.to_owned()),
            "stop-fix" => in_stop_fix = true,
            "restart-arg" => p.restart_args.push(arg.to_owned()),
            other => {
                return Err(format!(
                    "walshift-plan.sql: unknown directive `-- @{other}`"
                ));
            }
        }
    }
    Ok(phases)
}

/// How a run goes beyond the workload itself.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Apply connections, one copy each.
    pub apply_connections: Vec<usize>,
    /// Test-only: SQL run on every copy right before the comparison at the sync point with
    /// this label (to prove the comparison sees a difference).
    pub corrupt_at: Option<(String, String)>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            apply_connections: vec![1, 2],
            corrupt_at: None,
        }
    }
}

/// The source server: the localpg cluster, or after `@restart-source` the postmaster this
/// harness started on its data directory (stopped first on drop, before the cluster deletes it).
struct Source {
    cluster: Cluster,
    restarted: Option<Child>,
}

impl Drop for Source {
    fn drop(&mut self) {
        if let Some(mut c) = self.restarted.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGQUIT) };
            let _ = c.wait();
        }
    }
}

impl Source {
    fn postmaster_pid(&self) -> Option<i32> {
        fs::read_to_string(self.cluster.data_dir().join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    /// Fast shutdown, then the same server started again on the same port.
    fn restart(&mut self) -> Result<(), String> {
        let data = self.cluster.data_dir();
        let pid = self
            .postmaster_pid()
            .ok_or("no postmaster.pid to restart")?;
        // SAFETY: the postmaster runs under our test's cluster directory.
        unsafe { libc::kill(pid, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(60);
        while data.join("postmaster.pid").exists() {
            if Instant::now() > deadline {
                return Err("the source did not shut down within 60 s".into());
            }
            std::thread::sleep(POLL);
        }
        if let Some(mut old) = self.restarted.take() {
            let _ = old.wait();
        }
        let meta = fs::metadata(&data).map_err(|e| e.to_string())?;
        let log = fs::OpenOptions::new()
            .append(true)
            .open(self.cluster.log_path())
            .map_err(|e| e.to_string())?;
        let mut cmd = Command::new(self.cluster.binaries().program("postgres"));
        cmd.arg("-D")
            .arg(&data)
            .arg("-p")
            .arg(self.cluster.port().to_string())
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log);
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            cmd.uid(meta.uid()).gid(meta.gid());
        }
        // SAFETY: prctl is async-signal-safe; the closure allocates nothing.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        self.restarted = Some(cmd.spawn().map_err(|e| format!("starting postgres: {e}"))?);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = fs::read_to_string(data.join("postmaster.pid"))
                .map(|s| s.lines().nth(7).is_some_and(|l| l.trim() == "ready"))
                .unwrap_or(false);
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err("the source did not start again within 60 s".into());
            }
            std::thread::sleep(POLL);
        }
    }
}

/// A running `walshift capture`, its stderr in a log file.
struct Capture {
    child: Child,
    log: PathBuf,
    args: Vec<String>,
}

impl Capture {
    fn start(args: Vec<String>, log: PathBuf) -> Result<Capture, String> {
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| e.to_string())?;
        let child = crate::common::cli::command(&args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out.try_clone().map_err(|e| e.to_string())?)
            .stderr(out)
            .spawn()
            .map_err(|e| format!("starting walshift capture: {e}"))?;
        Ok(Capture { child, log, args })
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    fn output(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn tail(&self) -> String {
        tail(&self.output(), 25)
    }

    /// SIGINT and wait: a clean stop exits 0.
    fn stop(mut self) -> Result<(), String> {
        if self.exited().is_none() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGINT) };
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(st) = self.exited() {
                return if st.success() {
                    Ok(())
                } else {
                    Err(format!(
                        "capture exited with {st} when stopped:\n{}",
                        self.tail()
                    ))
                };
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return Err(format!(
                    "capture did not stop within 60 s of SIGINT:\n{}",
                    self.tail()
                ));
            }
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The last `n` lines, without terminal colour codes.
pub fn tail(s: &str, n: usize) -> String {
    let mut plain = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    let lines: Vec<&str> = plain.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// One copy of the source, replayed with its own number of apply connections.
struct Copy {
    db: String,
    apply_connections: usize,
    /// Its replay failed: not replayed or compared again.
    broken: bool,
}

/// Per table: its columns in attribute order.
type Tables = BTreeMap<(String, String), Vec<String>>;

const TABLES_SQL: &str = "SELECT n.nspname::text, c.relname::text, \
       coalesce(array_agg(a.attname::text ORDER BY a.attnum) \
                FILTER (WHERE a.attnum > 0 AND NOT a.attisdropped), '{}') \
     FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
     LEFT JOIN pg_attribute a ON a.attrelid = c.oid \
     WHERE c.relkind = 'r' AND c.relpersistence <> 't' \
       AND n.nspname NOT IN ('walshift', 'pg_catalog', 'information_schema') \
       AND n.nspname NOT LIKE 'pg\\_%' \
     GROUP BY 1, 2";

const SESSION: &str = "SET TimeZone = 'UTC'; SET DateStyle = 'ISO'; \
     SET IntervalStyle = 'postgres'; SET extra_float_digits = 3; SET bytea_output = 'hex'";

/// Row count and md5 of the sorted text forms of `columns` of a table.
async fn digest(
    client: &tokio_postgres::Client,
    schema: &str,
    table: &str,
    columns: &[String],
) -> Result<(i64, String), String> {
    let cols: Vec<String> = columns
        .iter()
        .map(|c| format!("t.{}", quote_ident(c)))
        .collect();
    let sql = format!(
        "SELECT count(*), coalesce(md5(string_agg(r, E'\\n' ORDER BY r COLLATE \"C\")), '-') \
         FROM (SELECT (ROW({}))::text AS r FROM {} AS t) x",
        cols.join(", "),
        quote_qualified(schema, table)
    );
    let row = client
        .query_one(&sql, &[])
        .await
        .map_err(|e| format!("{sql}: {e}"))?;
    Ok((row.get(0), row.get(1)))
}

async fn lo_digest(client: &tokio_postgres::Client) -> Result<(i64, String), String> {
    let row = client
        .query_one(
            "SELECT count(*), coalesce(md5(string_agg(oid::text || ':' || md5(lo_get(oid)), ',' \
             ORDER BY oid)), '-') FROM pg_largeobject_metadata",
            &[],
        )
        .await
        .map_err(|e| format!("large objects: {e}"))?;
    Ok((row.get(0), row.get(1)))
}

/// A session with the comparison's settings (UTC, ISO dates, every float digit, hex bytea).
pub async fn connect(conn: &str) -> Result<tokio_postgres::Client, String> {
    let (client, connection) = tokio_postgres::connect(conn, tokio_postgres::NoTls)
        .await
        .map_err(|e| format!("connecting to {conn}: {e}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
        .batch_execute(SESSION)
        .await
        .map_err(|e| e.to_string())?;
    Ok(client)
}

async fn tables(client: &tokio_postgres::Client) -> Result<Tables, String> {
    let rows = client
        .query(TABLES_SQL, &[])
        .await
        .map_err(|e| format!("listing tables: {e}"))?;
    Ok(rows
        .iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect())
}

/// Compares every table of `source` with `target`: each difference as a line. A table on one
/// side only is a difference; a column only on the copy is not (a release may add columns), a
/// column only on the source is. Tables in `skip` (quoted names) are not compared.
pub async fn compare(source: &str, target: &str, skip: &[String]) -> Result<Vec<String>, String> {
    let src = connect(source).await?;
    let tgt = connect(target).await?;
    let st = tables(&src).await?;
    let tt = tables(&tgt).await?;
    let mut names: BTreeSet<&(String, String)> = st.keys().collect();
    names.extend(tt.keys());
    let mut diffs = Vec::new();
    for key in names {
        let q = quote_qualified(&key.0, &key.1);
        if skip.contains(&q) {
            continue;
        }
        let (Some(scols), Some(tcols)) = (st.get(key), tt.get(key)) else {
            let (side, other) = if st.contains_key(key) {
                ("source", &src)
            } else {
                ("copy", &tgt)
            };
            let cols = st.get(key).or(tt.get(key)).unwrap();
            let (n, _) = digest(other, &key.0, &key.1, cols).await?;
            diffs.push(format!("table {q} exists on the {side} only ({n} rows)"));
            continue;
        };
        let missing: Vec<&String> = scols.iter().filter(|c| !tcols.contains(c)).collect();
        if !missing.is_empty() {
            diffs.push(format!(
                "table {q}: columns {missing:?} missing on the copy"
            ));
        }
        let cols: Vec<String> = scols
            .iter()
            .filter(|c| tcols.contains(c))
            .cloned()
            .collect();
        let a = digest(&src, &key.0, &key.1, &cols).await?;
        let b = digest(&tgt, &key.0, &key.1, &cols).await?;
        if a != b {
            diffs.push(format!(
                "table {q}: source {} rows (md5 {}), copy {} rows (md5 {})",
                a.0, a.1, b.0, b.1
            ));
        }
    }
    let a = lo_digest(&src).await?;
    let b = lo_digest(&tgt).await?;
    if a != b {
        diffs.push(format!(
            "large objects: source {} (md5 {}), copy {} (md5 {})",
            a.0, a.1, b.0, b.1
        ));
    }
    Ok(diffs)
}

/// A workload run: what it found.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Every problem, each naming workload, phase, sync point, copy and table.
    pub problems: Vec<String>,
    /// Per sync point: `(label, ok)`, in order (for the findings list).
    pub syncs: Vec<(String, bool)>,
}

struct Run<'a> {
    name: String,
    rt: tokio::runtime::Runtime,
    psql: PathBuf,
    source: Source,
    target: Cluster,
    work: tempfile::TempDir,
    opts: &'a RunOptions,
    outcome: Outcome,
    started: Instant,
    captures: usize,
    /// Expected stops handled (`@stop-at`), all phases.
    stops: usize,
}

/// Runs a workload folder, returning everything it found.
pub fn run_workload(dir: &Path, opts: &RunOptions) -> Outcome {
    let name = dir.file_name().unwrap().to_string_lossy().into_owned();
    let phases = plan(dir).unwrap_or_else(|e| panic!("{name}: {e}"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let source = Source {
        cluster: Cluster::start(ClusterOptions::default()).expect("source cluster"),
        restarted: None,
    };
    let target = Cluster::start(ClusterOptions::default()).expect("target cluster");
    let mut run = Run {
        name,
        rt,
        psql: PgBinaries::find()
            .expect("PostgreSQL binaries")
            .program("psql"),
        source,
        target,
        work: tempfile::tempdir().unwrap(),
        opts,
        outcome: Outcome::default(),
        started: Instant::now(),
        captures: 0,
        stops: 0,
    };
    for (i, phase) in phases.iter().enumerate() {
        if let Err(e) = run.phase(i, phase) {
            run.problem(format!("phase {i}: stopped: {e}"));
        }
    }
    eprintln!(
        "[{}] done in {:.1} s, {} problem(s)",
        run.name,
        run.started.elapsed().as_secs_f64(),
        run.outcome.problems.len()
    );
    std::mem::take(&mut run.outcome)
}

/// Runs a workload folder of `tests/conformance/` with both apply-connection settings and fails
/// listing every problem.
pub fn assert_conforms(folder: &str) {
    let out = run_workload(&workloads_dir().join(folder), &RunOptions::default());
    assert!(
        out.problems.is_empty(),
        "{folder}: {} problem(s):\n{}",
        out.problems.len(),
        out.problems.join("\n")
    );
}

impl Run<'_> {
    fn problem(&mut self, p: String) {
        eprintln!("[{}] PROBLEM {p}", self.name);
        self.outcome.problems.push(format!("{}: {p}", self.name));
    }

    fn log(&self, msg: &str) {
        eprintln!(
            "[{} +{:.1}s] {msg}",
            self.name,
            self.started.elapsed().as_secs_f64()
        );
    }

    fn src_conn(&self, db: &str) -> String {
        self.source.cluster.conn_string(db)
    }

    fn tgt_conn(&self, db: &str) -> String {
        self.target.conn_string(db)
    }

    fn sql(&self, conn: &str, sql: &str) -> Result<Vec<tokio_postgres::Row>, String> {
        self.rt.block_on(async {
            let c = connect(conn).await?;
            c.query(sql, &[]).await.map_err(|e| format!("{sql}: {e}"))
        })
    }

    fn psql(&self, conn: &str, sql: &str, what: &str) -> Result<(), String> {
        let file = self.work.path().join("segment.sql");
        fs::write(&file, sql).map_err(|e| e.to_string())?;
        self.psql_file(conn, &file, what, false)
    }

    fn psql_file(&self, conn: &str, file: &Path, what: &str, single: bool) -> Result<(), String> {
        let mut cmd = Command::new(&self.psql);
        cmd.args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", conn, "-f"])
            .arg(file)
            .stdout(Stdio::null());
        if single {
            cmd.arg("-1");
        }
        let out = cmd.output().map_err(|e| format!("psql: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "psql failed running {what}: {}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    fn walshift(&self, args: &[String]) -> std::process::Output {
        crate::common::cli::command(args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .output()
            .expect("run walshift")
    }

    fn current_lsn(&self, db: &str) -> Result<String, String> {
        Ok(self.sql(&self.src_conn(db), "SELECT pg_current_wal_lsn()::text")?[0].get(0))
    }

    fn phase(&mut self, i: usize, phase: &Phase) -> Result<(), String> {
        let src_db = format!("src{i}");
        let copies: Vec<Copy> = self
            .opts
            .apply_connections
            .iter()
            .map(|&n| Copy {
                db: format!("copy{i}_a{n}"),
                apply_connections: n,
                broken: false,
            })
            .collect();
        let mut copies = copies;
        self.rt.block_on(async {
            self.source.cluster.create_database(&src_db).await.unwrap();
            self.target.create_database(&copies[0].db).await.unwrap();
        });
        let src = self.src_conn(&src_db);
        if phase.load_pagila {
            let dir = workloads_dir().join("pagila");
            for f in ["pagila-schema.sql", "pagila-data.sql"] {
                self.psql_file(&src, &dir.join(f), f, true)?;
            }
            self.log("pagila loaded");
        }
        for f in &phase.setup {
            self.run_file(f, &src_db, &copies, true)?;
        }
        let buffer = self.work.path().join(format!("buffer{i}"));
        let args: Vec<String> = [
            "capture",
            "--source",
            &src,
            "--buffer",
            buffer.to_str().unwrap(),
            "--clone-to",
            &self.tgt_conn(&copies[0].db),
            "--no-progress",
        ]
        .map(String::from)
        .to_vec();

        let publications = |run: &Self| -> Result<i64, String> {
            Ok(run.sql(&src, "SELECT count(*) FROM pg_publication")?[0].get(0))
        };
        let pubs_before = publications(self)?;
        let mut capture = Capture::start(args.clone(), self.capture_log(i))?;
        let mut cloned = self.wait_clone(&mut capture, &copies[0].db)?;
        if !phase.expect_refusal.is_empty() {
            let err = capture.output();
            let slots: i64 = self.sql(
                &src,
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'walshift'",
            )?[0]
                .get(0);
            let tables: i64 = self.sql(
                &self.tgt_conn(&copies[0].db),
                "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
                   AND n.nspname NOT LIKE 'pg\\_%'",
            )?[0]
                .get(0);
            let missing: Vec<&String> = phase
                .expect_refusal
                .iter()
                .filter(|t| !err.contains(t.as_str()))
                .collect();
            let refused = matches!(cloned, Some(st) if !st.success());
            let new_pubs = publications(self)? - pubs_before;
            if !refused || !missing.is_empty() || slots != 0 || tables != 0 || new_pubs != 0 {
                let how = match cloned {
                    None => "it started and cloned".to_owned(),
                    Some(st) => format!("it exited with {st}"),
                };
                self.problem(format!(
                    "phase {i}: expected capture to refuse before creating anything, with a message \
                     containing {missing:?}; {how} (slot created: {}, publications created: {new_pubs}, \
                     tables on the copy: {tables}), output:\n{}",
                    slots != 0,
                    tail(&err, 25)
                ));
                self.outcome.syncs.push(("expected refusal".into(), false));
                if cloned.is_some() {
                    return Err("no capture to continue with".into());
                }
            } else {
                self.log("refused as expected");
                self.outcome.syncs.push(("expected refusal".into(), true));
                if !has_sql(&phase.fix) {
                    return Ok(());
                }
                self.psql(&src, &phase.fix, "the plan's @fix")?;
                capture = Capture::start(args, self.capture_log(i))?;
                cloned = self.wait_clone(&mut capture, &copies[0].db)?;
            }
        }
        if let Some(st) = cloned {
            return Err(format!(
                "capture exited with {st} before the clone was done:\n{}",
                capture.tail()
            ));
        }
        self.log("clone done");
        for w in &phase.expect_warning {
            if !capture.output().contains(w.as_str()) {
                self.problem(format!(
                    "phase {i}: capture did not warn {w:?}; its output:\n{}",
                    capture.tail()
                ));
            }
        }
        for c in copies.iter().skip(1) {
            self.template_copy(&copies[0].db, &c.db)?;
        }
        self.compare_all(i, "after the clone", &src_db, &mut copies, &[]);

        let stops_before = self.stops;
        for f in &phase.stream {
            let text = fs::read_to_string(f).map_err(|e| e.to_string())?;
            let fname = f.file_name().unwrap().to_string_lossy().into_owned();
            for step in parse_segments(&text).map_err(|e| format!("{fname}: {e}"))? {
                match step {
                    Step::Run { dest, sql } => {
                        self.run_sql(dest, &sql, &src_db, &copies, &fname)?;
                    }
                    Step::Sync { label } => {
                        self.sync(i, &label, &src_db, &mut copies, &mut capture, phase)?;
                    }
                    Step::RestartSource => {
                        self.source.restart()?;
                        self.log("source restarted");
                        capture = self.after_restart(i, capture, &src)?;
                    }
                }
            }
        }

        if let Some(at) = &phase.stop_at
            && self.stops == stops_before
        {
            self.problem(format!(
                "phase {i}: walshift-plan.sql's `-- @stop-at {at}` matched no sync label"
            ));
        }

        // The end: stop capture, resume it up to the source's current LSN, replay, compare.
        let args = capture.args.clone();
        if let Err(e) = capture.stop() {
            self.problem(format!("phase {i}: {e}"));
        }
        let end = self.current_lsn(&src_db)?;
        let mut resume = args;
        resume.extend(["--until-lsn".to_owned(), end.clone()]);
        let out = self.walshift(&resume);
        if !out.status.success() {
            return Err(format!(
                "capture --until-lsn {end} (resume) failed: {}",
                tail(&String::from_utf8_lossy(&out.stderr), 25)
            ));
        }
        self.replay_and_compare(i, "end", &end, &src_db, &mut copies, phase);
        self.sql(
            &src,
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots",
        )?;
        Ok(())
    }

    /// Waits until the clone is done (`None`) or capture exits (its status).
    fn wait_clone(
        &self,
        capture: &mut Capture,
        db: &str,
    ) -> Result<Option<std::process::ExitStatus>, String> {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            if let Some(st) = capture.exited() {
                return Ok(Some(st));
            }
            let rows = self.sql(
                &self.tgt_conn(db),
                "SELECT to_regclass('walshift.clone_state') IS NOT NULL",
            )?;
            if rows[0].get::<_, bool>(0) {
                let st = self.sql(
                    &self.tgt_conn(db),
                    "SELECT state FROM walshift.clone_state WHERE id = 1",
                )?;
                if st.first().is_some_and(|r| r.get::<_, &str>(0) == "done") {
                    return Ok(None);
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the clone did not finish in 180 s:\n{}",
                    capture.tail()
                ));
            }
            std::thread::sleep(POLL);
        }
    }

    /// After a source restart capture either reconnects by itself (its slot becomes active
    /// again) or exits; then it is run again, as an operator would, and must resume.
    fn after_restart(
        &mut self,
        i: usize,
        mut capture: Capture,
        src: &str,
    ) -> Result<Capture, String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = capture.exited() {
                self.log(&format!(
                    "capture exited with {st} on the restart, rerun; it said:\n{}",
                    capture.tail()
                ));
                let args = capture.args.clone();
                drop(capture);
                return Capture::start(args, self.capture_log(i));
            }
            let active = self
                .sql(
                    src,
                    "SELECT coalesce(bool_or(active), false) FROM pg_replication_slots \
                     WHERE slot_name = 'walshift'",
                )
                .map(|r| r[0].get::<_, bool>(0))
                .unwrap_or(false);
            if active {
                self.log("capture reconnected by itself after the restart");
                return Ok(capture);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "capture neither reconnected nor exited within 30 s of the source restart:\n{}",
                    capture.tail()
                ));
            }
            std::thread::sleep(POLL);
        }
    }

    /// A new log file for each capture started.
    fn capture_log(&mut self, phase: usize) -> PathBuf {
        self.captures += 1;
        self.work
            .path()
            .join(format!("capture{phase}-{}.log", self.captures))
    }

    fn template_copy(&self, from: &str, to: &str) -> Result<(), String> {
        let sql = format!(
            "CREATE DATABASE {} TEMPLATE {}",
            quote_ident(to),
            quote_ident(from)
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.sql(&self.tgt_conn("postgres"), &sql) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() < deadline && e.contains("being accessed") => {
                    std::thread::sleep(POLL)
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// A setup file: every segment on the source (markers other than `@src` are refused).
    fn run_file(&self, f: &Path, src_db: &str, copies: &[Copy], setup: bool) -> Result<(), String> {
        let text = fs::read_to_string(f).map_err(|e| e.to_string())?;
        let fname = f.file_name().unwrap().to_string_lossy().into_owned();
        for step in parse_segments(&text).map_err(|e| format!("{fname}: {e}"))? {
            match step {
                Step::Run {
                    dest: Dest::Source,
                    sql,
                } => self.run_sql(Dest::Source, &sql, src_db, copies, &fname)?,
                other if setup => {
                    return Err(format!("{fname}: {other:?} in a setup file"));
                }
                _ => unreachable!(),
            }
        }
        Ok(())
    }

    fn run_sql(
        &self,
        dest: Dest,
        sql: &str,
        src_db: &str,
        copies: &[Copy],
        fname: &str,
    ) -> Result<(), String> {
        if matches!(dest, Dest::Targets | Dest::Both) {
            for c in copies.iter().filter(|c| !c.broken) {
                self.psql(&self.tgt_conn(&c.db), sql, &format!("{fname} on {}", c.db))?;
            }
        }
        if matches!(dest, Dest::Source | Dest::Both) {
            self.psql(
                &self.src_conn(src_db),
                sql,
                &format!("{fname} on the source"),
            )?;
        }
        Ok(())
    }

    /// Waits until capture has confirmed the source's current LSN, replays every copy up to it
    /// and compares.
    fn sync(
        &mut self,
        i: usize,
        label: &str,
        src_db: &str,
        copies: &mut [Copy],
        capture: &mut Capture,
        phase: &Phase,
    ) -> Result<(), String> {
        if phase
            .stop_at
            .as_deref()
            .is_some_and(|at| label.contains(at))
        {
            self.expected_stop(i, label, copies, capture, phase)?;
        }
        let lsn = self.current_lsn(src_db)?;
        let deadline = Instant::now() + Duration::from_secs(60);
        let check = format!(
            "SELECT coalesce(bool_or(confirmed_flush_lsn >= '{lsn}'::pg_lsn), false) \
             FROM pg_replication_slots WHERE slot_name = '{SLOT}'"
        );
        loop {
            if let Some(st) = capture.exited() {
                return Err(format!(
                    "capture exited with {st} before sync {label:?}:\n{}",
                    capture.tail()
                ));
            }
            if self
                .sql(&self.src_conn(src_db), &check)
                .map(|r| r[0].get::<_, bool>(0))
                .unwrap_or(false)
            {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "capture did not confirm {lsn} within 60 s (sync {label:?}):\n{}",
                    capture.tail()
                ));
            }
            std::thread::sleep(POLL);
        }
        self.replay_and_compare(i, label, &lsn, src_db, copies, phase);
        Ok(())
    }

    /// The plan's `@stop-at` sync: capture must stop by itself saying every `@expect-stop`;
    /// then the copies replay the buffer, get the `@stop-fix`, and capture starts again with
    /// the `@restart-arg`s.
    fn expected_stop(
        &mut self,
        i: usize,
        label: &str,
        copies: &mut [Copy],
        capture: &mut Capture,
        phase: &Phase,
    ) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(st) = capture.exited() {
                break st;
            }
            if Instant::now() > deadline {
                self.problem(format!(
                    "phase {i}, sync {label:?}: expected capture to stop by itself within 60 s, \
                     it is still running:\n{}",
                    capture.tail()
                ));
                self.outcome.syncs.push(("expected stop".into(), false));
                return Ok(());
            }
            std::thread::sleep(POLL);
        };
        self.stops += 1;
        let said = capture.output();
        let missing: Vec<&String> = phase
            .expect_stop
            .iter()
            .filter(|t| !said.contains(t.as_str()))
            .collect();
        let ok = !status.success() && missing.is_empty();
        if !ok {
            self.problem(format!(
                "phase {i}, sync {label:?}: capture exited with {status}; expected a failure whose \
                 message contains {missing:?}:\n{}",
                capture.tail()
            ));
        } else {
            self.log("capture stopped as expected");
        }
        self.outcome.syncs.push(("expected stop".into(), ok));
        let buffer = self.work.path().join(format!("buffer{i}"));
        for c in copies.iter_mut().filter(|c| !c.broken) {
            let args: Vec<String> = [
                "replay",
                "--buffer",
                buffer.to_str().unwrap(),
                "--target",
                &self.tgt_conn(&c.db),
                "--apply-connections",
                &c.apply_connections.to_string(),
                "--no-progress",
            ]
            .map(String::from)
            .to_vec();
            let out = self.walshift(&args);
            if !out.status.success() {
                c.broken = true;
                self.problem(format!(
                    "phase {i}, sync {label:?}, copy {}: replay before the stop's fix failed: {}",
                    c.db,
                    tail(&String::from_utf8_lossy(&out.stderr), 15)
                ));
            } else if has_sql(&phase.stop_fix) {
                self.psql(
                    &self.tgt_conn(&c.db),
                    &phase.stop_fix,
                    "the plan's @stop-fix",
                )?;
            }
        }
        let mut args = capture.args.clone();
        args.extend(phase.restart_args.iter().cloned());
        *capture = Capture::start(args, self.capture_log(i))?;
        Ok(())
    }

    fn replay_and_compare(
        &mut self,
        i: usize,
        label: &str,
        lsn: &str,
        src_db: &str,
        copies: &mut [Copy],
        phase: &Phase,
    ) {
        for c in copies.iter_mut().filter(|c| !c.broken) {
            let buffer = self.work.path().join(format!("buffer{i}"));
            let args: Vec<String> = [
                "replay",
                "--buffer",
                buffer.to_str().unwrap(),
                "--target",
                &self.tgt_conn(&c.db),
                "--until-lsn",
                lsn,
                "--apply-connections",
                &c.apply_connections.to_string(),
                "--no-progress",
            ]
            .map(String::from)
            .to_vec();
            let out = self.walshift(&args);
            if !out.status.success() {
                c.broken = true;
                let p = format!(
                    "phase {i}, sync {label:?}, copy {} (--apply-connections {}): replay failed: {}",
                    c.db,
                    c.apply_connections,
                    tail(&String::from_utf8_lossy(&out.stderr), 15)
                );
                self.problem(p);
            }
        }
        if let Some((at, sql)) = &self.opts.corrupt_at
            && at == label
        {
            for c in copies.iter().filter(|c| !c.broken) {
                self.psql(&self.tgt_conn(&c.db), sql, "the test's corruption")
                    .unwrap();
            }
        }
        self.compare_all(i, label, src_db, copies, &phase.not_replicated);
    }

    fn compare_all(
        &mut self,
        i: usize,
        label: &str,
        src_db: &str,
        copies: &mut [Copy],
        skip: &[String],
    ) {
        let t0 = Instant::now();
        let mut ok = true;
        for c in copies.iter().filter(|c| !c.broken) {
            let diffs =
                self.rt
                    .block_on(compare(&self.src_conn(src_db), &self.tgt_conn(&c.db), skip));
            match diffs {
                Ok(d) if d.is_empty() => {}
                Ok(d) => {
                    ok = false;
                    for line in d {
                        self.problem(format!(
                            "phase {i}, sync {label:?}, copy {} (--apply-connections {}): {line}",
                            c.db, c.apply_connections
                        ));
                    }
                }
                Err(e) => {
                    ok = false;
                    self.problem(format!(
                        "phase {i}, sync {label:?}, copy {}: comparison failed: {e}",
                        c.db
                    ));
                }
            }
        }
        let ok = ok && copies.iter().all(|c| !c.broken);
        self.outcome.syncs.push((label.to_owned(), ok));
        self.log(&format!(
            "sync {label:?}: {} (compared in {:.2} s)",
            if ok { "equal" } else { "DIFFERENT" },
            t0.elapsed().as_secs_f64()
        ));
    }
}
