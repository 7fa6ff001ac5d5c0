//! Preflight on the source: is it able to feed walshift, and which tables does the publication
//! carry? Run before anything is created, because creating a publication on a table without a
//! replica identity would make the live site's UPDATEs and DELETEs on it fail.

use tokio_postgres::Client;

use super::slot;
use crate::error::{SqlContext, SqlError};
use crate::sql::{quote_ident, quote_qualified};

/// Why the source cannot be captured as asked. Each message names the fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PreflightError {
    #[error(
        "the source has wal_level={actual}; logical decoding needs wal_level=logical. \
         Fix: ALTER SYSTEM SET wal_level = logical; then restart the source server"
    )]
    WalLevel { actual: String },

    #[error(
        "the source runs PostgreSQL {version}; walshift needs 14 or newer (pgoutput with messages)"
    )]
    Version { version: String },

    #[error(
        "role {user:?} may not stream replication. Fix: ALTER ROLE {quoted} REPLICATION; \
         (and allow it in pg_hba.conf for database connections)",
        quoted = quote_ident(user)
    )]
    NotReplicationRole { user: String },

    #[error(
        "table {name:?} not found on the source (check --tables; names follow the search_path, use schema.table)"
    )]
    TableNotFound { name: String },

    /// Source objects walshift cannot carry faithfully; nothing was created on the source.
    #[error(
        "{} source object(s) cannot be carried faithfully (nothing was created on the source):\n{}",
        .refusals.len(),
        .refusals.iter().map(|r| format!("  - {r}")).collect::<Vec<_>>().join("\n")
    )]
    Refused { refusals: Vec<Refusal> },

    #[error(
        "publication {name:?} already exists and publishes {existing:?}, not the requested {requested:?}. \
         Fix: omit --tables to use it as it is, or DROP PUBLICATION {quoted} on the source",
        quoted = quote_ident(name)
    )]
    PublicationMismatch {
        name: String,
        existing: Vec<String>,
        requested: Vec<String>,
    },

    #[error(transparent)]
    Sql(#[from] SqlError),
}

/// One source object walshift cannot carry faithfully: which, why, and the fix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The object, e.g. `table "public"."t"` or `publication "walshift"`.
    pub object: String,
    pub reason: String,
    pub fix: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}. Fix: {}", self.object, self.reason, self.fix)
    }
}

/// Facts about the source server.
#[derive(Clone, Debug)]
pub struct ServerInfo {
    /// `server_version_num`, e.g. 150004.
    pub version_num: i32,
    /// `server_version`, e.g. "15.4 (Debian 15.4-1)".
    pub version: String,
    /// Current database.
    pub database: String,
}

/// A published table, as `schema.table` plus its OID.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableRef {
    pub oid: u32,
    pub schema: String,
    pub name: String,
}

impl TableRef {
    /// From a row of `(oid, schema text, name text)`.
    fn from_row(r: &tokio_postgres::Row) -> TableRef {
        TableRef {
            oid: r.get(0),
            schema: r.get(1),
            name: r.get(2),
        }
    }

    /// `"schema"."name"`, quoted for SQL.
    pub fn quoted(&self) -> String {
        quote_qualified(&self.schema, &self.name)
    }
}

impl std::fmt::Display for TableRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.quoted())
    }
}

/// Checks the server settings and the role's privileges.
pub async fn check_server(client: &Client) -> Result<ServerInfo, PreflightError> {
    let row = client
        .query_one(
            "SELECT current_setting('wal_level'), current_setting('server_version_num')::int, \
             current_setting('server_version'), current_database(), \
             (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user), current_user",
            &[],
        )
        .await
        .sql_context("reading source settings")?;
    let wal_level: String = row.get(0);
    let version_num: i32 = row.get(1);
    let version: String = row.get(2);
    let database: String = row.get(3);
    let can_replicate: Option<bool> = row.get(4);
    let user: String = row.get(5);
    if version_num < 140000 {
        return Err(PreflightError::Version { version });
    }
    if wal_level != "logical" {
        return Err(PreflightError::WalLevel { actual: wal_level });
    }
    if can_replicate != Some(true) {
        return Err(PreflightError::NotReplicationRole { user });
    }
    Ok(ServerInfo {
        version_num,
        version,
        database,
    })
}

/// Makes sure publication `name` exists and returns the tables it carries.
///
/// `tables`: `None` publishes every user table (`FOR ALL TABLES`); `Some` publishes exactly
/// those. An existing publication is used as it is unless `tables` asks for a different set.
///
/// Contract: every check runs *before* the publication is created, and any refusal returns
/// [`PreflightError::Refused`] listing every offending object at once (see
/// [`check_tables`] and [`check_publication`]); the caller creates the slot only after this
/// returned `Ok`.
pub async fn ensure_publication(
    client: &Client,
    name: &str,
    tables: Option<&[String]>,
) -> Result<Vec<TableRef>, PreflightError> {
    let requested = match tables {
        Some(list) => Some(resolve_tables(client, list).await?),
        None => None,
    };
    let exists = slot::publication_exists(client, name)
        .await
        .sql_context("looking up the publication")?;
    if exists {
        let existing = publication_tables(client, name).await?;
        if let Some(req) = &requested {
            let mut a: Vec<u32> = existing.iter().map(|t| t.oid).collect();
            let mut b: Vec<u32> = req.iter().map(|t| t.oid).collect();
            a.sort_unstable();
            b.sort_unstable();
            if a != b {
                return Err(PreflightError::PublicationMismatch {
                    name: name.to_owned(),
                    existing: existing.iter().map(|t| t.to_string()).collect(),
                    requested: req.iter().map(|t| t.to_string()).collect(),
                });
            }
        }
        let mut refusals = check_publication(client, name).await?;
        refusals.extend(check_tables(client, &existing).await?);
        if !refusals.is_empty() {
            return Err(PreflightError::Refused { refusals });
        }
        return Ok(existing);
    }
    let candidates = match &requested {
        Some(r) => r.clone(),
        None => all_user_tables(client).await?,
    };
    let refusals = check_tables(client, &candidates).await?;
    if !refusals.is_empty() {
        return Err(PreflightError::Refused { refusals });
    }
    let quoted: Option<Vec<String>> = requested
        .as_ref()
        .map(|r| r.iter().map(|t| t.quoted()).collect());
    slot::create_publication(client, name, quoted.as_deref())
        .await
        .sql_context("creating the publication")?;
    tracing::info!(
        publication = name,
        tables = candidates.len(),
        "created publication"
    );
    publication_tables(client, name).await
}

async fn resolve_tables(
    client: &Client,
    names: &[String],
) -> Result<Vec<TableRef>, PreflightError> {
    let mut out = Vec::with_capacity(names.len());
    for n in names {
        let row = client
            .query_one(
                "SELECT c.oid, n.nspname::text, c.relname::text FROM pg_class c \
                 JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE c.oid = to_regclass($1) AND c.relkind IN ('r', 'p')",
                &[&n.trim()],
            )
            .await;
        match row {
            Ok(r) => out.push(TableRef::from_row(&r)),
            Err(e) if e.as_db_error().is_none() => {
                return Err(PreflightError::TableNotFound { name: n.clone() });
            }
            Err(e) => return Err(SqlError::new("resolving --tables", e).into()),
        }
    }
    Ok(out)
}

async fn all_user_tables(client: &Client) -> Result<Vec<TableRef>, PreflightError> {
    let rows = client
        .query(
            "SELECT c.oid, n.nspname::text, c.relname::text FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition AND c.relpersistence = 'p' \
               AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%' \
             ORDER BY 2, 3",
            &[],
        )
        .await
        .sql_context("listing user tables")?;
    Ok(rows.iter().map(TableRef::from_row).collect())
}

/// The tables a publication carries, in name order.
pub async fn publication_tables(
    client: &Client,
    publication: &str,
) -> Result<Vec<TableRef>, PreflightError> {
    let rows = client
        .query(
            "SELECT c.oid, p.schemaname::text, p.tablename::text FROM pg_publication_tables p \
             JOIN pg_namespace n ON n.nspname = p.schemaname \
             JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = p.tablename \
             WHERE p.pubname = $1 ORDER BY 2, 3",
            &[&publication],
        )
        .await
        .sql_context("listing the publication's tables")?;
    Ok(rows.iter().map(TableRef::from_row).collect())
}

/// What an existing publication does that walshift cannot follow faithfully:
/// - not publishing every operation (insert, update, delete, truncate): the missing ones would
///   never reach the copy;
/// - (PostgreSQL 15+) a row filter or a column list: the clone copies whole tables, the stream
///   would carry only part of them;
/// - (PostgreSQL 18+) `publish_generated_columns = stored`: the stream would carry values of
///   columns the copy computes itself, which replay cannot write.
///
/// `publish_via_partition_root = true` is accepted: capture watches what that mode does not
/// carry (see [`crate::capture::partitions`]).
pub async fn check_publication(
    client: &Client,
    name: &str,
) -> Result<Vec<Refusal>, PreflightError> {
    let row = client
        .query_one(
            "SELECT pubinsert, pubupdate, pubdelete, pubtruncate, pubviaroot, \
               current_setting('server_version_num')::int FROM pg_publication WHERE pubname = $1",
            &[&name],
        )
        .await
        .sql_context("reading the publication's options")?;
    let publication = format!("publication {}", quote_ident(name));
    let mut refusals = Vec::new();
    let ops: Vec<&str> = ["insert", "update", "delete", "truncate"]
        .into_iter()
        .enumerate()
        .filter(|(i, _)| !row.get::<_, bool>(*i))
        .map(|(_, op)| op)
        .collect();
    if !ops.is_empty() {
        refusals.push(Refusal {
            object: publication.clone(),
            reason: format!(
                "it does not publish {}: those changes would never reach the copy",
                ops.join(", ")
            ),
            fix: format!(
                "ALTER PUBLICATION {} SET (publish = 'insert, update, delete, truncate'), or drop it \
                 and let walshift create its own",
                quote_ident(name)
            ),
        });
    }
    let version: i32 = row.get(5);
    if version >= 180000 {
        let generated: String = client
            .query_one(
                "SELECT pubgencols::text FROM pg_publication WHERE pubname = $1",
                &[&name],
            )
            .await
            .sql_context("reading the publication's publish_generated_columns")?
            .get(0);
        if generated != "n" {
            refusals.push(Refusal {
                object: publication.clone(),
                reason: "it publishes generated columns (publish_generated_columns = stored, \
                         PostgreSQL 18+): the copy computes its own generated columns and replay \
                         would try to write them"
                    .into(),
                fix: format!(
                    "ALTER PUBLICATION {} SET (publish_generated_columns = none)",
                    quote_ident(name)
                ),
            });
        }
    }
    if version >= 150000 {
        let partial = client
            .query(
                "SELECT n.nspname::text, c.relname::text, pr.prqual IS NOT NULL, pr.prattrs IS NOT NULL \
                 FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid \
                 JOIN pg_class c ON c.oid = pr.prrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE p.pubname = $1 AND (pr.prqual IS NOT NULL OR pr.prattrs IS NOT NULL) ORDER BY 1, 2",
                &[&name],
            )
            .await
            .sql_context("looking for row filters and column lists in the publication")?;
        for r in partial {
            let table = quote_qualified(r.get(0), r.get(1));
            let what = match (r.get::<_, bool>(2), r.get::<_, bool>(3)) {
                (true, true) => "a row filter and a column list",
                (true, false) => "a row filter (WHERE)",
                _ => "a column list",
            };
            refusals.push(Refusal {
                object: format!("table {table}"),
                reason: format!(
                    "{publication} publishes it with {what}: the clone copies every row with every column, \
                     the stream would carry only part of them"
                ),
                fix: format!(
                    "ALTER PUBLICATION {q} DROP TABLE {table}; ALTER PUBLICATION {q} ADD TABLE {table}; \
                     (without WHERE or column list), or let walshift create its own publication",
                    q = quote_ident(name)
                ),
            });
        }
    }
    Ok(refusals)
}

/// What tables (partitioned ones through their leaf partitions, which is what pgoutput
/// publishes by default) walshift cannot carry faithfully: every published table must let
/// UPDATE and DELETE carry a key — a primary key, a replica identity index, or `REPLICA
/// IDENTITY FULL`. Without one, the live site's UPDATEs and DELETEs on it would fail as soon as
/// it is published, so this runs before the publication is created.
pub async fn check_tables(
    client: &Client,
    tables: &[TableRef],
) -> Result<Vec<Refusal>, PreflightError> {
    if tables.is_empty() {
        return Ok(Vec::new());
    }
    let oids: Vec<u32> = tables.iter().map(|t| t.oid).collect();
    let rows = client
        .query(
            "SELECT n.nspname::text, c.relname::text, c.relreplident::text, \
               EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary \
                       AND i.indimmediate), \
               EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisreplident), \
               c.relispartition, c.relpersistence::text, \
               EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary \
                       AND NOT i.indimmediate) \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE (c.oid = ANY($1) \
                    OR c.oid IN (SELECT t.relid FROM unnest($1::oid[]) AS r(oid), \
                                 LATERAL pg_partition_tree(r.oid) t WHERE t.isleaf)) \
               AND c.relkind = 'r' \
             ORDER BY 1, 2",
            &[&oids],
        )
        .await
        .sql_context("checking replica identities")?;
    let mut refusals = Vec::new();
    for r in rows {
        let table = quote_qualified(r.get(0), r.get(1));
        let ident: String = r.get(2);
        let has_pk: bool = r.get(3);
        let has_ri: bool = r.get(4);
        let partition = if r.get::<_, bool>(5) {
            " (a partition: REPLICA IDENTITY set on the partitioned table does not reach its partitions)"
        } else {
            ""
        };
        if r.get::<_, String>(6) == "u" {
            refusals.push(Refusal {
                object: format!("table {table}"),
                reason: "it is UNLOGGED: logical decoding never sees its changes, and PostgreSQL \
                         refuses to publish it"
                    .into(),
                fix: format!(
                    "ALTER TABLE {table} SET LOGGED, or leave it out of --tables (the clone copies \
                     unlogged tables once, as of the snapshot)"
                ),
            });
            continue;
        }
        let deferrable_pk: bool = r.get(7);
        let reason = match (ident.as_str(), has_pk, has_ri) {
            ("f", _, _) | ("d", true, _) | ("i", _, true) => continue,
            ("d", false, _) if deferrable_pk => format!(
                "its primary key is DEFERRABLE{partition}: PostgreSQL cannot use a deferrable key \
                 as the replica identity, so once published, UPDATE and DELETE on it fail on the \
                 live site"
            ),
            ("n", _, _) => format!(
                "REPLICA IDENTITY NOTHING{partition}: once published, UPDATE and DELETE on it fail \
                 on the live site, and no old key would reach the copy"
            ),
            ("i", _, false) => format!(
                "its replica identity index is gone{partition}: UPDATE/DELETE rows would have no key"
            ),
            _ => format!(
                "no primary key and no replica identity{partition}: UPDATE/DELETE rows would have no key"
            ),
        };
        let fix = if deferrable_pk {
            format!(
                "make the key immediate (ALTER TABLE {table} ALTER CONSTRAINT … NOT DEFERRABLE, or a \
                 non-deferrable unique index with ALTER TABLE {table} REPLICA IDENTITY USING INDEX …) \
                 or set ALTER TABLE {table} REPLICA IDENTITY FULL"
            )
        } else if has_pk {
            format!("ALTER TABLE {table} REPLICA IDENTITY DEFAULT (its primary key)")
        } else {
            format!(
                "add a primary key (ALTER TABLE {table} ADD PRIMARY KEY (…)) or set \
                 ALTER TABLE {table} REPLICA IDENTITY FULL"
            )
        };
        refusals.push(Refusal {
            object: format!("table {table}"),
            reason,
            fix,
        });
    }
    Ok(refusals)
}

/// What the source holds that logical decoding does not carry: copied once by the clone (as of
/// the snapshot), never replicated afterwards. Each entry is one loud warning line; none stops
/// the capture.
///
/// - Large objects: the clone copies them and records a fingerprint
///   ([`crate::clone::large_object_fingerprint`]) so a change during the release is detectable.
/// - UNLOGGED tables: copied by the clone, their later changes are lost to the copy.
/// - Sequences: the clone sets them, cutover sets them again from the source.
/// - (PostgreSQL 18+) `idle_replication_slot_timeout` set: a slot idle that long is invalidated,
///   so a capture stopped for longer loses the release's slot.
pub async fn source_warnings(client: &Client) -> Result<Vec<String>, PreflightError> {
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM pg_largeobject_metadata), \
               (SELECT array_agg(format('%I.%I', n.nspname, c.relname) ORDER BY 1) FROM pg_class c \
                  JOIN pg_namespace n ON n.oid = c.relnamespace \
                  WHERE c.relkind IN ('r', 'p') AND c.relpersistence = 'u' \
                    AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'walshift')), \
               (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                  WHERE c.relkind = 'S' AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'walshift'))",
            &[],
        )
        .await
        .sql_context("looking for large objects, unlogged tables and sequences")?;
    let large_objects: i64 = row.get(0);
    let unlogged: Option<Vec<String>> = row.get(1);
    let sequences: i64 = row.get(2);
    let mut out = Vec::new();
    if large_objects > 0 {
        out.push(format!(
            "the source holds {large_objects} large object(s): logical decoding does not carry them. \
             The clone copies them as of its snapshot and records their fingerprint; any lo_* change \
             on the source after that is NOT replicated (cutover warns when the fingerprint moved). \
             Freeze large objects for the release, or copy them again before cutover"
        ));
    }
    if let Some(tables) = unlogged.filter(|t| !t.is_empty()) {
        out.push(format!(
            "UNLOGGED table(s) {}: logical decoding does not see their changes. The clone copies \
             their rows as of its snapshot; later changes on the source are NOT replicated to the \
             copy. Make them LOGGED (ALTER TABLE … SET LOGGED) before capture if the copy needs them",
            tables.join(", ")
        ));
    }
    if sequences > 0 {
        out.push(format!(
            "{sequences} sequence(s) are not carried by logical decoding: the clone sets them from \
             the source, and cutover sets them again (a replayed copy sees their clone-time values \
             until then)"
        ));
    }
    // PostgreSQL 18+: slots left idle longer than this are invalidated (missing before 18).
    let idle_timeout: Option<String> = client
        .query_opt(
            "SELECT current_setting('idle_replication_slot_timeout', true) \
             WHERE coalesce(current_setting('idle_replication_slot_timeout', true), '0') <> '0'",
            &[],
        )
        .await
        .sql_context("reading idle_replication_slot_timeout")?
        .map(|r| r.get(0));
    if let Some(timeout) = idle_timeout {
        out.push(format!(
            "the source invalidates replication slots idle for longer than {timeout} \
             (idle_replication_slot_timeout): if capture stays stopped that long, the slot and the \
             release's buffer are lost (a new capture and clone are needed). Keep capture running, \
             or set idle_replication_slot_timeout = 0 for the release"
        ));
    }
    Ok(out)
}
