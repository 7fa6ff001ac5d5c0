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
//! **Contract:** [`lift`] restores exactly the previous setting (the same value, or no
//! database-wide entry at all). The previous setting is also written to
//! `<buffer>/cutover-fence.json` before the database is altered, so that if walshift dies
//! while fenced the next cutover (or the operator) restores the right value; the file is
//! removed once the fence is lifted or the cutover completed.
//!
//! **Role settings.** A role's own setting (`ALTER ROLE app [IN DATABASE shop] SET
//! default_transaction_read_only = off`, in `pg_db_role_setting`) takes precedence over the
//! database's and would let that role's new sessions write. The fence removes every such
//! override that is not `on` (for this database, or role-wide), records each in the state file
//! and the journal, and [`lift`] puts each back exactly. After terminating the sessions it
//! proves the fence: for every role that was connected and every role that may log in to the
//! database, the setting a new session of that role starts with (database-and-role, then role,
//! then database entry — PostgreSQL's order) must be `on`; and a new session of walshift's own
//! role must start read-only. Connection-string options (`options=-c
//! default_transaction_read_only=off`) and `PGOPTIONS` are client-side and cannot be seen.
//!
//! The fence is a soft one: a client that connects afterwards and runs
//! `SET default_transaction_read_only = off` can still write. `hook` mode (the `--before`
//! command stops the application) or stopping the application yourself (`none`) are the
//! alternatives.

use std::path::{Path, PathBuf};

use tokio_postgres::Client;

use super::journal::Step;
use super::preflight::prepared_xacts;
use super::{Ctx, CutoverError, hooks};
use crate::lsn::Lsn;
use crate::sql::{quote_ident, quote_literal};
use crate::{SqlContext, SqlError};

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
    #[error(
        "the read-only fence of database {database:?} does not hold for role(s) {roles}: a new session of theirs \
         would start writable. Remove the setting (ALTER ROLE … RESET default_transaction_read_only), or use \
         --fence hook"
    )]
    NotReadOnly { database: String, roles: String },
    #[error(
        "role {role:?} may not lift the role settings that would defeat the read-only fence ({overrides}): \
         the fence removes them for the window and restores them on abort, which needs superuser or CREATEROLE. \
         Grant that, remove the settings yourself, or use --fence hook"
    )]
    OverridePrivilege { role: String, overrides: String },
    #[error("{path}: {source}")]
    StateFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Sql(#[from] SqlError),
}

/// What is needed to lift the fence: kept in memory and in `<buffer>/cutover-fence.json`.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct FenceState {
    pub database: String,
    /// The database-wide `default_transaction_read_only` before the fence; `None` = not set.
    pub previous: Option<String>,
    pub cutover_id: String,
    /// Role settings removed by the fence (restored exactly by [`lift`]).
    #[serde(default)]
    pub role_overrides: Vec<RoleOverride>,
}

/// A role's own `default_transaction_read_only` setting that would defeat the fence.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RoleOverride {
    pub role: String,
    /// `true`: `ALTER ROLE … IN DATABASE <this database> SET`; `false`: role-wide.
    pub in_database: bool,
    pub value: String,
}

impl RoleOverride {
    fn clause(&self, database: &str) -> String {
        if self.in_database {
            format!(
                "ALTER ROLE {} IN DATABASE {}",
                quote_ident(&self.role),
                quote_ident(database)
            )
        } else {
            format!("ALTER ROLE {}", quote_ident(&self.role))
        }
    }
}

impl std::fmt::Display for RoleOverride {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "role {:?}{} = {}",
            self.role,
            if self.in_database {
                " in this database"
            } else {
                ""
            },
            self.value
        )
    }
}

/// Whether a `default_transaction_read_only` value means on (PostgreSQL's boolean spellings).
fn is_on(value: &str) -> bool {
    let v = value.trim().trim_matches('\'').to_ascii_lowercase();
    !v.is_empty()
        && (v == "1"
            || (v.len() >= 2 && "on".starts_with(&v))
            || "true".starts_with(&v)
            || "yes".starts_with(&v))
}

/// Role settings of `default_transaction_read_only` that are not `on`, for this database or
/// role-wide: what would let a role's new sessions write through the fence.
pub async fn role_overrides(client: &Client) -> Result<Vec<RoleOverride>, FenceError> {
    let rows = client
        .query(
            "SELECT r.rolname::text, s.setdatabase <> 0, substr(kv, 31) \
             FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole, unnest(s.setconfig) kv \
             WHERE s.setrole <> 0 \
               AND s.setdatabase IN (0, (SELECT oid FROM pg_database WHERE datname = current_database())) \
               AND kv LIKE 'default\\_transaction\\_read\\_only=%' \
             ORDER BY 1, 2",
            &[],
        )
        .await
        .sql_context("reading the roles' settings")?;
    Ok(rows
        .iter()
        .map(|r| RoleOverride {
            role: r.get(0),
            in_database: r.get(1),
            value: r.get(2),
        })
        .filter(|o| !is_on(&o.value))
        .collect())
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
        .sql_context("reading the database's settings")?;
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
        .sql_context("checking the privileges needed to fence")?;
    if row.get::<_, Option<bool>>(2) != Some(true) {
        return Err(FenceError::Privilege {
            role: row.get(0),
            database: row.get(1),
        });
    }
    let overrides = role_overrides(client).await?;
    if !overrides.is_empty() {
        let may: bool = client
            .query_one(
                "SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user",
                &[],
            )
            .await
            .sql_context("checking the privileges needed to fence")?
            .get(0);
        if !may {
            return Err(FenceError::OverridePrivilege {
                role: row.get(0),
                overrides: overrides
                    .iter()
                    .map(|o| o.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
    }
    Ok(())
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
        .sql_context("listing the database's sessions")?;
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
        .sql_context("reading the database name")?
        .get(0);
    let mut role_overrides = role_overrides(client).await?;
    let previous = match leftover {
        Some(l) if l.database == database => {
            // Removed by the cutover that died: the catalog no longer shows them.
            for o in l.role_overrides.into_iter().rev() {
                if !role_overrides
                    .iter()
                    .any(|c| c.role == o.role && c.in_database == o.in_database)
                {
                    role_overrides.insert(0, o);
                }
            }
            l.previous
        }
        _ => current_setting(client).await?,
    };
    let state = FenceState {
        database,
        previous,
        cutover_id: cutover_id.to_owned(),
        role_overrides,
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
        .sql_context(
            "fencing the source (ALTER DATABASE … SET default_transaction_read_only = on)",
        )?;
    for o in &state.role_overrides {
        client
            .batch_execute(&format!(
                "{} RESET default_transaction_read_only",
                o.clause(&state.database)
            ))
            .await
            .with_sql_context(|| format!("fencing the source (removing the setting of {o})"))?;
    }
    // Signal every session at once, then watch them go: `pg_terminate_backend(pid, timeout)`
    // would wait for each in turn, sleeping 100 ms between its checks.
    let terminated = client
        .query(
            "SELECT pid, usename::text FROM pg_stat_activity, pg_terminate_backend(pid) AS signalled \
             WHERE datname = current_database() AND backend_type = 'client backend' \
               AND pid <> pg_backend_pid() AND pid <> ALL($1)",
            &[&spare],
        )
        .await
        .sql_context("terminating the source's other sessions")?;
    let pids: Vec<i32> = terminated.iter().map(|r| r.get(0)).collect();
    let connected: Vec<String> = terminated
        .iter()
        .filter_map(|r| r.get::<_, Option<String>>(1))
        .collect();
    let timeout = std::time::Duration::from_millis(terminate_timeout_ms.max(1) as u64);
    wait_exited(client, &pids, timeout, &state.database).await?;
    prove(client, state, &connected).await?;
    Ok(pids.len() as u64)
}

/// Waits until every session of `pids` (already signalled) has exited, looking every
/// millisecond; one still there after `timeout` is an error.
pub(super) async fn wait_exited(
    client: &Client,
    pids: &[i32],
    timeout: std::time::Duration,
    database: &str,
) -> Result<(), FenceError> {
    let started = std::time::Instant::now();
    while !pids.is_empty() {
        let lingering: Vec<i32> = client
            .query(
                "SELECT pid FROM pg_stat_activity WHERE pid = ANY($1)",
                &[&pids],
            )
            .await
            .sql_context("waiting for terminated sessions to exit")?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if lingering.is_empty() {
            break;
        }
        if started.elapsed() >= timeout {
            return Err(FenceError::Lingering {
                count: lingering.len(),
                database: database.to_owned(),
                timeout_ms: timeout.as_millis() as i64,
                pids: lingering,
            });
        }
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    Ok(())
}

/// The catalog half of the proof: the setting a new session of each role in `connected`, and
/// of each role that may log in to the database, starts with must be `on`.
async fn prove(
    client: &Client,
    state: &FenceState,
    connected: &[String],
) -> Result<(), FenceError> {
    let open: Vec<String> = role_settings(client, connected)
        .await?
        .into_iter()
        .filter(|(_, v)| !v.as_deref().is_some_and(is_on))
        .map(|(role, v)| format!("{role:?} ({})", v.unwrap_or_else(|| "not set".into())))
        .collect();
    if open.is_empty() {
        Ok(())
    } else {
        Err(FenceError::NotReadOnly {
            database: state.database.clone(),
            roles: open.join(", "),
        })
    }
}

/// The catalog half of the proof's reading alone, its answer unused: what a dry run's
/// rehearsal spends on it (unfenced, the answer means nothing).
pub(super) async fn prove_catalog(client: &Client) -> Result<(), FenceError> {
    role_settings(client, &[]).await.map(|_| ())
}

/// For every role in `connected` and every role that may log in to the database: the
/// `default_transaction_read_only` a new session of it starts with (database-and-role, then
/// role, then database entry — PostgreSQL's order), if any.
async fn role_settings(
    client: &Client,
    connected: &[String],
) -> Result<Vec<(String, Option<String>)>, FenceError> {
    let rows = client
        .query(
            "WITH d AS (SELECT oid FROM pg_database WHERE datname = current_database()), \
                  roles AS (SELECT oid, rolname FROM pg_roles \
                            WHERE rolname = ANY($1) \
                               OR (rolcanlogin AND has_database_privilege(oid, (SELECT oid FROM d), 'CONNECT'))) \
             SELECT r.rolname::text, ( \
                 SELECT substr(kv, 31) FROM pg_db_role_setting s, unnest(s.setconfig) kv \
                 WHERE kv LIKE 'default\\_transaction\\_read\\_only=%' \
                   AND ((s.setdatabase = (SELECT oid FROM d) AND s.setrole = r.oid) \
                     OR (s.setdatabase = 0 AND s.setrole = r.oid) \
                     OR (s.setdatabase = (SELECT oid FROM d) AND s.setrole = 0) \
                     OR (s.setdatabase = 0 AND s.setrole = 0)) \
                 ORDER BY (s.setrole = 0), (s.setdatabase = 0) LIMIT 1) \
             FROM roles r ORDER BY 1",
            &[&connected],
        )
        .await
        .sql_context("checking the fence holds for every role")?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Waits for the live half of the fence's proof, started by [`phase`] (nothing to wait for
/// in a dry run or without the read-only fence). Called before anything is switched.
pub(super) async fn proven(ctx: &mut Ctx<'_>) -> Result<(), CutoverError> {
    let Some(proof) = ctx.fence_proof.take() else {
        return Ok(());
    };
    match proof.await {
        Ok(r) => Ok(r?),
        Err(e) => Err(FenceError::NotReadOnly {
            database: ctx
                .fence_state
                .as_ref()
                .map(|s| s.database.clone())
                .unwrap_or_default(),
            roles: format!("(the check of a new session stopped: {e})"),
        }
        .into()),
    }
}

/// The live half of the proof: a new session (of walshift's own role) starts read-only.
pub async fn prove_new_session(
    source: &crate::conn::ConnInfo,
    database: &str,
) -> Result<(), FenceError> {
    let client = source
        .connect()
        .await
        .map_err(|e| FenceError::NotReadOnly {
            database: database.to_owned(),
            roles: format!("(could not open a new session to check: {e})"),
        })?;
    let row = client
        .query_one(
            "SELECT current_user::text, current_setting('transaction_read_only')",
            &[],
        )
        .await
        .sql_context("checking a new session starts read-only")?;
    if row.get::<_, String>(1) == "on" {
        Ok(())
    } else {
        Err(FenceError::NotReadOnly {
            database: database.to_owned(),
            roles: format!(
                "{:?} (a new session is not read-only)",
                row.get::<_, String>(0)
            ),
        })
    }
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
        .sql_context("unfencing the source (making this session read-write)")?;
    client
        .batch_execute(&stmt)
        .await
        .sql_context("unfencing the source (restoring default_transaction_read_only)")?;
    for o in &state.role_overrides {
        client
            .batch_execute(&format!(
                "{} SET default_transaction_read_only = {}",
                o.clause(&state.database),
                quote_literal(&o.value)
            ))
            .await
            .with_sql_context(|| format!("unfencing the source (restoring the setting of {o})"))?;
    }
    FenceState::remove(buffer_dir)
}

/// The fence phase, where the window starts: the `--before` hook, then the fence `config.fence`
/// asks for (read-only: [`raise`], then [`prove_new_session`] in the background), journaled; a
/// prepared transaction that appeared since preflight aborts. Records the target's applied
/// position at the fence (what the drain starts from).
///
/// Before the window starts, with the read-only fence: [`prepare`] (the state file with what
/// lifting must restore) and the journal's `fenced` step are written durably — nothing there
/// reaches a client, and both are on disk before the database is altered. A dry run opens the
/// session its rehearsal will terminate ([`super::projection`]).
pub(super) async fn phase(ctx: &mut Ctx<'_>, own_pid: i32) -> Result<(), CutoverError> {
    let config = ctx.config;
    let dir = &config.buffer_dir;
    let mut prepared = None;
    match (config.fence, config.dry_run) {
        (FenceMode::ReadOnly, false) => {
            ctx.tl.begin("fence record");
            let state = prepare(&ctx.src, dir, &ctx.report.cutover_id, ctx.leftover.take()).await?;
            ctx.report.fence_previous_setting = state.previous.clone();
            ctx.fence_state = Some(state.clone());
            if let Some(j) = &mut ctx.journal {
                j.fence = Some(state.clone());
            }
            ctx.record(Step::Fenced, "read-only")?;
            ctx.tl.end(
                &mut ctx.report,
                "what lifting the fence restores, and the journal, on disk (before the window)",
            );
            prepared = Some(state);
        }
        (FenceMode::ReadOnly, true) => {
            let spare = [&[own_pid], ctx.verify_sessions.source_pids()].concat();
            let n = other_sessions(&ctx.src, &spare).await?.len();
            ctx.dry_probe = Some(super::projection::Probes::open(&config.source, n).await?);
        }
        _ => {}
    }
    ctx.window_start = Some(ctx.tl.begin("fence"));
    let mut note = String::new();
    if !config.dry_run
        && let Some(cmd) = &config.before
    {
        let (run, r) = hooks::run_hook("before", cmd, &ctx.hook_ctx, config.hook_timeout).await;
        ctx.report.hooks.push(run);
        r?;
        note.push_str("before hook ran; ");
    }
    let within = ctx.remaining();
    if !config.dry_run
        && let Some(p) = &mut ctx.pooler
    {
        // Recorded before PAUSE is sent: an abort from here on resumes the pool.
        ctx.pooler_paused = true;
        let waited = p
            .pause(&config.buffer_dir, &ctx.report.cutover_id, within)
            .await?;
        if let Some(r) = &mut ctx.report.pooler {
            r.pause_wait_secs = Some(waited.as_secs_f64());
        }
        note.push_str(&format!(
            "PgBouncer paused ({:.1} ms for transactions in flight); ",
            waited.as_secs_f64() * 1e3
        ));
    } else if config.dry_run && ctx.pooler.is_some() {
        note.push_str("dry run: would PAUSE in PgBouncer; ");
    }
    match (config.fence, prepared) {
        (FenceMode::ReadOnly, Some(state)) => {
            let timeout = config.terminate_timeout.min(ctx.remaining());
            ctx.report.fence_role_settings_removed =
                state.role_overrides.iter().map(|o| o.to_string()).collect();
            let spare = [&[own_pid], ctx.verify_sessions.source_pids()].concat();
            // From here an abort lifts the fence (raise may fail half-way).
            ctx.fence_raised = true;
            let n = raise(&ctx.src, &state, &spare, timeout.as_millis() as i64).await?;
            // Nothing can write any more: verify's reading of the source may start.
            super::verify::start_source(ctx);
            // The live half of the proof opens a session (a few milliseconds): it runs while
            // the marker is written and drained, and the switch waits for it ([`proven`]).
            // A session that could still write fails it, and the cutover aborts.
            let (source, database) = (config.source.clone(), state.database.clone());
            ctx.fence_proof = Some(tokio::spawn(async move {
                prove_new_session(&source, &database).await
            }));
            // One prepared between preflight's check and the termination survives it.
            let pending = prepared_xacts(&ctx.src).await?;
            if !pending.is_empty() {
                return Err(CutoverError::PreparedTransactions {
                    when: "after the fence".into(),
                    list: pending.join(", "),
                });
            }
            ctx.report.sessions_terminated = n;
            note.push_str(&format!("read-only; {n} session(s) terminated"));
        }
        (FenceMode::ReadOnly, None) => {
            let probes = ctx.dry_probe.as_ref().map(|p| p.pids.as_slice());
            let spare = [
                &[own_pid],
                ctx.verify_sessions.source_pids(),
                probes.unwrap_or_default(),
            ]
            .concat();
            let n = other_sessions(&ctx.src, &spare).await?.len();
            note.push_str(&format!("dry run: would terminate {n} session(s)"));
        }
        (FenceMode::Hook, _) => {
            ctx.record(Step::Fenced, "by the before hook")?;
            note.push_str("fenced by the before hook")
        }
        (FenceMode::None, _) => {
            ctx.record(Step::Fenced, "none")?;
            note.push_str("none (writes stopped by the operator)")
        }
    }
    let applied_at_fence = crate::apply::progress::read_applied(&ctx.tgt, &ctx.buffer_id)
        .await?
        .unwrap_or(Lsn::ZERO);
    ctx.report.applied_at_fence = Some(applied_at_fence);
    ctx.tl.end(&mut ctx.report, note.trim_end_matches("; "));
    ctx.deadline_check("fence")?;
    Ok(())
}
