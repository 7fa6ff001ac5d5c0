//! Capture and replay that cutover runs in its own process when none runs elsewhere (which
//! the buffer's writer lock and the replay lock tell): started in preflight, checked while cutover waits (they only end on
//! their own by failing), and stopped cleanly at the end, whatever the outcome.

use std::time::Duration;

use tokio::task::JoinHandle;

use super::{CutoverConfig, CutoverError, CutoverReport};
use crate::apply::replay::lock::ReplayGuard;
use crate::apply::replay::{self, ReplayConfig, ReplayError, ReplayReport};
use crate::capture::{self, CaptureConfig, CaptureError, CaptureReport};

type CaptureTask = JoinHandle<Result<CaptureReport, CaptureError>>;
type ReplayTask = JoinHandle<Result<ReplayReport, ReplayError>>;
type StopSender = tokio::sync::oneshot::Sender<()>;

/// Capture and replay tasks started by cutover, and how to stop them.
pub(super) struct Helpers {
    capture: Option<(CaptureTask, StopSender)>,
    replay: Option<(ReplayTask, StopSender, ReplayGuard)>,
}

impl Helpers {
    /// An error if an in-process task has ended (they only end on their own by failing).
    pub(super) async fn check(&mut self) -> Result<(), CutoverError> {
        if self.capture.as_ref().is_some_and(|c| c.0.is_finished()) {
            let (h, _) = self.capture.take().expect("checked");
            return Err(match h.await {
                Ok(Err(e)) => CutoverError::Capture(e),
                _ => CutoverError::TaskEnded { what: "capture" },
            });
        }
        if self.replay.as_ref().is_some_and(|r| r.0.is_finished()) {
            let (h, _, _) = self.replay.take().expect("checked");
            return Err(match h.await {
                Ok(Err(e)) => CutoverError::Replay(e),
                _ => CutoverError::TaskEnded { what: "replay" },
            });
        }
        Ok(())
    }

    /// Stops the tasks cleanly (capture flushes and confirms what it received).
    pub(super) async fn stop(&mut self) -> Vec<String> {
        let mut warnings = Vec::new();
        if let Some((h, tx, guard)) = self.replay.take() {
            let _ = tx.send(());
            match tokio::time::timeout(Duration::from_secs(60), h).await {
                Ok(Ok(Ok(_))) => {}
                Ok(Ok(Err(e))) => warnings.push(format!("in-process replay: {e}")),
                _ => warnings.push("in-process replay did not stop in time".into()),
            }
            drop(guard);
        }
        if let Some((h, tx)) = self.capture.take() {
            let _ = tx.send(());
            match tokio::time::timeout(Duration::from_secs(60), h).await {
                Ok(Ok(Ok(_))) => {}
                Ok(Ok(Err(e))) => warnings.push(format!("in-process capture: {e}")),
                _ => warnings.push("in-process capture did not stop in time".into()),
            }
        }
        warnings
    }
}

/// Starts capture here unless a capture holds the buffer's writer lock, and replay unless a
/// replay holds the buffer's replay lock on the target; the report says which ran where.
pub(super) async fn start(
    config: &CutoverConfig,
    buffer_id: &str,
    report: &mut CutoverReport,
) -> Result<Helpers, CutoverError> {
    let dir = &config.buffer_dir;
    let mut helpers = Helpers {
        capture: None,
        replay: None,
    };
    let capture_external = crate::buffer::writer_running(dir).map_err(|e| {
        CutoverError::Connect(crate::Error::io(dir.join(crate::buffer::LOCK_FILE), e))
    })?;
    if capture_external {
        report.capture = "external".into();
    } else {
        report.capture = "in-process".into();
        let mut cfg = CaptureConfig::new(config.source.clone(), dir.clone());
        cfg.slot = config.slot.clone();
        cfg.publication = config.publication.clone();
        cfg.flush_interval = config.capture_flush_interval;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let h = tokio::spawn(capture::run(cfg, async move {
            let _ = rx.await;
        }));
        helpers.capture = Some((h, tx));
    }
    let guard = match ReplayGuard::try_acquire(&config.target, buffer_id).await {
        Ok(g) => g,
        Err(e) => {
            helpers.stop().await; // never leave a capture running behind an error
            return Err(e.into());
        }
    };
    match guard {
        None => report.replay = "external".into(),
        Some(guard) => {
            report.replay = "in-process".into();
            let mut cfg = ReplayConfig::new(dir.clone(), config.target.clone());
            cfg.transform = config.transform.clone();
            cfg.follow = true;
            cfg.batch_time = config.replay_batch_time;
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            let h = tokio::spawn(replay::run(cfg, async move {
                let _ = rx.await;
            }));
            helpers.replay = Some((h, tx, guard));
        }
    }
    Ok(helpers)
}
