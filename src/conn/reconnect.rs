//! Reconnecting after a server restarts, fails over or drops the connection: the policy (how
//! many attempts, how long between them, [`Reconnect`] and [`Backoff`]) and which failures
//! another attempt can cure ([`is_transient`] and friends).
//!
//! **Transient** means "the connection is gone or the server cannot take it yet": a refused
//! or reset TCP connection, a connection closed mid-stream, a connect timeout, and the
//! server's own "go away for now" answers — SQLSTATE class 08 (connection exception, except
//! 08P01 protocol violation), 57P01 `admin_shutdown` (a fast or immediate shutdown), 57P02
//! `crash_shutdown`, 57P03 `cannot_connect_now` (starting up, shutting down, in recovery),
//! 57P05 `idle_session_timeout`, 53300 `too_many_connections`. Everything else — a wrong
//! password (class 28), a missing permission (42501), a TLS certificate the client refuses, a
//! protocol violation, a missing database — stops at once: waiting does not fix it.
//!
//! The commands that reconnect decide themselves what else counts (capture: its replication
//! slot briefly "active" for the old walsender after a restart; never a slot that is gone or
//! a buffer that does not match).

use std::time::{Duration, Instant};

use crate::error::{Error, SqlError};

/// [`Reconnect::attempts`] of the `capture` and `replay` commands.
pub const DEFAULT_ATTEMPTS: u32 = 10;
/// [`Reconnect::first_delay`]'s default.
pub const DEFAULT_FIRST_DELAY: Duration = Duration::from_secs(1);
/// [`Reconnect::max_delay`]'s default.
pub const DEFAULT_MAX_DELAY: Duration = Duration::from_secs(30);

/// How a long-running job reconnects after it lost its server. Every field documents its
/// default and trade-off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reconnect {
    /// Consecutive failed attempts before giving up; 0 never reconnects (the first lost
    /// connection is the job's error). The library's default is 0 ([`Reconnect::never`]): a
    /// caller that must not wait (cutover's window) stays as it was. The commands default to
    /// [`DEFAULT_ATTEMPTS`] (10: about 3 minutes with the default delays), enough for a
    /// restart or a managed service's failover; more rides out longer outages, while the
    /// source keeps WAL for the slot and the copy falls behind.
    pub attempts: u32,
    /// Wait before the first attempt. Default 1 s; each further attempt waits twice as long
    /// as the one before, up to [`Reconnect::max_delay`].
    pub first_delay: Duration,
    /// Longest wait between two attempts. Default 30 s. Longer puts less load on a server
    /// that is coming back; shorter resumes sooner once it is.
    pub max_delay: Duration,
}

impl Reconnect {
    /// Never reconnect: the first lost connection is the error.
    pub const fn never() -> Self {
        Reconnect {
            attempts: 0,
            first_delay: DEFAULT_FIRST_DELAY,
            max_delay: DEFAULT_MAX_DELAY,
        }
    }

    /// Up to `attempts` consecutive attempts with the default delays.
    pub const fn attempts(attempts: u32) -> Self {
        Reconnect {
            attempts,
            ..Self::never()
        }
    }

    /// The wait before the attempt after `step` earlier waits: `first_delay · 2^step`, at most
    /// `max_delay`.
    pub fn delay(&self, step: u32) -> Duration {
        self.first_delay
            .saturating_mul(1u32.checked_shl(step.min(31)).unwrap_or(u32::MAX))
            .min(self.max_delay)
    }
}

impl Default for Reconnect {
    fn default() -> Self {
        Self::never()
    }
}

/// One reconnect attempt to make: which of how many, and after how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attempt {
    /// 1-based.
    pub number: u32,
    /// [`Reconnect::attempts`].
    pub of: u32,
    /// Wait this long first.
    pub delay: Duration,
}

/// The state of one job's reconnecting: consecutive failures and how long to wait next.
///
/// An attempt that gets the job running again (capture streaming, replay applying) resets the
/// count of consecutive failures; the delay starts over only once the job has then run for
/// [`Reconnect::max_delay`], so a server that accepts a connection and drops it at once is
/// not hammered every second.
#[derive(Clone, Debug)]
pub struct Backoff {
    policy: Reconnect,
    failed: u32,
    step: u32,
}

impl Backoff {
    pub fn new(policy: Reconnect) -> Self {
        Backoff {
            policy,
            failed: 0,
            step: 0,
        }
    }

    /// The job lost its connection (`ran_for`: how long it had been running since it last
    /// started) or a reconnect attempt failed (`None`). Returns the next attempt to make, or
    /// `None` when the attempts are used up.
    pub fn next(&mut self, ran_for: Option<Duration>) -> Option<Attempt> {
        if let Some(ran) = ran_for {
            self.failed = 0;
            if ran >= self.policy.max_delay {
                self.step = 0;
            }
        }
        if self.failed >= self.policy.attempts {
            return None;
        }
        self.failed += 1;
        let delay = self.policy.delay(self.step);
        self.step = self.step.saturating_add(1);
        Some(Attempt {
            number: self.failed,
            of: self.policy.attempts,
            delay,
        })
    }

    /// Attempts made since the job last ran.
    pub fn attempts_made(&self) -> u32 {
        self.failed
    }
}

/// What a reconnecting job (capture, replay) does after a run of it ended with an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Stop with the error: not reconnecting, or a failure that waiting does not fix.
    Stop,
    /// The attempts are used up: stop, saying how many were made over how long.
    GiveUp { attempts: u32, over: Duration },
    /// Wait this long, then start again.
    Retry(Duration),
}

/// The reconnect loop's bookkeeping shared by capture and replay: the backoff, when the
/// connection was lost, and the log line each loss or failed attempt gets.
#[derive(Debug)]
pub struct Reconnector {
    backoff: Backoff,
    lost_at: Option<Instant>,
    job: &'static str,
    server: &'static str,
    lost: &'static str,
}

impl Reconnector {
    /// `job` names the job in log lines ("capture"), `server` what it lost ("the source"),
    /// `lost` how a loss is said ("lost the replication stream").
    pub fn new(
        policy: Reconnect,
        job: &'static str,
        server: &'static str,
        lost: &'static str,
    ) -> Self {
        Reconnector {
            backoff: Backoff::new(policy),
            lost_at: None,
            job,
            server,
            lost,
        }
    }

    /// While reconnecting: when the connection was lost, and the attempts made since.
    pub fn reconnecting(&self) -> Option<(Instant, u32)> {
        self.lost_at.map(|at| (at, self.backoff.attempts_made()))
    }

    /// Decides after a run ended with `error`. `ran_once`: the job got going at least once
    /// in this process (before that, a failure is the start's own and is never retried);
    /// `running_since`: when this run got going (`None`: it failed while starting again);
    /// `transient`: the error is one waiting may fix.
    pub fn after(
        &mut self,
        ran_once: bool,
        running_since: Option<Instant>,
        transient: bool,
        error: &(dyn std::error::Error + 'static),
    ) -> Next {
        if !ran_once || self.backoff.policy.attempts == 0 {
            return Next::Stop;
        }
        if !transient {
            if self.lost_at.is_some() {
                tracing::error!(
                    "{}: reconnecting to {} found a problem waiting does not fix; stopping",
                    self.job,
                    self.server
                );
            }
            return Next::Stop;
        }
        let ran_for = running_since.map(|s| s.elapsed());
        if ran_for.is_some() {
            self.lost_at = Some(Instant::now());
        }
        let since = self.lost_at.map_or(Duration::ZERO, |at| at.elapsed());
        let Some(next) = self.backoff.next(ran_for) else {
            return Next::GiveUp {
                attempts: self.backoff.attempts_made(),
                over: since,
            };
        };
        tracing::warn!(
            "{}: {} ({}); reconnecting, attempt {} of {} in {}",
            self.job,
            if ran_for.is_some() {
                self.lost
            } else {
                "reconnect attempt failed"
            },
            one_line(error),
            next.number,
            next.of,
            human(next.delay),
        );
        Next::Retry(next.delay)
    }
}

impl Reconnector {
    /// The tail of a reconnect loop: after a run ended with `error`, either stop with it (or
    /// with `gave_up(attempts, over, error)` once the attempts are used up), or wait the
    /// backoff and return `Ok(true)` to start again — `Ok(false)` if `shutdown` resolved
    /// during the wait.
    pub async fn wait_to_retry<E: std::error::Error + 'static>(
        &mut self,
        ran_once: bool,
        running_since: Option<Instant>,
        error: E,
        transient: impl FnOnce(&E) -> bool,
        gave_up: impl FnOnce(u32, Duration, E) -> E,
        shutdown: std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
    ) -> Result<bool, E> {
        let transient = transient(&error);
        match self.after(ran_once, running_since, transient, &error) {
            Next::Stop => Err(error),
            Next::GiveUp { attempts, over } => Err(gave_up(attempts, over, error)),
            Next::Retry(delay) => Ok(tokio::select! {
                _ = tokio::time::sleep(delay) => true,
                _ = shutdown => false,
            }),
        }
    }
}

/// SQLSTATEs that mean "the connection is gone or the server cannot take it yet" (see the
/// module docs).
pub fn is_transient_sqlstate(code: &str) -> bool {
    (code.starts_with("08") && code != "08P01")
        || matches!(code, "57P01" | "57P02" | "57P03" | "57P05" | "53300")
}

/// A driver error another connection may cure: the connection closed, an I/O error on it, or
/// a transient SQLSTATE. A TLS failure never is.
pub fn is_transient_pg(e: &tokio_postgres::Error) -> bool {
    if let Some(db) = e.as_db_error() {
        return is_transient_sqlstate(db.code().code());
    }
    if e.is_closed() {
        return true;
    }
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        if c.is::<crate::tls::TlsError>() {
            return false;
        }
        if c.is::<std::io::Error>() {
            return true;
        }
        cause = c.source();
    }
    false
}

/// [`is_transient_pg`] for one of walshift's SQL statements.
pub fn is_transient_sql(e: &SqlError) -> bool {
    is_transient_pg(&e.source)
}

/// A library error another connection may cure: a connect timeout or a transient SQL failure;
/// never a configuration or file system error.
pub fn is_transient(e: &Error) -> bool {
    match e {
        Error::ConnectTimeout { .. } => true,
        Error::Sql(s) => is_transient_sql(s),
        _ => false,
    }
}

/// [`is_transient`] for the identity checks' errors (connecting, probing the server).
pub fn is_transient_identity(e: &crate::identity::IdentityError) -> bool {
    use crate::identity::IdentityError;
    match e {
        IdentityError::Connect(e) | IdentityError::ConnectTo { source: e, .. } => is_transient(e),
        IdentityError::Probe { source, .. } => is_transient_pg(source),
        _ => false,
    }
}

/// An error and its causes as the command line prints them ([`crate::error::chain_text`]), on
/// one line (a server error's DETAIL and HINT joined with `; `), for the log line of a lost
/// connection.
pub fn one_line(e: &(dyn std::error::Error + 'static)) -> String {
    crate::error::chain_text(e).replace('\n', "; ")
}

/// `1.5s`, `12s`, `3m 5s`: a wait or an outage in a log line.
pub fn human(d: Duration) -> String {
    if d < Duration::from_secs(10) && d.subsec_millis() != 0 {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_and_attempts_run_out() {
        let policy = Reconnect::attempts(10);
        let waits: Vec<u64> = (0..8).map(|s| policy.delay(s).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(policy.delay(200), DEFAULT_MAX_DELAY);
        let total: Duration = (0..10).map(|s| policy.delay(s)).sum();
        assert_eq!(total, Duration::from_secs(181));

        let mut b = Backoff::new(Reconnect::attempts(3));
        let lost = b.next(Some(Duration::from_secs(3600))).unwrap();
        assert_eq!((lost.number, lost.of, lost.delay.as_secs()), (1, 3, 1));
        assert_eq!(b.next(None).unwrap().number, 2);
        assert_eq!(b.next(None).unwrap().number, 3);
        assert_eq!(b.next(None), None, "three failed attempts: give up");
        assert_eq!(b.attempts_made(), 3);
    }

    #[test]
    fn a_job_that_ran_again_starts_counting_over_but_a_short_run_keeps_the_delay() {
        let mut b = Backoff::new(Reconnect::attempts(2));
        assert_eq!(
            b.next(Some(Duration::from_secs(60)))
                .unwrap()
                .delay
                .as_secs(),
            1
        );
        assert_eq!(b.next(None).unwrap().delay.as_secs(), 2);
        // Back for 2 s only, then lost again: the count starts over, the delay keeps growing.
        let again = b.next(Some(Duration::from_secs(2))).unwrap();
        assert_eq!((again.number, again.delay.as_secs()), (1, 4));
        // Back for long: both start over.
        let fresh = b.next(Some(Duration::from_secs(45))).unwrap();
        assert_eq!((fresh.number, fresh.delay.as_secs()), (1, 1));
        assert_eq!(
            Backoff::new(Reconnect::never()).next(Some(Duration::ZERO)),
            None
        );
    }

    #[test]
    fn server_answers_that_pass_and_ones_that_do_not() {
        for code in ["08006", "08001", "57P01", "57P02", "57P03", "53300"] {
            assert!(is_transient_sqlstate(code), "{code}");
        }
        for code in [
            "28P01", "28000", "42501", "3D000", "08P01", "42704", "58P01", "55000",
        ] {
            assert!(!is_transient_sqlstate(code), "{code}");
        }
        assert!(is_transient(&Error::ConnectTimeout {
            target: "host=db1".into(),
            timeout: Duration::from_secs(1)
        }));
        assert!(!is_transient(&Error::Config("bad".into())));
        assert!(!is_transient(&Error::io(
            "/buffer",
            std::io::Error::from(std::io::ErrorKind::ConnectionReset)
        )));
    }

    #[test]
    fn log_forms() {
        assert_eq!(human(Duration::from_millis(1500)), "1.5s");
        assert_eq!(human(Duration::from_secs(4)), "4s");
        assert_eq!(human(Duration::from_secs(185)), "3m 5s");
        #[derive(Debug, thiserror::Error)]
        #[error("outer: {0}")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::other("inner"));
        assert_eq!(one_line(&e), "outer: inner");
    }
}
