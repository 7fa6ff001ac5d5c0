//! Partitions of a `publish_via_partition_root` publication: what the stream cannot carry.
//!
//! In that mode pgoutput sends every change addressed to the published partitioned table (the
//! root), which is what a release that repartitions the copy wants. It never sends a
//! `TRUNCATE` of a single partition (nor of an intermediate partitioned table), and nothing at
//! all for `VACUUM FULL`/`CLUSTER`, `DETACH PARTITION` or `DROP TABLE` of a partition. Each of
//! those gives the partition a new relfilenode (or removes it), so walshift records every
//! leaf partition's relfilenode as of the slot's snapshot in the buffer directory
//! ([`RECORD_FILE`]) and compares:
//!
//! - capture, every few seconds and as soon as it receives a `TRUNCATE`: a leaf whose
//!   relfilenode moved is accepted only when the `pg_class` row's `xmin` is a transaction the
//!   stream carried a `TRUNCATE` of its root in; any other change stops capture naming the
//!   partition, once the stream has passed the point where the change was seen (so a root
//!   `TRUNCATE` still in flight is never mistaken);
//! - cutover, before fencing: any leaf that differs from the record refuses the cutover.
//!
//! The record lives in the buffer directory, not on the target: capture always has the buffer
//! (also without `--clone-to` and on every restart), cutover reads it, and it belongs to
//! exactly this slot's stream. Leaves attached after the snapshot are added to the record
//! (flagged) and reported: rows they held before `ATTACH PARTITION` never passed through the
//! stream.
//!
//! Known gap: a transaction that truncates the root, then writes rows into a partition and
//! truncates that partition alone is accepted (its `xmin` is the root `TRUNCATE`'s). Known
//! false alarm: DDL on a partition (e.g. `ALTER TABLE root ADD COLUMN`) committed after a root
//! `TRUNCATE` but before capture received that `TRUNCATE` replaces the `xmin`, and capture
//! stops although nothing was lost (verify, then accept).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

use crate::lsn::Lsn;
use crate::source::preflight::TableRef;

/// File in the buffer directory holding the partitions' record.
pub const RECORD_FILE: &str = "partitions.json";

/// A published partitioned table of a via-root publication.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Root {
    pub oid: u32,
    /// `schema.name`.
    pub name: String,
}

/// One leaf partition as last accepted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leaf {
    pub oid: u32,
    /// `schema.name`.
    pub name: String,
    /// OID of its published root.
    pub root: u32,
    pub relfilenode: u32,
    /// First seen after the slot's snapshot (attached or created later).
    #[serde(default)]
    pub attached_later: bool,
}

/// The record kept in [`RECORD_FILE`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionRecord {
    pub roots: Vec<Root>,
    pub leaves: Vec<Leaf>,
    /// TRUNCATEs the stream carried that may still explain a rewrite not yet accepted:
    /// transaction id → relations truncated. Kept across capture restarts.
    #[serde(default)]
    pub truncates: HashMap<u32, Vec<u32>>,
}

/// Why the record and the source disagree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// New relfilenode: a TRUNCATE, VACUUM FULL, CLUSTER or other rewrite of the partition.
    Rewritten { xmin: u32, relfilenode: u32 },
    /// No longer a leaf of its root: detached or dropped.
    Gone,
}

/// One partition that differs from the record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Difference {
    pub leaf: Leaf,
    pub root_name: String,
    pub change: Change,
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self.change {
            Change::Rewritten { .. } => {
                "was truncated or rewritten on its own (TRUNCATE of the partition, VACUUM FULL, \
                 CLUSTER, or a table rewrite): its relfilenode changed"
            }
            Change::Gone => "was detached or dropped",
        };
        write!(
            f,
            "partition {} of {} {what}, which a publish_via_partition_root stream does not carry, \
             so the copy may still hold rows the source no longer has. Fix: compare it with \
             `walshift verify --tables {}`; if they differ, truncate it (or delete the rows) on \
             the copy too, or clone again; then restart capture with \
             --accept-partition-rewrite {}",
            self.leaf.name, self.root_name, self.root_name, self.leaf.name
        )
    }
}

/// What the source looks like now.
#[derive(Clone, Debug)]
pub struct Observation {
    /// Every difference from the record.
    pub differences: Vec<Difference>,
    /// Leaves not in the record.
    pub new_leaves: Vec<Leaf>,
    /// The WAL insert position read after the catalog: every change the observation saw
    /// committed before it.
    pub lsn: Lsn,
}

impl PartitionRecord {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(RECORD_FILE)
    }

    /// Reads the record of buffer `dir`, `None` if it has none.
    pub fn read(dir: &Path) -> Result<Option<PartitionRecord>, crate::Error> {
        let path = Self::path(dir);
        let data = match std::fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(crate::Error::io(path, e)),
        };
        serde_json::from_slice(&data).map(Some).map_err(|e| {
            crate::Error::io(
                path,
                std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
            )
        })
    }

    /// Writes the record atomically and durably (0600 temporary file, fsync, rename, directory
    /// fsync).
    pub fn write(&self, dir: &Path) -> Result<(), crate::Error> {
        use crate::buffer::fs::FileSystem;
        let path = Self::path(dir);
        let data = serde_json::to_vec_pretty(self).expect("serializable");
        crate::buffer::fs::StdFs
            .write_atomic(&path, &data)
            .map_err(|e| crate::Error::io(path, e))
    }

    /// `schema.name` of the recorded root `oid`.
    pub fn root_name(&self, oid: u32) -> String {
        self.roots
            .iter()
            .find(|r| r.oid == oid)
            .map_or_else(|| oid.to_string(), |r| r.name.clone())
    }

    /// Accepts a difference: the leaf's current state becomes the recorded one.
    pub fn accept(&mut self, d: &Difference) {
        match d.change {
            Change::Rewritten { relfilenode, .. } => {
                if let Some(l) = self.leaves.iter_mut().find(|l| l.oid == d.leaf.oid) {
                    l.relfilenode = relfilenode;
                }
            }
            Change::Gone => self.leaves.retain(|l| l.oid != d.leaf.oid),
        }
    }
}

/// The leaves of `roots`, read in `client`'s transaction snapshot (`pg_inherits` and
/// `pg_class` scanned as plain tables, so a snapshot-importing session sees them as of its
/// snapshot). Returns `(leaf, xmin of its pg_class row)`.
async fn leaves(client: &Client, roots: &[u32]) -> Result<Vec<(Leaf, u32)>, tokio_postgres::Error> {
    let rows = client
        .query(
            "WITH RECURSIVE tree(root, rel) AS ( \
               SELECT r, r FROM unnest($1::oid[]) r \
               UNION ALL SELECT t.root, i.inhrelid FROM tree t \
                 JOIN pg_catalog.pg_inherits i ON i.inhparent = t.rel) \
             SELECT c.oid, n.nspname::text, c.relname::text, t.root, c.relfilenode, \
               c.xmin::text::int8 \
             FROM tree t JOIN pg_catalog.pg_class c ON c.oid = t.rel \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind <> 'p' ORDER BY 1",
            &[&roots],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                Leaf {
                    oid: r.get(0),
                    name: format!("{}.{}", r.get::<_, &str>(1), r.get::<_, &str>(2)),
                    root: r.get(3),
                    relfilenode: r.get(4),
                    attached_later: false,
                },
                r.get::<_, i64>(5) as u32,
            )
        })
        .collect())
}

/// The published partitioned tables of `publication` when it publishes via the root; empty
/// otherwise.
pub async fn via_root_roots(
    client: &Client,
    publication: &str,
    tables: &[TableRef],
) -> Result<Vec<Root>, tokio_postgres::Error> {
    let oids: Vec<u32> = tables.iter().map(|t| t.oid).collect();
    let rows = client
        .query(
            "SELECT c.oid, n.nspname::text, c.relname::text FROM pg_catalog.pg_class c \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.oid = ANY($2) AND c.relkind = 'p' \
               AND (SELECT pubviaroot FROM pg_catalog.pg_publication WHERE pubname = $1) \
             ORDER BY 2, 3",
            &[&publication, &oids],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Root {
            oid: r.get(0),
            name: format!("{}.{}", r.get::<_, &str>(1), r.get::<_, &str>(2)),
        })
        .collect())
}

/// The record of `roots` as `client` sees them (its snapshot, if it imported one).
pub async fn record(
    client: &Client,
    roots: Vec<Root>,
) -> Result<PartitionRecord, tokio_postgres::Error> {
    let oids: Vec<u32> = roots.iter().map(|r| r.oid).collect();
    let leaves = leaves(client, &oids).await?;
    Ok(PartitionRecord {
        roots,
        leaves: leaves.into_iter().map(|(l, _)| l).collect(),
        truncates: HashMap::new(),
    })
}

/// Compares the source now with `record`.
pub async fn observe(
    client: &Client,
    record: &PartitionRecord,
) -> Result<Observation, tokio_postgres::Error> {
    let oids: Vec<u32> = record.roots.iter().map(|r| r.oid).collect();
    let now = leaves(client, &oids).await?;
    let lsn: String = client
        .query_one("SELECT pg_catalog.pg_current_wal_insert_lsn()::text", &[])
        .await?
        .get(0);
    let lsn = lsn.parse().unwrap_or(Lsn::ZERO);
    let current: HashMap<u32, &(Leaf, u32)> = now.iter().map(|e| (e.0.oid, e)).collect();
    let mut differences = Vec::new();
    for leaf in &record.leaves {
        let change = match current.get(&leaf.oid) {
            None => Change::Gone,
            Some((l, _)) if l.root != leaf.root => Change::Gone,
            Some((l, xmin)) if l.relfilenode != leaf.relfilenode => Change::Rewritten {
                xmin: *xmin,
                relfilenode: l.relfilenode,
            },
            Some(_) => continue,
        };
        differences.push(Difference {
            leaf: leaf.clone(),
            root_name: record.root_name(leaf.root),
            change,
        });
    }
    let new_leaves = now
        .iter()
        .filter(|(l, _)| !record.leaves.iter().any(|r| r.oid == l.oid))
        .map(|(l, _)| Leaf {
            attached_later: true,
            ..l.clone()
        })
        .collect();
    Ok(Observation {
        differences,
        new_leaves,
        lsn,
    })
}

/// What capture makes of one difference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The stream carried a TRUNCATE of its root in the transaction that rewrote it.
    Explained,
    /// The stream has not yet passed the point where it was seen: look again later.
    Wait,
    /// Not carried by the stream: stop.
    Unexplained,
}

/// Judges `d`, seen at `seen_at`, given the TRUNCATEs the stream carried (transaction id →
/// relations truncated) and how far the stream has been decoded.
pub fn judge(
    d: &Difference,
    seen_at: Lsn,
    truncates: &HashMap<u32, Vec<u32>>,
    decoded: Lsn,
) -> Verdict {
    if let Change::Rewritten { xmin, .. } = d.change
        && truncates
            .get(&xmin)
            .is_some_and(|rels| rels.contains(&d.leaf.root))
    {
        return Verdict::Explained;
    }
    if decoded < seen_at {
        Verdict::Wait
    } else {
        Verdict::Unexplained
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn diff(change: Change) -> Difference {
        Difference {
            leaf: Leaf {
                oid: 20,
                name: "public.m_eu".into(),
                root: 10,
                relfilenode: 20,
                attached_later: false,
            },
            root_name: "public.m".into(),
            change,
        }
    }

    #[test]
    fn a_rewrite_is_explained_only_by_a_truncate_of_its_root_in_the_same_transaction() {
        let rewritten = diff(Change::Rewritten {
            xmin: 700,
            relfilenode: 99,
        });
        let mut truncates = HashMap::new();
        truncates.insert(700u32, vec![10u32]);
        assert_eq!(
            judge(&rewritten, Lsn(100), &truncates, Lsn(50)),
            Verdict::Explained
        );
        truncates.insert(700, vec![11]);
        assert_eq!(
            judge(&rewritten, Lsn(100), &truncates, Lsn(50)),
            Verdict::Wait
        );
        assert_eq!(
            judge(&rewritten, Lsn(100), &truncates, Lsn(100)),
            Verdict::Unexplained
        );
        assert_eq!(
            judge(&diff(Change::Gone), Lsn(100), &HashMap::new(), Lsn(200)),
            Verdict::Unexplained
        );
    }

    #[test]
    fn the_message_names_the_partition_and_the_fix() {
        let msg = diff(Change::Rewritten {
            xmin: 1,
            relfilenode: 2,
        })
        .to_string();
        assert!(msg.contains("public.m_eu"), "{msg}");
        assert!(msg.contains("walshift verify --tables public.m"), "{msg}");
        assert!(msg.contains("--accept-partition-rewrite"), "{msg}");
    }
}
