//! Row transfer: `COPY (SELECT …) TO STDOUT (FORMAT binary)` on source sessions that imported
//! the snapshot, streamed into `COPY … FROM STDIN (FORMAT binary)` on the target, several
//! tables at a time, never holding more than a few rows in memory.
//!
//! A table whose columns hold OIDs of the source's catalog — a `reg*` type (`regclass`,
//! `regtype`, `regproc`, …) anywhere in a column's type (also inside arrays, domains,
//! composites and ranges) — is copied in text format instead: the source writes names, the
//! target resolves them in its own catalog. So is a table with a column type that has no
//! binary I/O (e.g. `aclitem`), which binary COPY cannot carry at all. Both sides run with
//! `search_path = ''` (names come out schema-qualified) and pg_dump's output settings.
//!
//! **Contract:** every table's copy counts the rows the source sent (parsed out of the binary
//! stream, which must end with its trailer; in text format one line per row) and compares them
//! with the rows the target's `COPY … FROM` stored (its command tag). Any difference fails the clone naming the table and
//! both counts: a target-side mechanism that drops or adds rows during the load (an
//! `ENABLE ALWAYS`/`ENABLE REPLICA` trigger, which fires even with `session_replication_role =
//! replica`) never passes as a successful clone.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt, pin_mut};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio_postgres::Client;

use super::error::CloneError;
use crate::conn::ConnInfo;
use crate::error::SqlContext;
use crate::sql::{quote_ident, quote_literal};

/// One table to copy, as seen in the snapshot.
#[derive(Debug, Clone)]
pub(crate) struct TablePlan {
    /// `schema.name`, for reports.
    pub display: String,
    /// `"schema"."name"`.
    pub quoted: String,
    /// Non-generated columns, quoted, in attribute order.
    pub columns: Vec<String>,
    /// Partitioned tables are read through their partitions; plain tables with `ONLY`.
    pub partitioned: bool,
    /// Copied in text format: some column's type holds catalog OIDs or has no binary I/O (see
    /// the module docs).
    pub text: bool,
    /// `pg_class.reltuples` (negative: never analyzed).
    pub estimated_rows: f64,
    pub pages: i64,
}

impl TablePlan {
    fn column_list(&self) -> String {
        self.columns.join(", ")
    }

    fn format(&self) -> &'static str {
        if self.text { "text" } else { "binary" }
    }

    /// A table without (non-generated) columns still has rows: `SELECT FROM t` and a `COPY`
    /// without a column list carry them as zero-field tuples.
    fn copy_out_sql(&self) -> String {
        format!(
            "COPY (SELECT {} FROM {}{}) TO STDOUT (FORMAT {})",
            self.column_list(),
            if self.partitioned { "" } else { "ONLY " },
            self.quoted,
            self.format()
        )
    }

    fn copy_in_sql(&self) -> String {
        if self.columns.is_empty() {
            // Without a list, COPY takes every non-generated column: none here.
            return format!("COPY {} FROM STDIN (FORMAT {})", self.quoted, self.format());
        }
        format!(
            "COPY {} ({}) FROM STDIN (FORMAT {})",
            self.quoted,
            self.column_list(),
            self.format()
        )
    }
}

/// What one table's copy moved.
#[derive(Debug, Clone)]
pub(crate) struct Copied {
    pub display: String,
    /// Copied in text format.
    pub text: bool,
    pub rows: u64,
    pub bytes: u64,
}

/// Settings of every copy session, source and target: names written and read by text-format
/// copies are schema-qualified and resolved the same way on both sides, dates and numbers
/// round-trip exactly (pg_dump's settings).
const SESSION_SETTINGS: &str = "SET search_path = ''; SET DateStyle = ISO; \
    SET IntervalStyle = postgres; SET extra_float_digits = 3";

/// Opens a source session whose transaction sees exactly the exported snapshot.
pub(crate) async fn snapshot_session(
    source: &ConnInfo,
    snapshot: &str,
) -> Result<Client, CloneError> {
    let client = source.connect().await.map_err(|e| CloneError::Connect {
        context: "connecting to the source".into(),
        source: e,
    })?;
    client
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; SET TRANSACTION SNAPSHOT {}; \
             {SESSION_SETTINGS}",
            quote_literal(snapshot)
        ))
        .await
        .map_err(|e| CloneError::Snapshot {
            snapshot: snapshot.to_owned(),
            source_db: source.redacted(),
            message: super::error::pg_message(&e),
            source: e,
        })?;
    Ok(client)
}

/// Opens a target session for loading: `session_replication_role = replica`, so user triggers
/// and foreign-key checks do not fire during the load (rows are consistent at the snapshot).
pub(crate) async fn load_session(target: &ConnInfo) -> Result<Client, CloneError> {
    let client = target.connect().await.map_err(|e| CloneError::Connect {
        context: "connecting to the clone target".into(),
        source: e,
    })?;
    client
        .batch_execute(&format!(
            "SET session_replication_role = replica; {SESSION_SETTINGS}"
        ))
        .await
        .sql_context(
            "setting session_replication_role = replica on the target (needs a superuser, or on \
             PostgreSQL 15+ GRANT SET ON PARAMETER session_replication_role)",
        )?;
    Ok(client)
}

/// Whether any copied column of table `$1` has a type whose binary form is a value of the
/// source's catalog (a `reg*` type) or that has no binary I/O, looked for through domains,
/// arrays, composites, ranges and multiranges.
const CATALOG_OID_TYPES: &str = "WITH RECURSIVE walk(t) AS ( \
      SELECT a.atttypid FROM pg_attribute a WHERE a.attrelid = to_regclass($1) \
        AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '' \
    UNION \
      SELECT n.t FROM walk w JOIN pg_type ty ON ty.oid = w.t CROSS JOIN LATERAL ( \
        SELECT ty.typbasetype WHERE ty.typbasetype <> 0 \
        UNION ALL SELECT ty.typelem WHERE ty.typelem <> 0 \
          AND ty.typsubscript = 'pg_catalog.array_subscript_handler'::pg_catalog.regproc \
        UNION ALL SELECT f.atttypid FROM pg_attribute f WHERE ty.typrelid <> 0 \
          AND f.attrelid = ty.typrelid AND f.attnum > 0 AND NOT f.attisdropped \
        UNION ALL SELECT r.rngsubtype FROM pg_range r WHERE r.rngtypid = ty.oid \
        UNION ALL SELECT r.rngtypid FROM pg_range r WHERE r.rngmultitypid = ty.oid) n(t)) \
    SELECT EXISTS (SELECT 1 FROM walk w JOIN pg_type ty ON ty.oid = w.t \
      WHERE ty.typsend = 0 OR ty.typreceive = 0 OR ty.oid IN ('regclass'::regtype, \
        'regtype'::regtype, 'regproc'::regtype, 'regprocedure'::regtype, 'regoper'::regtype, \
        'regoperator'::regtype, 'regconfig'::regtype, 'regdictionary'::regtype, \
        'regnamespace'::regtype, 'regrole'::regtype, 'regcollation'::regtype))";

/// Reads a table's copy plan in the snapshot.
pub(crate) async fn plan_table(
    source: &Client,
    schema: &str,
    name: &str,
) -> Result<TablePlan, CloneError> {
    let quoted = crate::sql::quote_qualified(schema, name);
    let display = format!("{schema}.{name}");
    let row = source
        .query_opt(
            "SELECT c.relkind::text, c.reltuples::float8, c.relpages::int8 FROM pg_class c \
             WHERE c.oid = to_regclass($1)",
            &[&quoted],
        )
        .await
        .with_sql_context(|| format!("reading {display} in the snapshot"))?;
    let Some(row) = row else {
        return Err(CloneError::Options(format!(
            "table {display} does not exist in the source snapshot"
        )));
    };
    let relkind: String = row.get(0);
    let columns = source
        .query(
            "SELECT a.attname::text FROM pg_attribute a WHERE a.attrelid = to_regclass($1) \
             AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '' ORDER BY a.attnum",
            &[&quoted],
        )
        .await
        .with_sql_context(|| format!("reading the columns of {display}"))?
        .iter()
        .map(|r| quote_ident(r.get::<_, &str>(0)))
        .collect();
    let text = source
        .query_one(CATALOG_OID_TYPES, &[&quoted])
        .await
        .with_sql_context(|| format!("reading the column types of {display}"))?
        .get(0);
    Ok(TablePlan {
        display,
        quoted,
        columns,
        partitioned: relkind == "p",
        text,
        estimated_rows: row.get(1),
        pages: row.get(2),
    })
}

fn bar(multi: &MultiProgress, plan: &TablePlan) -> ProgressBar {
    let pb = if plan.estimated_rows > 0.0 {
        let pb = ProgressBar::new(plan.estimated_rows as u64);
        pb.set_style(
            ProgressStyle::with_template(
                "{prefix:30!} [{bar:30}] {human_pos}/~{human_len} rows {per_sec} ETA {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        pb
    } else {
        let pb = ProgressBar::no_length();
        pb.set_style(
            ProgressStyle::with_template("{prefix:30!} {spinner} {human_pos} rows {per_sec}")
                .expect("valid template"),
        );
        pb
    };
    pb.set_prefix(plan.display.clone());
    multi.add(pb)
}

/// Streams one table from `source` to `target`.
async fn copy_table(
    source: &Client,
    target: &Client,
    plan: &TablePlan,
    pb: Option<&ProgressBar>,
) -> Result<Copied, CloneError> {
    let ctx = |what: &str| format!("copying {} ({what})", plan.display);
    let out = source
        .copy_out(plan.copy_out_sql().as_str())
        .await
        .with_sql_context(|| ctx("reading the source"))?;
    let sink = target
        .copy_in::<_, Bytes>(plan.copy_in_sql().as_str())
        .await
        .with_sql_context(|| ctx("writing the target"))?;
    pin_mut!(out);
    pin_mut!(sink);
    let mut bytes = 0u64;
    let mut pending = 0u64;
    let mut counter = BinaryRowCounter::default();
    // Text format: every row ends with one newline (newlines inside values are escaped).
    let mut text_rows = 0u64;
    // The server sends one CopyData message per row (the last one is the binary trailer).
    while let Some(chunk) = out.next().await {
        let chunk = chunk.with_sql_context(|| ctx("reading the source"))?;
        bytes += chunk.len() as u64;
        if plan.text {
            text_rows += chunk.iter().filter(|&&b| b == b'\n').count() as u64;
        } else {
            counter
                .feed(&chunk)
                .map_err(|what| CloneError::CopyStream {
                    table: plan.display.clone(),
                    what,
                })?;
        }
        sink.as_mut()
            .feed(chunk)
            .await
            .with_sql_context(|| ctx("writing the target"))?;
        pending += 1;
        if pending == 1024 {
            if let Some(pb) = pb {
                pb.inc(pending);
            }
            pending = 0;
        }
    }
    if plan.text {
        counter.rows = text_rows;
    } else if !counter.trailer {
        return Err(CloneError::CopyStream {
            table: plan.display.clone(),
            what: "the source's COPY ended without the binary trailer".into(),
        });
    }
    let rows = sink
        .as_mut()
        .finish()
        .await
        .with_sql_context(|| ctx("finishing the target COPY"))?;
    if rows != counter.rows {
        return Err(CloneError::RowCountMismatch {
            table: plan.display.clone(),
            source_rows: counter.rows,
            target_rows: rows,
        });
    }
    if let Some(pb) = pb {
        pb.set_position(rows);
        pb.finish();
    }
    Ok(Copied {
        display: plan.display.clone(),
        text: plan.text,
        rows,
        bytes,
    })
}

/// Counts the tuples of a `COPY … (FORMAT binary)` stream fed one `CopyData` message at a
/// time. The protocol sends each row in one message (the header rides with the first, the
/// trailer comes last), so a tuple never spans two messages.
#[derive(Debug, Default)]
pub(crate) struct BinaryRowCounter {
    header: bool,
    /// The end-of-data marker (field count -1) was seen.
    pub trailer: bool,
    pub rows: u64,
}

const BINARY_SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";

impl BinaryRowCounter {
    /// Counts the tuples in `chunk`; `Err` says what is malformed.
    pub(crate) fn feed(&mut self, mut chunk: &[u8]) -> Result<(), String> {
        fn take<'a>(buf: &mut &'a [u8], n: usize, what: &str) -> Result<&'a [u8], String> {
            if buf.len() < n {
                return Err(format!("binary COPY data cut short in {what}"));
            }
            let (head, rest) = buf.split_at(n);
            *buf = rest;
            Ok(head)
        }
        fn int(buf: &mut &[u8], n: usize, what: &str) -> Result<i64, String> {
            let b = take(buf, n, what)?;
            Ok(match n {
                2 => i16::from_be_bytes([b[0], b[1]]) as i64,
                _ => i32::from_be_bytes([b[0], b[1], b[2], b[3]]) as i64,
            })
        }
        if !self.header {
            if take(&mut chunk, BINARY_SIGNATURE.len(), "the header")? != BINARY_SIGNATURE {
                return Err("binary COPY data without the PGCOPY signature".into());
            }
            int(&mut chunk, 4, "the header flags")?;
            let ext = int(&mut chunk, 4, "the header extension length")?;
            take(&mut chunk, ext.max(0) as usize, "the header extension")?;
            self.header = true;
        }
        while !chunk.is_empty() {
            if self.trailer {
                return Err("binary COPY data after the trailer".into());
            }
            let fields = int(&mut chunk, 2, "a tuple's field count")?;
            if fields == -1 {
                self.trailer = true;
                continue;
            }
            for _ in 0..fields {
                let len = int(&mut chunk, 4, "a field length")?;
                if len > 0 {
                    take(&mut chunk, len as usize, "a field value")?;
                }
            }
            self.rows += 1;
        }
        Ok(())
    }
}

/// Copies every planned table, `parallel` at a time (largest first), each worker on its own
/// source session importing `snapshot` and its own target load session. Returns the tables in
/// the order given. The first failure stops all workers.
pub(crate) async fn copy_tables(
    source: &ConnInfo,
    target: &ConnInfo,
    snapshot: &str,
    plans: Vec<TablePlan>,
    parallel: usize,
    progress: bool,
) -> Result<Vec<Copied>, CloneError> {
    let multi = MultiProgress::with_draw_target(if progress {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    });
    let mut order: Vec<usize> = (0..plans.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(plans[i].pages));
    let plans = Arc::new(plans);
    let queue = Arc::new(Mutex::new(order.into_iter().collect::<VecDeque<usize>>()));
    let workers = parallel.min(plans.len()).max(1);
    // Open every session before copying, so all imports happen while the caller is certain to
    // still hold the snapshot.
    let mut sessions = Vec::with_capacity(workers);
    for _ in 0..workers {
        sessions.push((
            snapshot_session(source, snapshot).await?,
            load_session(target).await?,
        ));
    }
    let mut set = tokio::task::JoinSet::new();
    for (src, dst) in sessions {
        let plans = Arc::clone(&plans);
        let queue = Arc::clone(&queue);
        let multi = multi.clone();
        set.spawn(async move {
            let mut done = Vec::new();
            loop {
                let next = queue.lock().expect("queue lock").pop_front();
                let Some(i) = next else { break };
                let plan = &plans[i];
                let pb = progress.then(|| bar(&multi, plan));
                let copied = copy_table(&src, &dst, plan, pb.as_ref()).await?;
                done.push((i, copied));
            }
            src.batch_execute("COMMIT")
                .await
                .sql_context("ending the source snapshot transaction")?;
            Ok::<_, CloneError>(done)
        });
    }
    let mut results: Vec<Option<Copied>> = vec![None; plans.len()];
    while let Some(joined) = set.join_next().await {
        let done = match joined {
            Ok(r) => r?,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => return Err(CloneError::Options(format!("copy worker stopped: {e}"))),
        };
        for (i, c) in done {
            results[i] = Some(c);
        }
    }
    Ok(results
        .into_iter()
        .map(|c| c.expect("every table copied"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Vec<u8> {
        let mut v = BINARY_SIGNATURE.to_vec();
        v.extend_from_slice(&0i32.to_be_bytes());
        v.extend_from_slice(&0i32.to_be_bytes());
        v
    }

    fn tuple(fields: &[Option<&[u8]>]) -> Vec<u8> {
        let mut v = (fields.len() as i16).to_be_bytes().to_vec();
        for f in fields {
            match f {
                Some(b) => {
                    v.extend_from_slice(&(b.len() as i32).to_be_bytes());
                    v.extend_from_slice(b);
                }
                None => v.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        v
    }

    #[test]
    fn counts_tuples_of_a_binary_copy_stream() {
        let mut c = BinaryRowCounter::default();
        let mut first = header();
        first.extend(tuple(&[Some(b"abc"), None]));
        c.feed(&first).unwrap();
        c.feed(&tuple(&[Some(b""), Some(b"\x00\x01")])).unwrap();
        assert!(!c.trailer);
        c.feed(&(-1i16).to_be_bytes()).unwrap();
        assert!(c.trailer);
        assert_eq!(c.rows, 2);
        assert!(c.feed(&tuple(&[None])).is_err(), "data after the trailer");
    }

    #[test]
    fn zero_column_tuples_and_empty_tables_count() {
        let mut c = BinaryRowCounter::default();
        let mut first = header();
        first.extend(tuple(&[]));
        c.feed(&first).unwrap();
        c.feed(&tuple(&[])).unwrap();
        c.feed(&(-1i16).to_be_bytes()).unwrap();
        assert_eq!(c.rows, 2);

        let mut empty = BinaryRowCounter::default();
        let mut only = header();
        only.extend((-1i16).to_be_bytes());
        empty.feed(&only).unwrap();
        assert!(empty.trailer);
        assert_eq!(empty.rows, 0);
    }

    #[test]
    fn malformed_streams_are_errors() {
        assert!(BinaryRowCounter::default().feed(b"COPY").is_err());
        let mut c = BinaryRowCounter::default();
        let mut cut = header();
        cut.extend(&tuple(&[Some(b"abcdef")])[..7]);
        assert!(c.feed(&cut).is_err());
    }
}
