//! Preflight on the source: is it able to feed walshift, and which tables does the publication
//! carry? Run before anything is created, because creating a publication on a table without a
//! replica identity would make the live site's UPDATEs and DELETEs on it fail.

use tokio_postgres::Client;

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

    #[error(
        "{} table(s) cannot be captured because UPDATE/DELETE rows would have no key:\n{}",
        .tables.len(),
        .tables.iter().map(|t| format!("  - {t}: add a primary key (ALTER TABLE {t} ADD PRIMARY KEY (…)) \
            or set ALTER TABLE {t} REPLICA IDENTITY FULL")).collect::<Vec<_>>().join("\n")
    )]
    NoReplicaIdentity { tables: Vec<String> },

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

    #[error("{context}")]
    Sql {
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },
}

fn sql(context: &str) -> impl FnOnce(tokio_postgres::Error) -> PreflightError + '_ {
    move |source| PreflightError::Sql {
        context: context.to_owned(),
        source,
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
        .map_err(sql("reading source settings"))?;
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
/// those. Every table is checked for a usable replica identity *before* the publication is
/// created. An existing publication is used as it is (after the same check), unless `tables`
/// asks for a different set.
pub async fn ensure_publication(
    client: &Client,
    name: &str,
    tables: Option<&[String]>,
) -> Result<Vec<TableRef>, PreflightError> {
    let requested = match tables {
        Some(list) => Some(resolve_tables(client, list).await?),
        None => None,
    };
    let exists = client
        .query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&name])
        .await
        .map_err(sql("looking up the publication"))?
        .is_some();
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
        check_replica_identity(client, &existing).await?;
        return Ok(existing);
    }
    let candidates = match &requested {
        Some(r) => r.clone(),
        None => all_user_tables(client).await?,
    };
    check_replica_identity(client, &candidates).await?;
    let ddl = match &requested {
        None => format!("CREATE PUBLICATION {} FOR ALL TABLES", quote_ident(name)),
        Some(r) => format!(
            "CREATE PUBLICATION {} FOR TABLE {}",
            quote_ident(name),
            r.iter().map(|t| t.quoted()).collect::<Vec<_>>().join(", ")
        ),
    };
    client
        .batch_execute(&ddl)
        .await
        .map_err(sql("creating the publication"))?;
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
            Err(e) => return Err(sql("resolving --tables")(e)),
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
        .map_err(sql("listing user tables"))?;
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
        .map_err(sql("listing the publication's tables"))?;
    Ok(rows.iter().map(TableRef::from_row).collect())
}

/// Every table must have a primary key, a replica identity index, or REPLICA IDENTITY FULL.
pub async fn check_replica_identity(
    client: &Client,
    tables: &[TableRef],
) -> Result<(), PreflightError> {
    if tables.is_empty() {
        return Ok(());
    }
    let oids: Vec<u32> = tables.iter().map(|t| t.oid).collect();
    let rows = client
        .query(
            "SELECT n.nspname::text, c.relname::text, c.relreplident::text, \
               EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary), \
               EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisreplident) \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.oid = ANY($1) ORDER BY 1, 2",
            &[&oids],
        )
        .await
        .map_err(sql("checking replica identities"))?;
    let bad: Vec<String> = rows
        .iter()
        .filter(|r| {
            let ident: String = r.get(2);
            let has_pk: bool = r.get(3);
            let has_ri: bool = r.get(4);
            !matches!(
                (ident.as_str(), has_pk, has_ri),
                ("f", _, _) | ("d", true, _) | ("i", _, true)
            )
        })
        .map(|r| quote_qualified(&r.get::<_, String>(0), &r.get::<_, String>(1)))
        .collect();
    if bad.is_empty() {
        Ok(())
    } else {
        Err(PreflightError::NoReplicaIdentity { tables: bad })
    }
}
