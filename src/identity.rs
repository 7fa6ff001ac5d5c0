//! Which database a connection reaches (cluster system identifier, database, server version),
//! and the checks every command that writes to a target makes with it before writing anything:
//!
//! - the target is never the source: same system identifier *and* same database is refused
//!   whatever the flags (two databases of one cluster are fine);
//! - replay and cutover write only into a target cloned from the buffer's source and slot (its
//!   `walshift.clone_state` record), one replay already accepted for this buffer (its
//!   `walshift.applied` row), or one the operator vouches for ([`TargetOrigin::LoadedElsewhere`],
//!   the CLI's `--target-not-cloned-by-walshift`).
//!
//! It also holds the check that a buffer belongs to the source it is pointed at
//! ([`check_buffer_source`]): capture makes it before streaming, cutover before fencing.

use tokio_postgres::Client;

use crate::buffer::BufferMeta;
use crate::conn::ConnInfo;

/// What a server says about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerIdentity {
    /// `pg_control_system().system_identifier`: the same on a cluster and its physical
    /// standbys, different for every `initdb`.
    pub system_identifier: u64,
    pub database: String,
    pub database_oid: u32,
    /// `server_version_num`, e.g. 150004.
    pub server_version: i32,
}

impl ServerIdentity {
    /// Reads the identity of the server and database `client` is connected to.
    pub async fn probe(client: &Client) -> Result<ServerIdentity, tokio_postgres::Error> {
        let r = client
            .query_one(
                "SELECT s.system_identifier::text, current_database()::text, d.oid, \
                        current_setting('server_version_num')::int4 \
                 FROM pg_control_system() s, pg_database d WHERE d.datname = current_database()",
                &[],
            )
            .await?;
        Ok(ServerIdentity {
            system_identifier: r.get::<_, String>(0).parse().unwrap_or(0),
            database: r.get(1),
            database_oid: r.get(2),
            server_version: r.get(3),
        })
    }

    /// The same database of the same cluster (or of one of its physical standbys).
    pub fn is_database(&self, system_identifier: u64, database: &str) -> bool {
        self.system_identifier == system_identifier && self.database == database
    }
}

/// How a buffer's record (`buffer.json`) differs from the source a command was pointed at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BufferMismatch {
    /// The buffer was captured from another slot than the one named.
    Slot { buffer: String, named: String },
    /// The buffer was captured from another cluster (system identifier).
    System { buffer: u64, source: u64 },
}

/// The check that buffer `meta` belongs to this source: captured from slot `slot` of the
/// cluster `system_identifier`. With `None` (the source not reached yet) only the slot is
/// compared; the slot is compared first.
pub fn check_buffer_source(
    meta: &BufferMeta,
    slot: &str,
    system_identifier: Option<u64>,
) -> Result<(), BufferMismatch> {
    if meta.slot != slot {
        return Err(BufferMismatch::Slot {
            buffer: meta.slot.clone(),
            named: slot.to_owned(),
        });
    }
    match system_identifier {
        Some(source) if source != meta.system_identifier => Err(BufferMismatch::System {
            buffer: meta.system_identifier,
            source,
        }),
        _ => Ok(()),
    }
}

/// How the target of a replay or cutover got its rows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TargetOrigin {
    /// Cloned by walshift from the buffer's slot (checked against its clone record). Default.
    #[default]
    ClonedByWalshift,
    /// Loaded another way (a restore, a fixture, a test). The operator guarantees it holds the
    /// source's rows exactly as of the slot's consistent point, the LSN the buffer starts at;
    /// walshift cannot check that. Still never the source itself.
    LoadedElsewhere,
}

/// Refusals of a target, each naming both sides and the way out.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    #[error(transparent)]
    Connect(#[from] crate::Error),

    #[error("connecting to the {side}: {source}")]
    ConnectTo {
        side: &'static str,
        #[source]
        source: crate::Error,
    },

    #[error(
        "cannot read the identity of the {side} ({conn}): {message}; the role needs to run \
         pg_control_system() (allowed to every role by default) and read pg_database"
    )]
    Probe {
        side: &'static str,
        conn: String,
        message: String,
        #[source]
        source: tokio_postgres::Error,
    },

    #[error(
        "refusing to {action} {target}: it is the source database itself (system identifier \
         {system_identifier}, database {database:?}) and writing there would destroy the live \
         data. No flag overrides this; point the target at the copy (another cluster, or another \
         database of this one)"
    )]
    TargetIsSource {
        action: &'static str,
        target: String,
        system_identifier: u64,
        database: String,
    },

    #[error(
        "refusing to {action} {target}: it has no walshift clone record (walshift.clone_state) \
         for this buffer ({buffer}){found}. Replaying a buffer into a database that does not hold \
         the source's rows as of the slot's snapshot corrupts it silently. Clone it with \
         `walshift capture --clone-to`; if you loaded it yourself exactly as of the slot's \
         consistent point (and vouch for that), pass --target-not-cloned-by-walshift to `walshift \
         replay` (cutover accepts a target replay has already written to)"
    )]
    NotCloned {
        action: &'static str,
        target: String,
        /// The buffer's source and slot, as text.
        buffer: String,
        /// What the target's record says instead (empty when there is none).
        found: String,
    },

    #[error(
        "refusing to {action} {target}: its clone (snapshot {snapshot}) is not finished, so its \
         tables are incomplete; let `walshift capture --clone-to` (or `run`) finish it"
    )]
    CloneUnfinished {
        action: &'static str,
        target: String,
        snapshot: String,
    },
}

/// The server's message (and detail) of a failed statement.
fn db_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => match db.detail() {
            Some(d) => format!("{} ({d})", db.message()),
            None => db.message().to_owned(),
        },
        None => e.to_string(),
    }
}

fn probe_err(
    side: &'static str,
    conn: &str,
) -> impl FnOnce(tokio_postgres::Error) -> IdentityError {
    let conn = conn.to_owned();
    move |source| IdentityError::Probe {
        side,
        conn,
        message: db_message(&source),
        source,
    }
}

/// Probes `target`; refuses it if it is the database `system_identifier`/`database`.
pub async fn refuse_source(
    target: &Client,
    target_name: &str,
    action: &'static str,
    system_identifier: u64,
    database: &str,
) -> Result<ServerIdentity, IdentityError> {
    let id = ServerIdentity::probe(target)
        .await
        .map_err(probe_err("target", target_name))?;
    if id.is_database(system_identifier, database) {
        return Err(IdentityError::TargetIsSource {
            action,
            target: target_name.to_owned(),
            system_identifier,
            database: database.to_owned(),
        });
    }
    Ok(id)
}

/// Refuses a clone target that is the source: probes both, before anything is created on
/// either.
pub async fn check_clone_target(source: &ConnInfo, target: &ConnInfo) -> Result<(), IdentityError> {
    let connect_to = |side| move |source| IdentityError::ConnectTo { side, source };
    let s = source.connect().await.map_err(connect_to("source"))?;
    let t = target.connect().await.map_err(connect_to("clone target"))?;
    let src = ServerIdentity::probe(&s)
        .await
        .map_err(probe_err("source", &source.redacted()))?;
    refuse_source(
        &t,
        &target.redacted(),
        "clone into",
        src.system_identifier,
        &src.database,
    )
    .await?;
    Ok(())
}

/// The check replay, online verify and cutover make before writing to `target` (connected as
/// `client`) for the buffer `meta`: never the source; then, unless `origin` says the operator
/// loaded it, a finished clone of this buffer's source and slot, or a target this buffer was
/// already replayed into (`walshift.applied` has its row). Reads only.
pub async fn check_replay_target(
    client: &Client,
    target_name: &str,
    meta: &BufferMeta,
    origin: TargetOrigin,
    action: &'static str,
) -> Result<(), IdentityError> {
    refuse_source(
        client,
        target_name,
        action,
        meta.system_identifier,
        &meta.database,
    )
    .await?;
    if origin == TargetOrigin::LoadedElsewhere {
        return Ok(());
    }
    let read = |e| probe_err("target", target_name)(e);
    let has_state: bool = client
        .query_one(
            "SELECT to_regclass('walshift.clone_state') IS NOT NULL",
            &[],
        )
        .await
        .map(|r| r.get(0))
        .map_err(read)?;
    // Through jsonb: records written before the origin columns existed read too.
    let record: Option<serde_json::Value> = if has_state {
        client
            .query_opt(
                "SELECT to_jsonb(s)::text FROM walshift.clone_state s WHERE id = 1",
                &[],
            )
            .await
            .map_err(read)?
            .and_then(|r| serde_json::from_str(r.get::<_, &str>(0)).ok())
    } else {
        None
    };
    let field =
        |r: &serde_json::Value, k: &str| r.get(k).and_then(|v| v.as_str()).map(str::to_owned);
    if let Some(r) = &record {
        let matches = field(r, "source_system_identifier")
            == Some(meta.system_identifier.to_string())
            && field(r, "source_database").as_deref() == Some(meta.database.as_str())
            && field(r, "source_slot").as_deref() == Some(meta.slot.as_str());
        if matches {
            if field(r, "state").as_deref() != Some("done") {
                return Err(IdentityError::CloneUnfinished {
                    action,
                    target: target_name.to_owned(),
                    snapshot: field(r, "snapshot").unwrap_or_default(),
                });
            }
            return Ok(());
        }
    }
    let buffer_id = crate::apply::progress::buffer_id(meta.system_identifier, &meta.slot);
    let replayed = crate::apply::progress::find_applied(client, &buffer_id)
        .await
        .map_err(|e| read(e.source))?
        .is_some();
    if replayed {
        return Ok(());
    }
    let found = match &record {
        None => String::new(),
        Some(r) => match field(r, "source_system_identifier") {
            None => "; its clone record was written by an older walshift and does not say which \
                     source it was cloned from"
                .to_owned(),
            Some(sys) => format!(
                "; its clone record names source system identifier {sys}, database {:?}, slot {:?}",
                field(r, "source_database").unwrap_or_default(),
                field(r, "source_slot").unwrap_or_default()
            ),
        },
    };
    Err(IdentityError::NotCloned {
        action,
        target: target_name.to_owned(),
        buffer: format!(
            "source system identifier {}, database {:?}, slot {:?}",
            meta.system_identifier, meta.database, meta.slot
        ),
        found,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffer_source() {
        let meta = BufferMeta::new(7, "app", "walshift", "walshift");
        assert_eq!(check_buffer_source(&meta, "walshift", Some(7)), Ok(()));
        assert_eq!(check_buffer_source(&meta, "walshift", None), Ok(()));
        assert_eq!(
            check_buffer_source(&meta, "walshift", Some(8)),
            Err(BufferMismatch::System {
                buffer: 7,
                source: 8
            })
        );
        assert_eq!(
            check_buffer_source(&meta, "other", Some(8)),
            Err(BufferMismatch::Slot {
                buffer: "walshift".into(),
                named: "other".into()
            })
        );
    }
}
