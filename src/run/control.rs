//! The control socket of `walshift run`: `<buffer>/control.sock`, a Unix stream socket with
//! mode 0600 (only the owner can talk to it). One request line, one JSON answer line:
//!
//! - `status` → the run's current state (phase, durable and applied LSNs, lag, pid).
//! - `stop` → `{"ok":true}`, and the run stops cleanly (as on Ctrl-C).
//!
//! The socket answering is how `walshift status` knows a run is alive. `walshift cutover`
//! needs nothing from it: it sees the run through the buffer's writer lock and the replay
//! lock ([`crate::apply::replay::lock`]) and simply waits for the marker to come through.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// File name of the socket in the buffer directory.
pub const SOCKET_FILE: &str = "control.sock";

/// Control socket failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    #[error(
        "another walshift run is serving buffer {0} (its control socket answers); stop it first"
    )]
    AlreadyRunning(PathBuf),
    #[error("control socket {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A bound control socket; dropping it stops serving and removes the socket file.
pub struct ControlServer {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The socket path of a buffer.
pub fn socket_path(buffer_dir: &Path) -> PathBuf {
    buffer_dir.join(SOCKET_FILE)
}

/// Serves `status` from the shared value and `stop` by sending on `stop`.
pub async fn serve(
    buffer_dir: &Path,
    status: Arc<Mutex<serde_json::Value>>,
    stop: tokio::sync::watch::Sender<bool>,
) -> Result<ControlServer, ControlError> {
    let path = socket_path(buffer_dir);
    let io = |source| ControlError::Io {
        path: path.clone(),
        source,
    };
    if path.exists() {
        if UnixStream::connect(&path).await.is_ok() {
            return Err(ControlError::AlreadyRunning(buffer_dir.to_path_buf()));
        }
        std::fs::remove_file(&path).map_err(io)?; // stale, from a run that died
    }
    let listener = UnixListener::bind(&path).map_err(io)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let status = status.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let (r, mut w) = stream.into_split();
                let mut line = String::new();
                let mut r = BufReader::new(r);
                if tokio::time::timeout(Duration::from_secs(5), r.read_line(&mut line))
                    .await
                    .is_err()
                {
                    return;
                }
                let answer = match line.trim() {
                    "status" => status.lock().map(|s| s.clone()).unwrap_or_default(),
                    "stop" => {
                        let _ = stop.send(true);
                        serde_json::json!({"ok": true})
                    }
                    other => {
                        serde_json::json!({"error": format!("unknown request {other:?}: use status or stop")})
                    }
                };
                let mut out = answer.to_string();
                out.push('\n');
                let _ = w.write_all(out.as_bytes()).await;
            });
        }
    });
    Ok(ControlServer { path, task })
}

/// Sends one request to a buffer's control socket. `Ok(None)`: no run is serving it.
pub async fn request(
    buffer_dir: &Path,
    request: &str,
) -> std::io::Result<Option<serde_json::Value>> {
    let path = socket_path(buffer_dir);
    let stream = match UnixStream::connect(&path).await {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let (r, mut w) = stream.into_split();
    w.write_all(format!("{request}\n").as_bytes()).await?;
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(5),
        BufReader::new(r).read_line(&mut line),
    )
    .await
    .map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "control socket did not answer",
        )
    })??;
    serde_json::from_str(&line)
        .map(Some)
        .map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn status_and_stop_over_a_private_socket() {
        let dir = tempfile::tempdir().unwrap();
        assert!(request(dir.path(), "status").await.unwrap().is_none());
        let status = Arc::new(Mutex::new(serde_json::json!({"phase": "streaming"})));
        let (tx, mut rx) = tokio::sync::watch::channel(false);
        let server = serve(dir.path(), status, tx).await.unwrap();
        let mode = std::fs::metadata(socket_path(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let v = request(dir.path(), "status").await.unwrap().unwrap();
        assert_eq!(v["phase"], "streaming");
        let (tx2, _) = tokio::sync::watch::channel(false);
        assert!(matches!(
            serve(dir.path(), Arc::default(), tx2).await,
            Err(ControlError::AlreadyRunning(_))
        ));
        let v = request(dir.path(), "stop").await.unwrap().unwrap();
        assert_eq!(v["ok"], true);
        rx.changed().await.unwrap();
        assert!(*rx.borrow());
        drop(server);
        assert!(!socket_path(dir.path()).exists());
    }
}
