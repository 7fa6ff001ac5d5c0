//! Row counts and checksums of tables, to compare a copy with its source independently of
//! walshift's own verify.

use tokio_postgres::Client;
use walshift::localpg::Cluster;

/// Row count and md5 of the rows' text forms, sorted in the C collation (so the order does
/// not depend on the server's), of `relation`: a table name or a parenthesised query.
pub async fn digest(client: &Client, relation: &str) -> (i64, String) {
    let r = client
        .query_one(
            &format!(
                "SELECT count(*), coalesce(md5(string_agg(t::text, '|' ORDER BY t::text COLLATE \"C\")), '') FROM {relation} t"
            ),
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("digest of {relation}: {e}"));
    (r.get(0), r.get(1))
}

/// [`digest`] of each table of the cluster's `postgres` database, with its name.
pub async fn digests(c: &Cluster, tables: &[&str]) -> Vec<(String, i64, String)> {
    let client = c.connect("postgres").await.unwrap();
    let mut out = Vec::new();
    for t in tables {
        let (n, md5) = digest(&client, t).await;
        out.push((t.to_string(), n, md5));
    }
    out
}

/// The target's `tables` hold exactly the source's rows.
pub async fn assert_same(source: &Cluster, target: &Cluster, tables: &[&str]) {
    assert_eq!(digests(target, tables).await, digests(source, tables).await);
}
