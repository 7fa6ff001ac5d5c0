//! Fencing the source: stopping writes so the marker is the last thing in its WAL that the
//! target needs.
//!
//! `read-only` mode: remember the database's own `default_transaction_read_only` setting
//! (`pg_db_role_setting`, database-wide entry), `ALTER DATABASE … SET
//! default_transaction_read_only = on`, then terminate every other client session of that
//! database — waiting until each has exited, so no transaction of theirs can commit after the
//! marker. walshift's own sessions (passed by backend pid) and all WAL senders (replication
//! connections, including capture's) are spared. New sessions start read-only.
//!
//! **Contract:** [`Fence::lift`] restores exactly the previous setting (the same value, or no
//! database-wide entry at all). The previous setting is also written to
//! `<buffer>/cutover-fence.json` before the database is altered, so that if walshift dies
//! while fenced the next cutover (or the operator) restores the right value; the file is
//! removed once the fence is lifted or the cutover completed.
//!
//! The fence is a soft one: a client that connects afterwards and runs
//! `SET default_transaction_read_only = off` can still write. `hook` mode (the `--before`
//! command stops the application) or stopping the application yourself (`none`) are the
//! alternatives.

use std::path::{Path, PathBuf};

use tokio_postgres::Client;

use crate::sql::{quote_ident, quote_literal};

/// How the source is fenced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FenceMode {
    /// `ALTER DATABASE … SET default_transaction_read_only = on` and terminate other sessions.
    #[default]
    ReadOnly,
    /// The `--before` hook stops the application.
    Hook,
    /// The operator already stopped writes.
    None,
}

impl FenceMode {
    pub fn as_str(self) -> &'static str {
        match self {
            FenceMode::ReadOnly => "read-only",
            FenceMode::Hook => "hook",
            FenceMode::None => "none",
        }
    }
}

impl std::str::FromStr for FenceMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "read-only" => Ok(FenceMode::ReadOnly),
            "hook" => Ok(FenceMode::Hook),
            "none" => Ok(FenceMode::None),
            _ => Err(format!(
                "unknown fence mode {s:?}: use read-only, hook or none"
            )),
        }
    }
}

/// Fence failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FenceError {
    #[error(
        "role {role:?} may not fence database {database:?}: it must own the database (ALTER DATABASE) \
         or be superuser, and be allowed to terminate its sessions (GRANT pg_signal_backend TO {role}). \
         Grant that, or use --fence hook / --fence none"
    )]
    Privilege { role: String, database: String },
    #[error(
        "{count} session(s) of database {database:?} did not exit within {timeout_ms} ms of being terminated \
         (pids {pids:?}); a write of theirs could still commit after the marker"
    )]
    Lingering {
        count: usize,
        database: String,
        timeout_ms: i64,
        pids: Vec<i32>,
    },
    #[error("{path}: {source}")]
    StateFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{context}: {source}")]
    Sql {
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },
}

fn sql(context: &str) -> impl FnOnce(tokio_postgres::Error) -> FenceError + '_ {
    move |source| FenceError::Sql {
        context: context.to_owned(),
        source,
    }
}

/// What is needed to lift the fence: kept in memory and in `<buffer>/cutover-fence.json`.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct FenceState {
    pub database: String,
    /// The database-wide `default_transaction_read_only` before the fence; `None` = not set.
    pub previous: Option<String>,
    pub cutover_id: String,
}

/// Name of the fence state file in the buffer directory.
pub const STATE_FILE: &str = "cutover-fence.json";

impl FenceState {
    pub fn path(buffer_dir: &Path) -> PathBuf {
        buffer_dir.join(STATE_FILE)
    }

    /// A state file left by a cutover that died while fenced.
    pub fn read_leftover(buffer_dir: &Path) -> Result<Option<FenceState>, FenceError> {
        let path = Self::path(buffer_dir);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| FenceError::StateFile {
                    path,
                    source: std::io::Error::other(e),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(FenceError::StateFile { path, source }),
        }
    }

    fn write(&self, buffer_dir: &Path) -> Result<(), FenceError> {
        let path = Self::path(buffer_dir);
        let body = serde_json::to_vec_pretty(self).expect("serializable");
        super::journal::write_durable(&path, &body)
            .map_err(|source| FenceError::StateFile { path, source })
    }

    /// Removes the state file (the fence is lifted or the cutover is complete).
    pub fn remove(buffer_dir: &Path) -> Result<(), FenceError> {
        let path = Self::path(buffer_dir);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(FenceError::StateFile { path, source }),
        }
    }
}

/// The database's own (database-wide, any role) `default_transaction_read_only` setting.
pub async fn current_setting(client: &Client) -> Result<Option<String>, FenceError> {
    let row = client
        .query_opt(
            "SELECT s.setconfig FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase \
             WHERE d.datname = current_database() AND s.setrole = 0",
            &[],
        )
        .await
        .map_err(sql("reading the database's settings"))?;
    let config: Option<Vec<String>> = row.and_then(|r| r.get(0));
    Ok(config.unwrap_or_default().into_iter().find_map(|kv| {
        kv.strip_prefix("default_transaction_read_only=")
            .map(str::to_owned)
    }))
}

/// Checks the role may alter the database and terminate its sessions (read-only mode).
pub async fn check_privileges(client: &Client) -> Result<(), FenceError> {
    let row = client
        .query_one(
            "SELECT current_user::text, current_database()::text, \
                    (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) \
                    OR (pg_has_role(current_user, d.datdba, 'MEMBER') \
                        AND pg_has_role(current_user, 'pg_signal_backend', 'MEMBER')) \
             FROM pg_database d WHERE d.datname = current_database()",
            &[],
        )
        .await
        .map_err(sql("checking the privileges needed to fence"))?;
    if row.get::<_, Option<bool>>(2) == Some(true) {
        Ok(())
    } else {
        Err(FenceError::Privilege {
            role: row.get(0),
            database: row.get(1),
        })
    }
}

/// Client sessions of the database other than `spare`: what read-only fencing would terminate.
pub async fn other_sessions(client: &Client, spare: &[i32]) -> Result<Vec<i32>, FenceError> {
    let rows = client
        .query(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() \
             AND backend_type = 'client backend' AND pid <> pg_backend_pid() AND pid <> ALL($1)",
            &[&spare],
        )
        .await
        .map_err(sql("listing the database's sessions"))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Records what lifting the fence must restore: reads the database's current setting (or
/// takes `leftover`'s, from a cutover that died while fenced) and writes the state file. Call
/// before [`raise`]; if `raise` fails part-way, [`lift`] with this state undoes it.
pub async fn prepare(
    client: &Client,
    buffer_dir: &Path,
    cutover_id: &str,
    leftover: Option<FenceState>,
) -> Result<FenceState, FenceError> {
    let database: String = client
        .query_one("SELECT current_database()::text", &[])
        .await
        .map_err(sql("reading the database name"))?
        .get(0);
    let previous = match leftover {
        Some(l) if l.database == database => l.previous,
        _ => current_setting(client).await?,
    };
    let state = FenceState {
        database,
        previous,
        cutover_id: cutover_id.to_owned(),
    };
    state.write(buffer_dir)?;
    Ok(state)
}

/// Raises the read-only fence; returns how many sessions were terminated. Waits up to
/// `terminate_timeout_ms` for each terminated session to exit; one that does not is an error
/// (its transaction could still commit after the marker).
pub async fn raise(
    client: &Client,
    state: &FenceState,
    spare: &[i32],
    terminate_timeout_ms: i64,
) -> Result<u64, FenceError> {
    client
        .batch_execute(&format!(
            "ALTER DATABASE {} SET default_transaction_read_only = on",
            quote_ident(&state.database)
        ))
        .await
        .map_err(sql(
            "fencing the source (ALTER DATABASE … SET default_transaction_read_only = on)",
        ))?;
    // Signal every session at once, then watch them go: `pg_terminate_backend(pid, timeout)`
    // would wait for each in turn, sleeping 100 ms between its checks.
    let pids: Vec<i32> = client
        .query(
            "SELECT pid FROM pg_stat_activity, pg_terminate_backend(pid) AS signalled \
             WHERE datname = current_database() AND backend_type = 'client backend' \
               AND pid <> pg_backend_pid() AND pid <> ALL($1)",
            &[&spare],
        )
        .await
        .map_err(sql("terminating the source's other sessions"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let started = std::time::Instant::now();
    let timeout = std::time::Duration::from_millis(terminate_timeout_ms.max(1) as u64);
    loop {
        let lingering: Vec<i32> = if pids.is_empty() {
            Vec::new()
        } else {
            client
                .query(
                    "SELECT pid FROM pg_stat_activity WHERE pid = ANY($1)",
                    &[&pids],
                )
                .await
                .map_err(sql("waiting for terminated sessions to exit"))?
                .iter()
                .map(|r| r.get(0))
                .collect()
        };
        if lingering.is_empty() {
            break;
        }
        if started.elapsed() >= timeout {
            return Err(FenceError::Lingering {
                count: lingering.len(),
                database: state.database.clone(),
                timeout_ms: terminate_timeout_ms,
                pids: lingering,
            });
        }
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    Ok(pids.len() as u64)
}

/// Restores the previous setting exactly and removes the state file. Works over any session of
/// the source, also one opened after the fence (it turns the session's read-only default off
/// first).
pub async fn lift(
    client: &Client,
    buffer_dir: &Path,
    state: &FenceState,
) -> Result<(), FenceError> {
    let db = quote_ident(&state.database);
    let stmt = match &state.previous {
        Some(v) => format!(
            "ALTER DATABASE {db} SET default_transaction_read_only = {}",
            quote_literal(v)
        ),
        None => format!("ALTER DATABASE {db} RESET default_transaction_read_only"),
    };
    // Separate round trips: statements sent together share one implicit transaction, which
    // would already be read-only in a session opened after the fence.
    client
        .batch_execute("SET default_transaction_read_only = off")
        .await
        .map_err(sql("unfencing the source (making this session read-write)"))?;
    client.batch_execute(&stmt).await.map_err(sql(
        "unfencing the source (restoring default_transaction_read_only)",
    ))?;
    FenceState::remove(buffer_dir)
}
