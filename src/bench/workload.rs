//! Workload W of the brief, generated inside the source server so the client is never the
//! bottleneck: a 200k-row `accounts` table, then row changes (50% UPDATE, 30% INSERT,
//! 20% DELETE) in transactions of a fixed size. Every statement touches exactly one existing
//! row, so the number of row changes is exact: deletes take the lowest live id, inserts append
//! after the highest, updates pick a random live id.

use tokio_postgres::Client;

/// Shape of the workload. Defaults are workload W.
#[derive(Clone, Debug)]
pub struct Workload {
    /// Rows loaded before changes start. Default 200 000.
    pub initial_rows: i64,
    /// Row changes to make. Default 1 000 000.
    pub changes: i64,
    /// Row changes per source transaction. Default 10.
    pub txn_size: i64,
    /// Random seed, so runs are repeatable. Default 0.42.
    pub seed: f64,
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            initial_rows: 200_000,
            changes: 1_000_000,
            txn_size: 10,
            seed: 0.42,
        }
    }
}

/// Creates and fills `accounts` (drops an existing one).
pub async fn load(client: &Client, w: &Workload) -> Result<(), tokio_postgres::Error> {
    client
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS accounts;
             CREATE TABLE accounts(id bigint PRIMARY KEY, owner text NOT NULL, balance bigint NOT NULL,
                                   note text, updated_at timestamptz NOT NULL);
             INSERT INTO accounts
               SELECT g, 'owner-' || g, 1000, md5(g::text), '2026-01-01 00:00:00+00'::timestamptz
               FROM generate_series(1, {}) g;",
            w.initial_rows
        ))
        .await?;
    client.batch_execute("VACUUM ANALYZE accounts").await
}

/// Runs the changes; returns the number of transactions committed. Uses
/// `synchronous_commit = off` for this session only: it changes nothing in what is decoded.
pub async fn run(client: &Client, w: &Workload) -> Result<i64, tokio_postgres::Error> {
    client
        .batch_execute(
            "CREATE OR REPLACE PROCEDURE walshift_workload(n_changes bigint, txn_size bigint, seed float8)
             LANGUAGE plpgsql AS $$
             DECLARE
               lo bigint; hi bigint; done bigint := 0; in_txn bigint := 0; r float8; target bigint;
             BEGIN
               PERFORM setseed(seed);
               SELECT min(id), max(id) + 1 INTO lo, hi FROM accounts;
               WHILE done < n_changes LOOP
                 r := random();
                 IF r < 0.5 AND hi > lo THEN
                   -- Computed first: a volatile random() inside WHERE would force a sequential scan.
                   target := lo + floor(random() * (hi - lo))::bigint;
                   UPDATE accounts SET balance = balance + 1, updated_at = clock_timestamp() WHERE id = target;
                 ELSIF r < 0.8 OR hi <= lo THEN
                   INSERT INTO accounts VALUES (hi, 'owner-' || hi, 0, md5(hi::text), clock_timestamp());
                   hi := hi + 1;
                 ELSE
                   DELETE FROM accounts WHERE id = lo;
                   lo := lo + 1;
                 END IF;
                 done := done + 1;
                 in_txn := in_txn + 1;
                 IF in_txn >= txn_size THEN
                   COMMIT;
                   in_txn := 0;
                 END IF;
               END LOOP;
               COMMIT;
             END $$;",
        )
        .await?;
    client.batch_execute("SET synchronous_commit = off").await?;
    client
        .execute(
            "CALL walshift_workload($1, $2, $3)",
            &[&w.changes, &w.txn_size, &w.seed],
        )
        .await?;
    client.batch_execute("RESET synchronous_commit").await?;
    Ok((w.changes + w.txn_size - 1) / w.txn_size.max(1))
}
