//! Where a source table's rows go: the same-named target table and columns, or through the
//! migration mapping onto one or more target tables ([`Dest`]).
//!
//! Invariant: a relation's destination (and its shape, checked against the target: drift is
//! an error before anything is written) is known before any of its changes is taken into a
//! batch; with a mapping, every table the mapping names is compiled before replay writes
//! anything ([`scan_relations`]).

use std::collections::HashMap;
use std::sync::Arc;

use tokio_postgres::Client;

use super::error::ReplayError;
use crate::apply::catalog::{self, MappedTable};
use crate::apply::row::TableShape;
use crate::buffer::BufferReader;
use crate::lsn::Lsn;
use crate::source::pgoutput::{self, LogicalMessage, Relation, TypeInfo};
use crate::transform::{self, Mapping, SourcePlan, TableName};

/// A source relation and where it goes.
pub(super) struct RelEntry {
    pub(super) rel: Relation,
    pub(super) dest: Option<Dest>,
    /// `dest`'s shape, kept rather than rebuilt for every change.
    pub(super) shape: Option<TableShape>,
}

/// Where a source table's rows are written.
#[derive(Clone)]
pub(super) enum Dest {
    /// The same-named target table and columns (no transform).
    Same(MappedTable),
    /// Through the mapping, onto one or more target tables.
    Mapped(Arc<SourcePlan>),
}

impl Dest {
    pub(super) fn name(&self) -> String {
        match self {
            Dest::Same(t) => t.name.clone(),
            Dest::Mapped(p) => p.source.name.quoted(),
        }
    }

    pub(super) fn shape(&self, relid: u32) -> TableShape {
        match self {
            Dest::Same(t) => TableShape {
                relid,
                columns: t.sql.columns.len(),
                key: t.sql.key.clone(),
                identity_full_without_key: t.full_row_identity,
            },
            Dest::Mapped(p) => TableShape {
                relid,
                columns: p.source.columns.len(),
                key: p.key.clone(),
                identity_full_without_key: false,
            },
        }
    }

    /// Target tables, quoted.
    pub(super) fn targets(&self) -> Vec<String> {
        match self {
            Dest::Same(t) => vec![t.sql.qualified.clone()],
            Dest::Mapped(p) => p.targets.iter().map(|t| t.target.quoted()).collect(),
        }
    }
}

/// Where a source relation goes: through the mapping if it names the table, else onto the
/// same-named table.
pub(super) async fn dest_for(
    client: &Client,
    mapping: &Mapping,
    rel: &Relation,
    types: &HashMap<u32, TypeInfo>,
) -> Result<Dest, ReplayError> {
    let schema = if rel.namespace.is_empty() {
        "pg_catalog"
    } else {
        rel.namespace.as_str()
    };
    if mapping.names(&TableName::new(schema, rel.name.clone())) {
        let source = transform::catalog::source_from_relation(client, rel, types).await?;
        let plan = transform::catalog::compile(client, mapping, &source).await?;
        Ok(Dest::Mapped(Arc::new(plan)))
    } else {
        Ok(Dest::Same(catalog::map_relation(client, rel).await?))
    }
}

/// Reads the Relation and Type messages of the buffer from `from` until every table the
/// mapping names has been seen (or the end), so the mapping is compiled before anything is
/// written.
pub fn scan_relations(
    dir: &std::path::Path,
    from: Lsn,
    mapping: &Mapping,
) -> Result<(Vec<Relation>, HashMap<u32, TypeInfo>), ReplayError> {
    let mut wanted: std::collections::HashSet<TableName> = mapping
        .tables
        .iter()
        .map(|t| t.source.value.clone())
        .collect();
    let mut rels = Vec::new();
    let mut types = HashMap::new();
    for rec in BufferReader::open(dir)?.records_from(from)? {
        let rec = rec?;
        if !matches!(rec.payload.first(), Some(b'R' | b'Y')) {
            continue;
        }
        match pgoutput::decode(&rec.payload).map_err(|source| ReplayError::Decode {
            lsn: rec.lsn,
            source,
        })? {
            LogicalMessage::Relation(r) => {
                wanted.remove(&TableName::new(
                    if r.namespace.is_empty() {
                        "pg_catalog"
                    } else {
                        &r.namespace
                    },
                    r.name.clone(),
                ));
                rels.push(r);
            }
            LogicalMessage::Type(t) => {
                types.insert(t.oid, t);
            }
            _ => {}
        }
        if wanted.is_empty() {
            break;
        }
    }
    Ok((rels, types))
}
