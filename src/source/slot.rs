//! The replication slot and the publication on the source, over a regular SQL session: their
//! default names, the slot-name rule, a slot's row of `pg_replication_slots`, dropping a slot,
//! and the publication's existence, creation and removal. Creating a slot (with an exported
//! snapshot) and streaming from it go through the replication protocol
//! ([`super::replication`]); the checks before a publication is created are
//! [`super::preflight`]'s.
//!
//! Every function returns the driver's error: the caller says what it was doing
//! ([`crate::SqlContext`]).

use tokio_postgres::Client;

use crate::lsn::Lsn;
use crate::sql::quote_ident;

/// The replication slot walshift creates and reads when none is named (`--slot`).
pub const DEFAULT_SLOT: &str = "walshift";

/// The publication walshift creates and streams when none is named (`--publication`).
pub const DEFAULT_PUBLICATION: &str = "walshift";

/// PostgreSQL's rule for replication slot names: 1–63 lower-case letters, digits and
/// underscores. Checked before anything is created, so a bad name never leaves a publication
/// behind.
pub fn valid_slot_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// A slot's row in `pg_replication_slots`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotRow {
    /// Output plugin (`pgoutput` for walshift's slots); empty for a physical slot.
    pub plugin: String,
    /// The database the slot decodes; empty for a physical slot.
    pub database: String,
    /// A walsender is streaming from it.
    pub active: bool,
    /// That walsender's pid.
    pub active_pid: Option<i32>,
    /// How far its consumer confirmed: the slot resends every transaction committed after it.
    /// `None` for a physical slot.
    pub confirmed_flush_lsn: Option<Lsn>,
    /// The oldest WAL the slot retains on the source.
    pub restart_lsn: Option<Lsn>,
}

/// The row of slot `slot`, or `None` when there is no such slot.
pub async fn read(client: &Client, slot: &str) -> Result<Option<SlotRow>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT plugin::text, database::text, active, active_pid, \
                    confirmed_flush_lsn::text, restart_lsn::text \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    let lsn = |r: &tokio_postgres::Row, i| {
        r.get::<_, Option<String>>(i)
            .and_then(|s| s.parse::<Lsn>().ok())
    };
    Ok(row.map(|r| SlotRow {
        plugin: r.get::<_, Option<String>>(0).unwrap_or_default(),
        database: r.get::<_, Option<String>>(1).unwrap_or_default(),
        active: r.get(2),
        active_pid: r.get(3),
        confirmed_flush_lsn: lsn(&r, 4),
        restart_lsn: lsn(&r, 5),
    }))
}

/// Whether slot `slot` exists.
pub async fn exists(client: &Client, slot: &str) -> Result<bool, tokio_postgres::Error> {
    Ok(read(client, slot).await?.is_some())
}

/// The slot's confirmed flush position (what its consumer made durable), if the slot exists
/// and has one.
pub async fn confirmed_flush_lsn(
    client: &Client,
    slot: &str,
) -> Result<Option<Lsn>, tokio_postgres::Error> {
    Ok(read(client, slot)
        .await?
        .and_then(|r| r.confirmed_flush_lsn))
}

/// Drops slot `slot` if it exists. Fails while a walsender streams from it.
pub async fn drop_if_exists(client: &Client, slot: &str) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(())
}

/// Whether publication `name` exists.
pub async fn publication_exists(
    client: &Client,
    name: &str,
) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&name])
        .await?
        .is_some())
}

/// Creates publication `name` for `tables` (quoted `schema.table` names), or `FOR ALL TABLES`
/// when `None`. Run [`super::preflight::ensure_publication`]'s checks first: publishing a table
/// without a replica identity makes the live site's UPDATEs and DELETEs on it fail.
pub async fn create_publication(
    client: &Client,
    name: &str,
    tables: Option<&[String]>,
) -> Result<(), tokio_postgres::Error> {
    let ddl = match tables {
        None => format!("CREATE PUBLICATION {} FOR ALL TABLES", quote_ident(name)),
        Some(t) => format!(
            "CREATE PUBLICATION {} FOR TABLE {}",
            quote_ident(name),
            t.join(", ")
        ),
    };
    client.batch_execute(&ddl).await
}

/// Drops publication `name` if it exists.
pub async fn drop_publication_if_exists(
    client: &Client,
    name: &str,
) -> Result<(), tokio_postgres::Error> {
    client
        .batch_execute(&format!("DROP PUBLICATION IF EXISTS {}", quote_ident(name)))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_names() {
        assert!(valid_slot_name(DEFAULT_SLOT));
        assert!(valid_slot_name("a_1"));
        assert!(valid_slot_name(&"a".repeat(63)));
        assert!(!valid_slot_name(&"a".repeat(64)));
        assert!(!valid_slot_name(""));
        assert!(!valid_slot_name("Walshift"));
        assert!(!valid_slot_name("wal-shift"));
    }
}
