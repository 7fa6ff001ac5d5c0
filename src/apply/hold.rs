//! Holds: a running replay told to stop at a source position while something (online verify)
//! reads the target there, then to go on.
//!
//! A hold is one row per buffer in `walshift.hold` on the target: a generation (from the
//! sequence `walshift.hold_generation`, so it never repeats), a hold LSN `H`, an expiry, and
//! what replay writes back: the generation it reached and its applied position.
//!
//! **Replay's side** ([`HoldWatch`], only in `--follow` mode). A background task reads the row
//! every [`POLL`] on a session of its own; the applier consults the last value in memory, so a
//! hold costs no round trip per transaction. While a hold with LSN `H` is live (not expired):
//! - the applier never starts a source transaction whose commit LSN (pgoutput's Begin
//!   `final_lsn`, the start of the commit record) is at or after `H`: at such a Begin it commits
//!   the open batch (a transaction is never split), waits for the writer, records
//!   `reached_generation` and its applied position, and waits until the hold moves past that
//!   commit LSN, is removed, or expires;
//! - at the end of the buffer (everything read committed), it records `reached_generation`
//!   once it has read the buffer again *after* learning that generation, so every transaction
//!   already durable in the buffer when the hold was set is applied.
//!
//! **The holder's side** ([`set`], [`poll`], [`release`]). A generation reached means: no
//! transaction with commit LSN ≥ `H` is applied, and every transaction with commit LSN < `H`
//! that was durable in the buffer when the hold was set is. A holder that needs *all* of them
//! (online verify) sets the hold only once the capture slot's confirmed position has passed
//! `H` (capture confirms only what the buffer has fsynced).
//!
//! **Expiry.** A hold not refreshed by its holder within its time to live stops holding, so a
//! killed verify never blocks replay for longer than that.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_postgres::Client;

use crate::conn::ConnInfo;
use crate::lsn::Lsn;
use crate::{SqlContext, SqlError};

/// How often replay reads the hold row.
pub const POLL: Duration = Duration::from_millis(100);

const CREATE: &str = "CREATE SCHEMA IF NOT EXISTS walshift;
     CREATE SEQUENCE IF NOT EXISTS walshift.hold_generation;
     CREATE TABLE IF NOT EXISTS walshift.hold (
       buffer_id          text PRIMARY KEY,
       holder             text NOT NULL,
       generation         bigint NOT NULL,
       hold_lsn           pg_lsn NOT NULL,
       expires_at         timestamptz NOT NULL,
       reached_generation bigint,
       reached_lsn        pg_lsn,
       reached_at         timestamptz
     );";

/// Creates `walshift.hold` (and its generation sequence) if needed; safe against concurrent
/// creators ([`crate::sql::create_own_objects`]).
pub async fn ensure_table(client: &Client) -> Result<(), SqlError> {
    crate::sql::create_own_objects(client, CREATE)
        .await
        .sql_context("creating walshift.hold on the target")
}

/// A live hold as replay sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HoldState {
    pub generation: i64,
    /// No transaction with a commit LSN at or after this is applied.
    pub lsn: Lsn,
}

impl HoldState {
    fn blocks(&self, commit_lsn: Lsn) -> bool {
        commit_lsn >= self.lsn
    }
}

/// The commit LSN a Begin record carries (`'B' | final_lsn u64 | …`).
pub fn begin_commit_lsn(payload: &[u8]) -> Option<Lsn> {
    if payload.len() < 9 || payload[0] != b'B' {
        return None;
    }
    Some(Lsn(u64::from_be_bytes(payload[1..9].try_into().ok()?)))
}

/// Replay's view of the hold row, kept current by a background task.
pub struct HoldWatch {
    client: Arc<Client>,
    buffer_id: String,
    rx: watch::Receiver<Option<HoldState>>,
    task: tokio::task::JoinHandle<()>,
    /// The generation known at the previous end-of-buffer visit.
    learned: Option<i64>,
    reported: Option<i64>,
}

impl Drop for HoldWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn read_hold(client: &Client, buffer_id: &str) -> Result<Option<HoldState>, SqlError> {
    let row = client
        .query_opt(
            "SELECT generation, hold_lsn::text FROM walshift.hold \
             WHERE buffer_id = $1 AND expires_at > now()",
            &[&buffer_id],
        )
        .await
        .sql_context("reading walshift.hold on the target")?;
    Ok(row.and_then(|r| {
        Some(HoldState {
            generation: r.get(0),
            lsn: r.get::<_, String>(1).parse().ok()?,
        })
    }))
}

impl HoldWatch {
    /// Opens a session of its own on the target and starts following the hold row of
    /// `buffer_id`.
    pub async fn start(
        target: &ConnInfo,
        buffer_id: &str,
    ) -> Result<HoldWatch, super::replay::ReplayError> {
        let client = Arc::new(target.connect().await?);
        ensure_table(&client).await?;
        let first = read_hold(&client, buffer_id).await?;
        let (tx, rx) = watch::channel(first);
        let (c, id) = (client.clone(), buffer_id.to_owned());
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(POLL).await;
                match read_hold(&c, &id).await {
                    Ok(s) => {
                        tx.send_if_modified(|cur| {
                            let changed = *cur != s;
                            *cur = s;
                            changed
                        });
                    }
                    Err(e) => {
                        // The session is gone: holds are not seen until replay restarts (and
                        // replay's own session, on the same server, fails too).
                        tracing::warn!("{e}; replay no longer sees holds");
                        tx.send_replace(None);
                        return;
                    }
                }
            }
        });
        Ok(HoldWatch {
            client,
            buffer_id: buffer_id.to_owned(),
            rx,
            task,
            learned: None,
            reported: None,
        })
    }

    /// A live hold stops replay before the transaction this Begin record opens.
    pub fn blocks(&self, begin_payload: &[u8]) -> bool {
        match (*self.rx.borrow(), begin_commit_lsn(begin_payload)) {
            (Some(h), Some(c)) => h.blocks(c),
            _ => false,
        }
    }

    async fn report(&mut self, generation: i64, applied: Lsn) -> Result<(), SqlError> {
        if self.reported == Some(generation) {
            return Ok(());
        }
        self.client
            .execute(
                "UPDATE walshift.hold SET reached_generation = $2, \
                 reached_lsn = $3::text::pg_lsn, reached_at = now() \
                 WHERE buffer_id = $1 AND generation = $2",
                &[&self.buffer_id, &generation, &applied.to_string()],
            )
            .await
            .sql_context("recording the hold reached in walshift.hold")?;
        tracing::info!(generation, applied = %applied, "replay holding");
        self.reported = Some(generation);
        Ok(())
    }

    /// Replay stands before a transaction [`blocks`](Self::blocks) stopped, with everything
    /// before it committed (`applied`). Records the hold reached and waits until no live hold
    /// blocks the transaction any more (true) or `shutdown` resolves (false).
    pub async fn wait_at<F: std::future::Future<Output = ()>>(
        &mut self,
        applied: Lsn,
        begin_payload: &[u8],
        shutdown: &mut std::pin::Pin<&mut F>,
    ) -> Result<bool, SqlError> {
        let Some(commit) = begin_commit_lsn(begin_payload) else {
            return Ok(true);
        };
        loop {
            let state = *self.rx.borrow_and_update();
            match state {
                Some(h) if h.blocks(commit) => self.report(h.generation, applied).await?,
                _ => {
                    self.learned = None;
                    return Ok(true);
                }
            }
            tokio::select! {
                _ = shutdown.as_mut() => return Ok(false),
                r = self.rx.changed() => {
                    if r.is_err() {
                        return Ok(true);
                    }
                }
            }
        }
    }

    /// Replay has applied and committed everything the buffer holds (`applied`) and is about
    /// to read it again: records a hold whose generation was already known at the previous
    /// such visit (a read of the buffer lies in between).
    pub async fn at_end(&mut self, applied: Lsn) -> Result<(), SqlError> {
        let state = *self.rx.borrow();
        match state {
            Some(h) => {
                if self.learned == Some(h.generation) {
                    self.report(h.generation, applied).await?;
                }
                self.learned = Some(h.generation);
            }
            None => self.learned = None,
        }
        Ok(())
    }
}

/// Why a hold could not be taken or kept.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HoldError {
    #[error(
        "replay of this buffer is held by {holder} until {expires_at} (another online verify); \
         wait for it to finish, or delete its row from walshift.hold on the target if it is gone"
    )]
    HeldByOther { holder: String, expires_at: String },
    #[error(
        "the hold on replay was lost (its row in walshift.hold was deleted, or it expired and \
         another holder took it)"
    )]
    Lost,
    #[error(transparent)]
    Sql(#[from] SqlError),
}

/// Sets (or moves) the hold of `buffer_id` to `lsn` for `holder`, live for `ttl`; returns its
/// new generation. Refused while another holder's hold is live.
pub async fn set(
    client: &Client,
    buffer_id: &str,
    holder: &str,
    lsn: Lsn,
    ttl: Duration,
) -> Result<i64, HoldError> {
    let row = client
        .query_opt(
            "INSERT INTO walshift.hold AS h (buffer_id, holder, generation, hold_lsn, expires_at) \
             VALUES ($1, $2, nextval('walshift.hold_generation'), $3::text::pg_lsn, \
                     now() + make_interval(secs => $4)) \
             ON CONFLICT (buffer_id) DO UPDATE SET holder = EXCLUDED.holder, \
                 generation = EXCLUDED.generation, hold_lsn = EXCLUDED.hold_lsn, \
                 expires_at = EXCLUDED.expires_at, reached_generation = NULL, \
                 reached_lsn = NULL, reached_at = NULL \
             WHERE h.holder = EXCLUDED.holder OR h.expires_at <= now() \
             RETURNING generation",
            &[&buffer_id, &holder, &lsn.to_string(), &ttl.as_secs_f64()],
        )
        .await
        .sql_context("setting the hold in walshift.hold on the target")?;
    if let Some(r) = row {
        return Ok(r.get(0));
    }
    let other = client
        .query_opt(
            "SELECT holder, expires_at::text FROM walshift.hold WHERE buffer_id = $1",
            &[&buffer_id],
        )
        .await
        .sql_context("reading walshift.hold on the target")?;
    Err(match other {
        Some(r) => HoldError::HeldByOther {
            holder: r.get(0),
            expires_at: r.get(1),
        },
        None => HoldError::Lost,
    })
}

/// Extends `holder`'s hold by `ttl` from now and returns what replay reached: the generation
/// and its applied position, once it has.
pub async fn poll(
    client: &Client,
    buffer_id: &str,
    holder: &str,
    ttl: Duration,
) -> Result<Option<(i64, Lsn)>, HoldError> {
    let row = client
        .query_opt(
            "UPDATE walshift.hold SET expires_at = now() + make_interval(secs => $3) \
             WHERE buffer_id = $1 AND holder = $2 \
             RETURNING reached_generation, reached_lsn::text",
            &[&buffer_id, &holder, &ttl.as_secs_f64()],
        )
        .await
        .sql_context("refreshing the hold in walshift.hold on the target")?
        .ok_or(HoldError::Lost)?;
    let generation: Option<i64> = row.get(0);
    let lsn = row
        .get::<_, Option<String>>(1)
        .and_then(|s| s.parse::<Lsn>().ok());
    Ok(generation.zip(lsn))
}

/// Removes `holder`'s hold: replay goes on.
pub async fn release(client: &Client, buffer_id: &str, holder: &str) -> Result<(), HoldError> {
    client
        .execute(
            "DELETE FROM walshift.hold WHERE buffer_id = $1 AND holder = $2",
            &[&buffer_id, &holder],
        )
        .await
        .sql_context("releasing the hold in walshift.hold on the target")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn begin_carries_the_commit_lsn() {
        let mut p = vec![b'B'];
        p.extend_from_slice(&0x0000_0001_0000_0010u64.to_be_bytes());
        p.extend_from_slice(&[0; 12]);
        assert_eq!(begin_commit_lsn(&p), Some(Lsn(0x1_0000_0010)));
        assert_eq!(begin_commit_lsn(b"C123456789"), None);
        assert_eq!(begin_commit_lsn(b"B12"), None);
        let h = HoldState {
            generation: 1,
            lsn: Lsn(100),
        };
        assert!(h.blocks(Lsn(100)) && h.blocks(Lsn(101)) && !h.blocks(Lsn(99)));
    }
}
