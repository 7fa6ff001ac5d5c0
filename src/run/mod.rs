//! Long-running mode (`walshift run`): capture (cloning the target on first start) and replay
//! `--follow` in one process, a live status line, and the [`control`] socket.
//!
//! The process holds the buffer's writer lock (through capture) and the replay lock on the
//! target (through [`ReplayGuard`]), which is how `walshift cutover` sees that
//! capture and replay are already running and only waits for its marker to come through.
//! A cutover does not stop the run; stop it afterwards with Ctrl-C or `stop` on the socket.
//!
//! Files: `mod.rs` (the run: [`LiveConfig`], [`run`]), `control.rs` (the control socket).

pub mod control;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::apply::progress;
use crate::apply::replay::lock::{ReplayGuard, RetakenLock};
use crate::apply::replay::{self, ReplayConfig, ReplayError};
use crate::buffer::BufferMeta;
use crate::capture::{self, CaptureConfig, CaptureError};
use crate::clone::{self, CloneOptions, CloneStatus};
use crate::conn::ConnInfo;
use crate::conn::reconnect::Reconnect;
use crate::cutover::lag::LagMeter;
use crate::lsn::Lsn;
use crate::source::slot;
use control::ControlError;

/// What to run. Every field documents its default and trade-off. The capture and replay
/// settings are the few `walshift run` exposes; each default is capture's or replay's own
/// constant, and everything else is [`CaptureConfig::new`]'s and [`ReplayConfig::new`]'s.
#[derive(Clone, Debug)]
pub struct LiveConfig {
    /// The live database.
    pub source: ConnInfo,
    /// The copy: cloned on first start, then kept in sync.
    pub target: ConnInfo,
    /// Buffer directory; created on first start.
    pub buffer_dir: PathBuf,
    /// Capture's [`CaptureConfig::slot`]. Default [`crate::source::slot::DEFAULT_SLOT`].
    pub slot: String,
    /// Capture's [`CaptureConfig::publication`]. Default
    /// [`crate::source::slot::DEFAULT_PUBLICATION`].
    pub publication: String,
    /// Tables copied in parallel by the first-start clone. Default 2 (as
    /// [`CloneOptions::new`]).
    pub clone_parallel: usize,
    /// Capture's [`CaptureConfig::flush_interval`]. Default
    /// [`capture::DEFAULT_FLUSH_INTERVAL`] (capture's); shorter lowers the drain time of a
    /// cutover, at more fsyncs.
    pub flush_interval: Duration,
    /// Replay's [`ReplayConfig::batch_time`]. Default [`replay::DEFAULT_BATCH_TIME`]
    /// (replay's).
    pub batch_time: Duration,
    /// Replay's [`ReplayConfig::apply_connections`] (target connections per batch). Default
    /// [`replay::DEFAULT_APPLY_CONNECTIONS`] (replay's).
    pub apply_connections: usize,
    /// Print a status line once a second on stderr. Default false (the CLI turns it on).
    pub status_line: bool,
    /// Migration mapping replay applies through. Default none (identity).
    pub transform: Option<Arc<crate::transform::Mapping>>,
    /// Capture's [`CaptureConfig::accept_partition_rewrite`]. Default none.
    pub accept_partition_rewrite: Vec<String>,
    /// After the source or the target restarts, fails over or drops a connection: capture
    /// and replay reconnect this way ([`CaptureConfig::reconnect`], [`ReplayConfig::reconnect`];
    /// each counts its own attempts). Default [`Reconnect::never`] for the library (the CLI:
    /// [`crate::conn::reconnect::DEFAULT_ATTEMPTS`]); the run then ends with the first lost
    /// connection, as a run ends when either task fails.
    pub reconnect: Reconnect,
}

impl LiveConfig {
    pub fn new(source: ConnInfo, target: ConnInfo, buffer_dir: impl Into<PathBuf>) -> Self {
        LiveConfig {
            source,
            target,
            buffer_dir: buffer_dir.into(),
            slot: crate::source::slot::DEFAULT_SLOT.into(),
            publication: crate::source::slot::DEFAULT_PUBLICATION.into(),
            clone_parallel: crate::clone::DEFAULT_PARALLEL,
            flush_interval: capture::DEFAULT_FLUSH_INTERVAL,
            batch_time: replay::DEFAULT_BATCH_TIME,
            apply_connections: replay::DEFAULT_APPLY_CONNECTIONS,
            status_line: false,
            transform: None,
            accept_partition_rewrite: Vec::new(),
            reconnect: Reconnect::never(),
        }
    }
}

/// Failures of the long-running mode.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LiveError {
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("capture failed: {0}")]
    Capture(#[source] CaptureError),
    #[error("replay failed: {0}")]
    Replay(#[source] ReplayError),
    #[error("the clone failed: {0}")]
    Clone(#[source] crate::clone::CloneError),
    /// The clone target was refused (unreachable, or the source itself) before anything ran.
    #[error(transparent)]
    CloneTarget(crate::identity::IdentityError),
    #[error(
        "another walshift replay (a `walshift replay`, `walshift run` or cutover) is applying this buffer to this target; stop it first"
    )]
    ReplayRunning,
    #[error("capture or replay stopped unexpectedly (its task panicked or was cancelled)")]
    CaptureEnded,
    #[error(transparent)]
    Lib(#[from] crate::Error),
    #[error(transparent)]
    Buffer(#[from] crate::buffer::BufferError),
}

/// A failure of the capture task, labelled by what failed: the clone (and its target) are
/// not the capture.
fn capture_failed(e: CaptureError) -> LiveError {
    match e {
        CaptureError::Clone(e) => LiveError::Clone(e),
        CaptureError::Identity(e) => LiveError::CloneTarget(e),
        e => LiveError::Capture(e),
    }
}

/// What a run did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct LiveReport {
    pub durable_lsn: Lsn,
    pub applied_lsn: Lsn,
    pub captured_changes: u64,
    pub replayed_changes: u64,
    pub elapsed_secs: f64,
}

/// Runs capture and replay until `shutdown` resolves, `stop` arrives on the control socket,
/// or one of them fails.
pub async fn run(
    config: LiveConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<LiveReport, LiveError> {
    let started = Instant::now();
    crate::buffer::create_private_dir(&config.buffer_dir)?;
    let status = Arc::new(Mutex::new(serde_json::json!({
        "pid": std::process::id(),
        "phase": "starting",
    })));
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let _server = control::serve(&config.buffer_dir, status.clone(), stop_tx.clone()).await?;

    let mut cap_cfg = CaptureConfig::new(config.source.clone(), &config.buffer_dir);
    cap_cfg.slot = config.slot.clone();
    cap_cfg.publication = config.publication.clone();
    cap_cfg.flush_interval = config.flush_interval;
    cap_cfg.reconnect = config.reconnect;
    cap_cfg.accept_partition_rewrite = config.accept_partition_rewrite.clone();
    let mut clone_opts = CloneOptions::new(config.source.clone(), config.target.clone());
    clone_opts.parallel = config.clone_parallel.max(1);
    clone_opts.progress = config.status_line;
    cap_cfg.clone = Some(clone_opts);
    let mut cap_stop = stop_rx.clone();
    let mut capture = tokio::spawn(capture::run(cap_cfg, async move {
        let _ = cap_stop.wait_for(|s| *s).await;
    }));
    tokio::pin!(shutdown);

    let set_phase = |phase: &str| {
        if let Ok(mut s) = status.lock() {
            s["phase"] = phase.into();
        }
    };
    set_phase("cloning");
    // Replay starts once the clone is done (the target's clone state says so).
    loop {
        if capture.is_finished() {
            return Err(match capture.await {
                Ok(Err(e)) => capture_failed(e),
                _ => LiveError::CaptureEnded,
            });
        }
        if let Ok(Some(s)) = clone::clone_state(&config.target).await
            && s.status == CloneStatus::Done
            && BufferMeta::read(&config.buffer_dir)?.is_some()
        {
            break;
        }
        tokio::select! {
            _ = &mut shutdown => { let _ = stop_tx.send(true); break; }
            _ = stop_rx.wait_for(|s| *s) => break,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
    let mut report = LiveReport::default();
    if *stop_rx.borrow() {
        let _ = (&mut capture).await;
        report.elapsed_secs = started.elapsed().as_secs_f64();
        return Ok(report);
    }
    let meta = BufferMeta::read(&config.buffer_dir)?.expect("checked above");
    let buffer_id = progress::buffer_id(meta.system_identifier, &meta.slot);
    let Some(guard) = ReplayGuard::try_acquire(&config.target, &buffer_id).await? else {
        let _ = stop_tx.send(true);
        let _ = capture.await;
        return Err(LiveError::ReplayRunning);
    };
    let mut rep_cfg = ReplayConfig::new(&config.buffer_dir, config.target.clone());
    rep_cfg.lock = Some(RetakenLock::shared(
        config.target.clone(),
        buffer_id.clone(),
        guard,
    ));
    rep_cfg.reconnect = config.reconnect;
    rep_cfg.follow = true;
    rep_cfg.transform = config.transform.clone();
    rep_cfg.batch_time = config.batch_time;
    rep_cfg.apply_connections = config.apply_connections;
    let mut rep_stop = stop_rx.clone();
    let mut replay = tokio::spawn(replay::run(rep_cfg, async move {
        let _ = rep_stop.wait_for(|s| *s).await;
    }));
    set_phase("streaming");

    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut meter = LagMeter::new(&config.buffer_dir);
    let mut sessions: Option<(tokio_postgres::Client, tokio_postgres::Client)> = None;
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut last_printed = Instant::now() - Duration::from_secs(60);
    // A task's result, once it has ended (its handle must not be polled again).
    let mut cap_done = None;
    let mut rep_done = None;
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = stop_rx.wait_for(|s| *s) => break,
            r = &mut capture => { cap_done = Some(r); break }
            r = &mut replay => { rep_done = Some(r); break }
            _ = tick.tick() => {
                // A session lost (a cutover terminates client sessions) is opened again.
                if sessions.is_none() {
                    sessions = match (config.source.connect().await, config.target.connect().await) {
                        (Ok(s), Ok(t)) => Some((s, t)),
                        _ => None,
                    };
                }
                let Some((src, tgt)) = &sessions else { continue };
                let applied = progress::read_applied(tgt, &buffer_id).await;
                let durable = slot::confirmed_flush_lsn(src, &config.slot).await;
                let (Ok(applied), Ok(durable)) = (applied, durable) else {
                    sessions = None;
                    continue;
                };
                let applied = applied.unwrap_or(Lsn::ZERO);
                let lag = meter.measure(src, &config.slot, applied).await.ok();
                let line = format!(
                    "run: streaming | durable {} | applied {} | lag {} | up {:.0}s",
                    durable.unwrap_or_default(),
                    applied,
                    lag.map(|l| format!("{:.1}s ({} bytes to capture, {} to replay)", l.secs, l.capture_bytes, l.replay_bytes))
                        .unwrap_or_else(|| "-".into()),
                    started.elapsed().as_secs_f64()
                );
                if let Ok(mut s) = status.lock() {
                    *s = serde_json::json!({
                        "pid": std::process::id(),
                        "phase": "streaming",
                        "durable_lsn": durable.map(|l| l.to_string()),
                        "applied_lsn": applied.to_string(),
                        "lag": lag,
                        "uptime_secs": started.elapsed().as_secs_f64(),
                        "source": config.source.redacted(),
                        "target": config.target.redacted(),
                    });
                }
                report.applied_lsn = applied;
                if config.status_line {
                    if tty {
                        eprint!("\r\x1b[2K{line}");
                    } else if last_printed.elapsed() >= Duration::from_secs(10) {
                        eprintln!("{line}");
                        last_printed = Instant::now();
                    }
                }
            }
        }
    }
    set_phase("stopping");
    if config.status_line && tty {
        eprintln!();
    }
    let _ = stop_tx.send(true);
    let rep = match rep_done {
        Some(r) => r,
        None => replay.await,
    };
    let cap = match cap_done {
        Some(r) => r,
        None => capture.await,
    };
    let mut failure = None;
    match rep {
        Ok(Ok(r)) => {
            report.applied_lsn = r.applied_lsn;
            report.replayed_changes = r.changes;
        }
        Ok(Err(e)) => failure = Some(LiveError::Replay(e)),
        Err(_) => failure = Some(LiveError::CaptureEnded),
    }
    match cap {
        Ok(Ok(r)) => {
            report.durable_lsn = r.durable_lsn;
            report.captured_changes = r.changes;
        }
        Ok(Err(e)) => failure = failure.or(Some(capture_failed(e))),
        Err(_) => failure = failure.or(Some(LiveError::CaptureEnded)),
    }
    report.elapsed_secs = started.elapsed().as_secs_f64();
    match failure {
        Some(e) => Err(e),
        None => Ok(report),
    }
}
