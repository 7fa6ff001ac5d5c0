//! What the cutover tests read back: the read-only fence's database setting, an aborted run.

use walshift::cutover::{Aborted, CutoverError, CutoverReport};
use walshift::localpg::Cluster;

/// The database-wide setting entry of `postgres` (where the read-only fence goes).
pub async fn fence_entry(c: &Cluster) -> Option<Vec<String>> {
    c.connect("postgres")
        .await
        .unwrap()
        .query_opt(
            "SELECT s.setconfig FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase \
             WHERE d.datname = 'postgres' AND s.setrole = 0",
            &[],
        )
        .await
        .unwrap()
        .and_then(|r| r.get(0))
}

/// The abort of a cutover that had to abort.
pub fn aborted(r: Result<CutoverReport, CutoverError>) -> Box<Aborted> {
    match r {
        Err(CutoverError::Aborted(a)) => a,
        other => panic!("expected an abort, got {other:?}"),
    }
}
