//! Operator hooks: `--before`, `--switch` and `--after` commands, each run with `sh -c`, with
//! the cutover's identity in environment variables and a timeout.
//!
//! Environment given to every hook (never a password — connection names come from
//! [`ConnInfo::redacted`]):
//!
//! | variable | value |
//! |---|---|
//! | `WALSHIFT_CUTOVER_ID` | this cutover's id |
//! | `WALSHIFT_HOOK` | `before`, `switch` or `after` |
//! | `WALSHIFT_MARKER_LSN` | the marker's transaction end LSN (empty for `before`) |
//! | `WALSHIFT_SOURCE` / `WALSHIFT_TARGET` | `host=… port=… user=… dbname=…` |
//! | `WALSHIFT_BUFFER` | the buffer directory |
//! | `WALSHIFT_DRY_RUN` | `1` in a dry run (hooks are not run then; kept for scripts) |
//!
//! A hook succeeds when it exits 0 within its timeout. On timeout its whole process group is
//! killed (a hook's children go with it). Its stdout and stderr are collected; the last lines
//! are kept in the report and in the error.
//!
//! **Hooks die with walshift.** Each hook runs in the process group of a small watchdog
//! (`sh -c 'read x; kill -9 0'`) whose stdin is a pipe only walshift holds the other end of:
//! if walshift dies — even by `kill -9` — the pipe closes, the watchdog's `read` returns and
//! it kills the whole group, hook and children. A hook is never left running (say, finishing
//! a switch) with nobody to record what it did.

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;

use super::report::HookRun;
use crate::conn::ConnInfo;
use crate::lsn::Lsn;

/// Lines of output kept per hook.
const TAIL_LINES: usize = 20;

/// A hook that did not succeed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HookError {
    #[error("the {hook} hook could not be started ({command:?}): {source}")]
    Spawn {
        hook: String,
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the {hook} hook ({command:?}) exited with {status}; its last output:\n{tail}")]
    Failed {
        hook: String,
        command: String,
        status: String,
        tail: String,
    },
    #[error(
        "the {hook} hook ({command:?}) did not finish within {timeout:?} and was killed; its last output:\n{tail}"
    )]
    Timeout {
        hook: String,
        command: String,
        timeout: Duration,
        tail: String,
    },
}

/// What every hook of one cutover is told.
#[derive(Clone, Debug)]
pub struct HookContext {
    pub cutover_id: String,
    pub source: ConnInfo,
    pub target: ConnInfo,
    pub buffer_dir: std::path::PathBuf,
    pub marker: Option<Lsn>,
}

/// Runs `command` with `sh -c`. Returns the run (also on failure, inside the error path the
/// caller records it) and an error unless it exited 0 within `timeout`.
pub async fn run_hook(
    hook: &str,
    command: &str,
    ctx: &HookContext,
    timeout: Duration,
) -> (HookRun, Result<(), HookError>) {
    let started = Instant::now();
    let mut run = HookRun {
        hook: hook.to_owned(),
        command: command.to_owned(),
        exit_code: None,
        duration_secs: 0.0,
        output_tail: String::new(),
    };
    let watchdog = match Watchdog::spawn() {
        Ok(w) => w,
        Err(source) => {
            return (
                run,
                Err(HookError::Spawn {
                    hook: hook.into(),
                    command: command.into(),
                    source,
                }),
            );
        }
    };
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg(command)
        .env("WALSHIFT_CUTOVER_ID", &ctx.cutover_id)
        .env("WALSHIFT_HOOK", hook)
        .env(
            "WALSHIFT_MARKER_LSN",
            ctx.marker.map(|l| l.to_string()).unwrap_or_default(),
        )
        .env("WALSHIFT_SOURCE", ctx.source.redacted())
        .env("WALSHIFT_TARGET", ctx.target.redacted())
        .env("WALSHIFT_BUFFER", path_str(&ctx.buffer_dir))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(watchdog.pgid)
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(source) => {
            return (
                run,
                Err(HookError::Spawn {
                    hook: hook.into(),
                    command: command.into(),
                    source,
                }),
            );
        }
    };
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let collect = async {
        let mut out = Vec::new();
        let mut err = Vec::new();
        let a = async {
            if let Some(s) = stdout.as_mut() {
                let _ = s.read_to_end(&mut out).await;
            }
        };
        let b = async {
            if let Some(s) = stderr.as_mut() {
                let _ = s.read_to_end(&mut err).await;
            }
        };
        tokio::join!(a, b);
        (out, err)
    };
    let waited = tokio::time::timeout(timeout, async {
        let (out, err) = collect.await;
        (child.wait().await, out, err)
    })
    .await;
    run.duration_secs = started.elapsed().as_secs_f64();
    if waited.is_ok() {
        watchdog.dismiss().await;
    } else {
        // SAFETY: signalling the process group our own watchdog child leads (it is alive
        // and not reaped, so the group id is still ours).
        unsafe {
            libc::kill(-watchdog.pgid, libc::SIGKILL);
        }
    }
    match waited {
        Ok((status, out, err)) => {
            run.output_tail = tail(&out, &err);
            match status {
                Ok(s) if s.success() => {
                    run.exit_code = Some(0);
                    (run, Ok(()))
                }
                Ok(s) => {
                    run.exit_code = s.code();
                    let tail = run.output_tail.clone();
                    (
                        run,
                        Err(HookError::Failed {
                            hook: hook.into(),
                            command: command.into(),
                            status: s.to_string(),
                            tail,
                        }),
                    )
                }
                Err(source) => (
                    run,
                    Err(HookError::Spawn {
                        hook: hook.into(),
                        command: command.into(),
                        source,
                    }),
                ),
            }
        }
        Err(_) => {
            let _ = child.wait().await;
            (
                run,
                Err(HookError::Timeout {
                    hook: hook.into(),
                    command: command.into(),
                    timeout,
                    tail: String::new(),
                }),
            )
        }
    }
}

/// Leads a hook's process group and kills it when walshift's end of its stdin pipe closes,
/// that is when walshift exits for any reason (the pipe is close-on-exec: no other child of
/// walshift holds it).
struct Watchdog {
    child: tokio::process::Child,
    pgid: libc::pid_t,
    /// walshift's end of the pipe; closing it fires the watchdog.
    _end: OwnedFd,
}

impl Watchdog {
    fn spawn() -> std::io::Result<Watchdog> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: pipe2 fills two descriptors we then own.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fresh descriptors from pipe2, owned once each.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let child = tokio::process::Command::new("sh")
            .arg("-c")
            .arg("read x; kill -9 0")
            .stdin(Stdio::from(read))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()?;
        let pgid = child
            .id()
            .ok_or_else(|| std::io::Error::other("the hook watchdog exited at once"))?
            as libc::pid_t;
        Ok(Watchdog {
            child,
            pgid,
            _end: write,
        })
    }

    /// The hook finished: stop the watchdog alone (what the hook left in the background
    /// stays, as it would without walshift).
    async fn dismiss(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

fn path_str(p: &Path) -> String {
    p.display().to_string()
}

fn tail(out: &[u8], err: &[u8]) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(out),
        String::from_utf8_lossy(err)
    );
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> HookContext {
        let c = ConnInfo::parse("host=h port=1 user=u password=secret dbname=d").unwrap();
        HookContext {
            cutover_id: "c1".into(),
            source: c.clone(),
            target: c,
            buffer_dir: "/tmp/b".into(),
            marker: Some(Lsn(0x1_0000_0010)),
        }
    }

    #[tokio::test]
    async fn env_has_names_and_lsn_but_no_password() {
        let (run, r) = run_hook(
            "switch",
            "echo \"$WALSHIFT_CUTOVER_ID $WALSHIFT_HOOK $WALSHIFT_MARKER_LSN $WALSHIFT_SOURCE\"; env | grep -c secret || true",
            &ctx(),
            Duration::from_secs(10),
        )
        .await;
        r.unwrap();
        assert_eq!(run.exit_code, Some(0));
        assert!(
            run.output_tail
                .starts_with("c1 switch 1/10 host=h port=1 user=u dbname=d"),
            "{}",
            run.output_tail
        );
        assert!(run.output_tail.ends_with("\n0"), "{}", run.output_tail);
    }

    #[tokio::test]
    async fn failure_and_timeout_are_errors() {
        let (run, r) = run_hook(
            "switch",
            "echo nope >&2; exit 3",
            &ctx(),
            Duration::from_secs(10),
        )
        .await;
        assert_eq!(run.exit_code, Some(3));
        let e = r.unwrap_err().to_string();
        assert!(e.contains("nope") && e.contains("switch"), "{e}");
        let t = Instant::now();
        let (_, r) = run_hook("after", "sleep 30", &ctx(), Duration::from_millis(200)).await;
        assert!(matches!(r, Err(HookError::Timeout { .. })));
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn a_dropped_hook_run_takes_the_hook_and_its_children_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let cmd = format!(
            "sleep 30 & echo $! > {p}.tmp; mv {p}.tmp {p}; wait",
            p = pidfile.display()
        );
        let c = ctx();
        let run = run_hook("switch", &cmd, &c, Duration::from_secs(60));
        // Dropping the future is what happens to a hook when walshift goes away.
        let _ = tokio::time::timeout(Duration::from_millis(500), run).await;
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let gone = Instant::now();
        // SAFETY: signal 0 only checks the process exists.
        while unsafe { libc::kill(pid, 0) } == 0 {
            assert!(
                gone.elapsed() < Duration::from_secs(5),
                "the hook's child {pid} outlived it"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
