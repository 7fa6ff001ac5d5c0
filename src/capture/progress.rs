//! The capture progress line: rate, durable position, lag. It observes only.

use std::io::{IsTerminal, Write};
use std::time::{Instant, SystemTime};

use super::stream::StreamState;
use crate::source::pgoutput::PgTimestamp;

pub(super) struct Progress {
    enabled: bool,
    tty: bool,
    started: Instant,
    last: Option<(Instant, u64)>,
}

impl Progress {
    pub fn new(enabled: bool, started: Instant) -> Self {
        Progress {
            enabled,
            tty: std::io::stderr().is_terminal(),
            started,
            last: None,
        }
    }

    fn line(&self, state: &StreamState, rate: f64) -> String {
        let confirmed = state.sendable();
        let silent = state.last_received.0.elapsed().as_secs_f64();
        let lag_bytes = state.server_wal_end.bytes_since(confirmed);
        let lag_time = state
            .last_commit_time
            .and_then(|t| PgTimestamp(t).to_system_time())
            .and_then(|commit| SystemTime::now().duration_since(commit).ok())
            .map(|d| format!("{:.1}s", d.as_secs_f64()))
            .unwrap_or_else(|| "-".into());
        format!(
            "capture: {} txns, {} changes, {:.0} changes/s, {:.1} MiB | durable {} | lag {} bytes, last commit {} ago, last message from the source {:.1}s ago",
            state.transactions,
            state.changes,
            rate,
            state.bytes as f64 / 1048576.0,
            confirmed,
            lag_bytes,
            lag_time,
            silent
        )
    }

    fn emit(&self, line: &str, last: bool) {
        let mut err = std::io::stderr().lock();
        let _ = if self.tty {
            write!(err, "\r\x1b[2K{line}{}", if last { "\n" } else { "" })
        } else {
            writeln!(err, "{line}")
        };
    }

    pub fn update(&mut self, state: &StreamState) {
        if !self.enabled {
            return;
        }
        let now = Instant::now();
        let (t0, c0) = self.last.unwrap_or((self.started, 0));
        let rate = (state.changes - c0) as f64 / now.duration_since(t0).as_secs_f64().max(1e-3);
        self.last = Some((now, state.changes));
        self.emit(&self.line(state, rate), false);
    }

    pub fn finish(&mut self, state: &StreamState) {
        if !self.enabled {
            return;
        }
        let rate = state.changes as f64 / self.started.elapsed().as_secs_f64().max(1e-3);
        self.emit(&self.line(state, rate), true);
    }
}
