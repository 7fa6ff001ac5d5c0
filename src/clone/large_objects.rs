//! Large objects: logical decoding never carries them, so the clone copies them as of the
//! snapshot (`lo_get` in chunks on the source, `lo_create` + `lo_put` on the target, same OIDs,
//! so `oid` columns keep pointing at them) and records their fingerprint, which
//! [`check_large_objects`] later compares with the source's current one.

use tokio_postgres::Client;

use super::error::CloneError;
use crate::conn::ConnInfo;
use crate::error::SqlContext;

/// Bytes read and written per round trip.
const CHUNK: i32 = 1 << 20;

/// What the source's large objects looked like at one point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LargeObjectFingerprint {
    /// Number of large objects.
    pub count: i64,
    /// md5 of every large object's OID, in order (detects one replaced by another).
    pub oids_md5: String,
    /// md5 over every page of `pg_largeobject` (detects content changes); `None` when the role
    /// may not read `pg_largeobject` (superuser only by default).
    pub data_md5: Option<String>,
}

/// Reads the fingerprint of the large objects `client` sees (its snapshot, if it has one).
pub async fn large_object_fingerprint(
    client: &Client,
) -> Result<LargeObjectFingerprint, CloneError> {
    let row = client
        .query_one(
            "SELECT count(*), coalesce(md5(string_agg(oid::text, ',' ORDER BY oid)), ''), \
               has_table_privilege('pg_catalog.pg_largeobject', 'SELECT') \
             FROM pg_largeobject_metadata",
            &[],
        )
        .await
        .sql_context("counting the source's large objects")?;
    let data_md5 = if row.get::<_, bool>(2) {
        let r = client
            .query_one(
                "SELECT coalesce(md5(string_agg(loid::text || ':' || pageno::text || ':' || md5(data), \
                   ',' ORDER BY loid, pageno)), '') FROM pg_catalog.pg_largeobject",
                &[],
            )
            .await
            .sql_context("checksumming the source's large objects")?;
        Some(r.get(0))
    } else {
        None
    };
    Ok(LargeObjectFingerprint {
        count: row.get(0),
        oids_md5: row.get(1),
        data_md5,
    })
}

/// Copies every large object `source` sees (in its snapshot) to `target` under the same OID.
/// With `replace`, a target large object of the same OID is dropped first (a forced re-clone);
/// without, it fails the clone. Returns the number copied.
pub(crate) async fn copy_large_objects(
    source: &Client,
    target: &Client,
    replace: bool,
) -> Result<u64, CloneError> {
    let oids: Vec<u32> = source
        .query("SELECT oid FROM pg_largeobject_metadata ORDER BY oid", &[])
        .await
        .sql_context("listing the source's large objects")?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if oids.is_empty() {
        return Ok(0);
    }
    if replace {
        target
            .execute(
                "SELECT lo_unlink(oid) FROM pg_largeobject_metadata WHERE oid = ANY($1)",
                &[&oids],
            )
            .await
            .sql_context("dropping the earlier clone's large objects on the target")?;
    }
    let read = source
        .prepare("SELECT lo_get($1, $2, $3)")
        .await
        .sql_context("preparing the large object read")?;
    let write = target
        .prepare("SELECT lo_put($1, $2, $3)")
        .await
        .sql_context("preparing the large object write")?;
    for &oid in &oids {
        target
            .execute("SELECT lo_create($1)", &[&oid])
            .await
            .with_sql_context(|| {
                format!("creating large object {oid} on the target (pass --force to replace it)")
            })?;
        let mut offset: i64 = 0;
        loop {
            let data: Vec<u8> = source
                .query_one(&read, &[&oid, &offset, &CHUNK])
                .await
                .with_sql_context(|| {
                    format!(
                        "reading large object {oid} on the source (the role needs SELECT on it: \
                     GRANT SELECT ON LARGE OBJECT {oid} TO …, or a superuser)"
                    )
                })?
                .get(0);
            if data.is_empty() {
                break;
            }
            target
                .execute(&write, &[&oid, &offset, &data])
                .await
                .with_sql_context(|| format!("writing large object {oid} on the target"))?;
            offset += data.len() as i64;
            if data.len() < CHUNK as usize {
                break;
            }
        }
    }
    Ok(oids.len() as u64)
}

/// The large objects of the source now, against what the clone recorded.
#[derive(Debug, Clone)]
pub struct LargeObjectCheck {
    /// Recorded by the clone (`None`: the target's clone predates the record).
    pub at_clone: Option<LargeObjectFingerprint>,
    pub now: LargeObjectFingerprint,
}

impl LargeObjectCheck {
    /// False when the count, the OIDs, or (when both sides could read it) the content moved.
    pub fn unchanged(&self) -> bool {
        let Some(then) = &self.at_clone else {
            return self.now.count == 0;
        };
        then.count == self.now.count
            && then.oids_md5 == self.now.oids_md5
            && match (&then.data_md5, &self.now.data_md5) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }
}

/// Compares the source's large objects now with the fingerprint the clone recorded on the
/// target. Logical decoding does not carry large objects: a difference means the copy's large
/// objects are stale.
pub async fn check_large_objects(
    source: &ConnInfo,
    target: &ConnInfo,
) -> Result<LargeObjectCheck, CloneError> {
    let src = source.connect().await.map_err(|e| CloneError::Connect {
        context: "connecting to the source".into(),
        source: e,
    })?;
    let now = large_object_fingerprint(&src).await?;
    let state = super::clone_state(target).await?;
    Ok(LargeObjectCheck {
        at_clone: state.and_then(|s| s.large_objects),
        now,
    })
}
