//! Load on a source: a writer committing generated transactions until stopped, and a
//! workload of numbered transactions run one after another.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio_postgres::Client;

/// A task committing `txn(n)` for n = 1, 2, … (each a `batch_execute`, so a `BEGIN; …;
/// COMMIT;` text is one transaction) until stopped. A failed transaction fails the test.
pub struct Writer {
    stop: Arc<AtomicBool>,
    commits: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    /// Starts writing on `client`, sleeping `pause` after each commit.
    pub fn start(
        client: Client,
        pause: Duration,
        txn: impl Fn(u64) -> String + Send + 'static,
    ) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let commits = Arc::new(AtomicU64::new(0));
        let task = {
            let (stop, commits) = (stop.clone(), commits.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    client.batch_execute(&txn(n)).await.unwrap();
                    commits.fetch_add(1, Ordering::Relaxed);
                    if !pause.is_zero() {
                        tokio::time::sleep(pause).await;
                    }
                }
            })
        };
        Writer {
            stop,
            commits,
            task,
        }
    }

    /// Transactions committed so far.
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// Stops after the transaction in flight; the number committed.
    pub async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        self.commits.load(Ordering::Relaxed)
    }
}

/// Runs `txn(i)` for each `i` of `range`, one `batch_execute` after another.
pub async fn each(client: &Client, range: std::ops::Range<i64>, txn: impl Fn(i64) -> String) {
    for i in range {
        client.batch_execute(&txn(i)).await.unwrap();
    }
}
