//! End-to-end measurements on throwaway clusters, always side by side with PostgreSQL's own
//! tools in the same run (the machines are noisy: ratios count, not absolute times).

pub mod capture;
pub mod cutover;
pub mod pooler;
pub mod replay;
pub mod workload;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Bench failures.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    LocalPg(#[from] crate::localpg::LocalPgError),
    #[error("SQL failed during the bench: {0}")]
    Sql(#[from] tokio_postgres::Error),
    #[error("{tool} failed ({status}): {stderr}")]
    Tool {
        tool: String,
        status: String,
        stderr: String,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// A measured method left its target different from the source, or never finished: the
    /// run is void and no number is reported.
    #[error("{method}: {detail}")]
    Check { method: String, detail: String },
}

/// Exit of a timed child process.
pub(crate) struct ChildRun {
    pub wall: Duration,
    pub cpu: Duration,
    pub user: Duration,
    pub system: Duration,
    pub max_rss_bytes: u64,
    pub stdout: String,
}

/// Runs a tool to completion; wall time, CPU time (user + system), peak RSS and stdout.
pub(crate) fn timed(tool: &str, mut cmd: Command) -> Result<ChildRun, BenchError> {
    let start = Instant::now();
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let stderr_pipe = child.stderr.take();
    // stderr on its own thread: neither pipe can fill up while the other is read.
    let stderr_reader = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut e) = stderr_pipe {
            let _ = std::io::Read::read_to_string(&mut e, &mut s);
        }
        s
    });
    let mut stdout = String::new();
    if let Some(mut o) = child.stdout.take() {
        std::io::Read::read_to_string(&mut o, &mut stdout)?;
    }
    let mut status = 0;
    // SAFETY: zeroed rusage is a valid out-parameter; wait4 reaps our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut usage) };
    let wall = start.elapsed();
    let stderr = stderr_reader.join().unwrap_or_default();
    if pid < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        return Err(BenchError::Tool {
            tool: tool.into(),
            status: format!("wait status {status}"),
            stderr,
        });
    }
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    Ok(ChildRun {
        wall,
        cpu: tv(usage.ru_utime) + tv(usage.ru_stime),
        user: tv(usage.ru_utime),
        system: tv(usage.ru_stime),
        // Linux reports kilobytes.
        max_rss_bytes: usage.ru_maxrss.max(0) as u64 * 1024,
        stdout,
    })
}

/// Bytes under a file or directory.
pub(crate) fn dir_size(p: &Path) -> u64 {
    if p.is_file() {
        return p.metadata().map(|m| m.len()).unwrap_or(0);
    }
    std::fs::read_dir(p)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| dir_size(&e.path()))
        .sum()
}
