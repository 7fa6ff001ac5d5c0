//! `walshift inspect`, `walshift status`, `walshift buffer …`: reading and maintaining a buffer.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::process::ExitCode;

use anyhow::Context;
use serde_json::{Map, Value, json};

use super::args::BufferDir;
use super::parse_lsn;
use crate::buffer::{self, BufferReader, CommitInfo, TxnEvent};
use crate::lsn::Lsn;
use crate::source::pgoutput::{self, LogicalMessage, OldTuple, Relation, TupleData, TupleValue};

#[derive(clap::Args, Debug)]
pub struct InspectArgs {
    #[command(flatten)]
    buffer: BufferDir,
    /// Show transactions that commit after this LSN.
    #[arg(long, value_parser = parse_lsn, value_name = "LSN", default_value = "0/0")]
    from: Lsn,
    /// At most this many transactions.
    #[arg(long, default_value_t = 20)]
    limit: usize,
    /// One JSON object per transaction (JSON Lines) on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    buffer: BufferDir,
    /// Also show how far replay has applied this buffer on this target, and the lag.
    #[arg(long, value_name = "CONN")]
    target: Option<String>,
    /// JSON on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Subcommand, Debug)]
pub enum BufferCommand {
    /// Drop whole segments holding only transactions that commit at or before an LSN.
    Prune {
        #[command(flatten)]
        buffer: BufferDir,
        /// Keep everything a transaction ending after this LSN needs.
        #[arg(long, value_parser = parse_lsn, value_name = "LSN")]
        before: Lsn,
    },
    /// Read every record and check every checksum; report the first damage with its location.
    /// Also fails when the buffer ends before what capture recorded as durable (data loss),
    /// and, with --source, when the slot was confirmed past what the buffer holds.
    Verify {
        #[command(flatten)]
        buffer: BufferDir,
        /// Also check the buffer against its slot on this source.
        #[arg(long, value_name = "CONN")]
        source: Option<String>,
    },
}

fn open(dir: &std::path::Path) -> anyhow::Result<BufferReader> {
    if dir.exists() && !dir.is_dir() {
        anyhow::bail!(
            "{} is not a directory: --buffer takes the buffer directory `walshift capture --buffer …` created",
            dir.display()
        );
    }
    if !dir.is_dir() {
        anyhow::bail!(
            "buffer directory {} does not exist (create one with `walshift capture --buffer …`)",
            dir.display()
        );
    }
    BufferReader::open(dir).with_context(|| format!("opening buffer {}", dir.display()))
}

pub async fn status(a: StatusArgs) -> anyhow::Result<ExitCode> {
    let st = open(&a.buffer.buffer)?.status()?;
    // A `walshift run` serving this buffer answers on its control socket.
    let run = crate::run::control::request(&a.buffer.buffer, "status")
        .await
        .ok()
        .flatten();
    let last = st.last_commit.map(|c| c.end_lsn);
    let mut prepared = 0;
    let applied = match (&a.target, &st.meta) {
        (Some(t), Some(m)) => {
            let target = crate::conn::ConnInfo::parse(t).context("--target")?;
            let client = target.connect().await?;
            let id = crate::apply::progress::buffer_id(m.system_identifier, &m.slot);
            prepared = crate::apply::progress::prepared(&client, &id).await?.len();
            Some(crate::apply::progress::find_applied(&client, &id).await?)
        }
        (Some(_), None) => anyhow::bail!(
            "{} has no buffer.json: not a walshift buffer",
            st.dir.display()
        ),
        _ => None,
    };
    if a.json {
        let mut v = serde_json::to_value(&st)?;
        v["run"] = run.clone().unwrap_or(serde_json::Value::Null);
        if let Some(applied) = applied {
            v["applied_lsn"] = json!(applied.map(|l| l.to_string()));
            v["lag_bytes"] = json!(last.map(|l| l.bytes_since(applied.unwrap_or(Lsn::ZERO))));
            v["prepared_transactions"] = json!(prepared);
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    let mut damaged = false;
    println!("buffer        {}", st.dir.display());
    match &run {
        Some(r) => println!(
            "walshift run  running (pid {}, {}, applied {})",
            r["pid"],
            r["phase"].as_str().unwrap_or("?"),
            r["applied_lsn"].as_str().unwrap_or("-")
        ),
        None => println!("walshift run  not running"),
    }
    if let Some(m) = &st.meta {
        println!(
            "source        system {} database {:?} slot {:?} publication {:?}",
            m.system_identifier, m.database, m.slot, m.publication
        );
        println!("started       {}", m.created_at);
    }
    println!(
        "segments      {} ({:.1} MiB)",
        st.segments,
        st.total_bytes as f64 / 1048576.0
    );
    println!("transactions  {}", st.transactions);
    if let Some(p) = &st.confirmed {
        println!(
            "confirmed     {} to slot {:?} (last heard from the source {})",
            p.confirmed_lsn, p.slot, p.updated_at
        );
        if let Err(e) = p.check_buffer_end(&st.dir, last.unwrap_or_default()) {
            eprintln!("error: {e}");
            damaged = true;
        }
    }
    let lsn = |l: Option<Lsn>| l.map(|l| l.to_string()).unwrap_or_else(|| "-".into());
    println!("first commit  {}", lsn(st.first_commit_lsn));
    println!("last commit   {}", lsn(last));
    println!(
        "last commit   at {}",
        commit_time(st.last_commit.as_ref()).unwrap_or_else(|| "-".into())
    );
    if let Some(applied) = applied {
        println!("applied       {}", lsn(applied));
        println!(
            "replay lag    {} bytes of WAL",
            last.map(|l| l.bytes_since(applied.unwrap_or(Lsn::ZERO)).to_string())
                .unwrap_or_else(|| "0".into())
        );
        if prepared > 0 {
            println!(
                "prepared      {prepared} transaction(s) of a batch between its two commit phases: \
                 settled in a moment by a running replay, or by the next replay start if none runs"
            );
        }
    }
    Ok(if damaged {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

pub async fn buffer(c: BufferCommand) -> anyhow::Result<ExitCode> {
    match c {
        BufferCommand::Prune { buffer, before } => {
            let _ = open(&buffer.buffer)?;
            let r = buffer::prune(&buffer.buffer, before)?;
            println!(
                "removed {} segment(s), {:.1} MiB freed, {} left",
                r.removed.len(),
                r.bytes_freed as f64 / 1048576.0,
                r.remaining
            );
            Ok(ExitCode::SUCCESS)
        }
        BufferCommand::Verify { buffer, source } => {
            let reader = open(&buffer.buffer)?;
            let (mut records, mut txns, mut bytes) = (0u64, 0u64, 0u64);
            let mut end = Lsn::ZERO;
            for ev in reader.transactions_from(Lsn::ZERO)? {
                let ev = ev?;
                let rec = match &ev {
                    TxnEvent::Begin(r) | TxnEvent::Change(r) | TxnEvent::Standalone(r) => r,
                    TxnEvent::Commit { record, commit } => {
                        txns += 1;
                        end = commit.end_lsn;
                        record
                    }
                };
                pgoutput::decode(&rec.payload)
                    .with_context(|| format!("record at {:?} (LSN {})", rec.pos, rec.lsn))?;
                records += 1;
                bytes += rec.payload.len() as u64;
            }
            if end.is_zero() {
                // Everything may have been pruned: the last segment header still knows.
                end = reader
                    .status()?
                    .last_commit
                    .map(|c| c.end_lsn)
                    .unwrap_or_default();
            }
            if let Some(p) = buffer::SlotProgress::read(&buffer.buffer)? {
                p.check_buffer_end(&buffer.buffer, end)?;
            }
            if let Some(source) = source {
                let meta = buffer::BufferMeta::read(&buffer.buffer)?.ok_or_else(|| {
                    anyhow::anyhow!(
                        "{} has no buffer.json: not a walshift buffer",
                        buffer.buffer.display()
                    )
                })?;
                let source = crate::conn::ConnInfo::parse(&source).context("--source")?;
                let confirmed =
                    crate::capture::check_slot(&source, &meta, &buffer.buffer, end).await?;
                println!(
                    "slot {:?}: confirmed up to {confirmed}, the buffer holds up to {end}: nothing confirmed is missing",
                    meta.slot
                );
            }
            println!(
                "ok: {records} records, {txns} transactions, {:.1} MiB of pgoutput, every checksum and message valid",
                bytes as f64 / 1048576.0
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn commit_time(c: Option<&CommitInfo>) -> Option<String> {
    c.and_then(|c| c.commit_time())
        .map(|t| humantime::format_rfc3339_millis(t).to_string())
}

/// Renders one value for humans: quoted text, cut at 60 characters.
fn show_value(v: &TupleValue) -> String {
    match v {
        TupleValue::Null => "NULL".into(),
        TupleValue::UnchangedToast => "<unchanged TOAST>".into(),
        TupleValue::Text(b) => {
            let s = String::from_utf8_lossy(b);
            let mut out: String = s.chars().take(60).collect();
            if s.chars().count() > 60 {
                out.push('…');
            }
            format!("'{}'", out.replace('\'', "''").replace('\n', "\\n"))
        }
        TupleValue::Binary(b) => format!("<{} binary bytes>", b.len()),
        #[allow(unreachable_patterns)]
        _ => "<?>".into(),
    }
}

fn json_value(v: &TupleValue) -> Value {
    match v {
        TupleValue::Null => Value::Null,
        TupleValue::UnchangedToast => json!({"unchanged_toast": true}),
        TupleValue::Text(b) => Value::String(String::from_utf8_lossy(b).into_owned()),
        TupleValue::Binary(b) => json!({"binary_len": b.len()}),
        #[allow(unreachable_patterns)]
        _ => Value::Null,
    }
}

struct Relations(HashMap<u32, Relation>);

impl Relations {
    fn name(&self, relid: u32) -> String {
        match self.0.get(&relid) {
            Some(r) if r.namespace.is_empty() => r.name.clone(),
            Some(r) => format!("{}.{}", r.namespace, r.name),
            None => format!("<relation {relid}>"),
        }
    }

    fn column(&self, relid: u32, i: usize) -> String {
        self.0
            .get(&relid)
            .and_then(|r| r.columns.get(i))
            .map(|c| c.name.clone())
            .unwrap_or_else(|| format!("col{}", i + 1))
    }

    fn tuple(&self, relid: u32, t: &TupleData, only_keys: bool) -> String {
        let rel = self.0.get(&relid);
        t.values
            .iter()
            .enumerate()
            .filter(|(i, v)| {
                !only_keys
                    || rel
                        .and_then(|r| r.columns.get(*i))
                        .map(|c| c.is_key())
                        .unwrap_or(!matches!(v, TupleValue::Null))
            })
            .map(|(i, v)| format!("{}={}", self.column(relid, i), show_value(v)))
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn tuple_json(&self, relid: u32, t: &TupleData, only_keys: bool) -> Value {
        let rel = self.0.get(&relid);
        let mut m = Map::new();
        for (i, v) in t.values.iter().enumerate() {
            if only_keys
                && !rel
                    .and_then(|r| r.columns.get(i))
                    .map(|c| c.is_key())
                    .unwrap_or(true)
            {
                continue;
            }
            m.insert(self.column(relid, i), json_value(v));
        }
        Value::Object(m)
    }
}

/// One decoded change for humans, or `None` for messages that are not changes.
fn describe(rels: &Relations, m: &LogicalMessage) -> Option<String> {
    Some(match m {
        LogicalMessage::Insert(i) => format!(
            "INSERT {}: {}",
            rels.name(i.relid),
            rels.tuple(i.relid, &i.new, false)
        ),
        LogicalMessage::Update(u) => {
            let mut s = format!(
                "UPDATE {}: {}",
                rels.name(u.relid),
                rels.tuple(u.relid, &u.new, false)
            );
            match &u.old {
                Some(OldTuple::Key(k)) => {
                    let _ = write!(s, "  (old key: {})", rels.tuple(u.relid, k, true));
                }
                Some(OldTuple::Full(o)) => {
                    let _ = write!(s, "  (old row: {})", rels.tuple(u.relid, o, false));
                }
                None => {}
            }
            s
        }
        LogicalMessage::Delete(d) => match &d.old {
            OldTuple::Key(k) => format!(
                "DELETE {}: {}",
                rels.name(d.relid),
                rels.tuple(d.relid, k, true)
            ),
            OldTuple::Full(o) => format!(
                "DELETE {}: {}",
                rels.name(d.relid),
                rels.tuple(d.relid, o, false)
            ),
        },
        LogicalMessage::Truncate(t) => format!(
            "TRUNCATE {}{}{}",
            t.relids
                .iter()
                .map(|r| rels.name(*r))
                .collect::<Vec<_>>()
                .join(", "),
            if t.cascade() { " CASCADE" } else { "" },
            if t.restart_identity() {
                " RESTART IDENTITY"
            } else {
                ""
            }
        ),
        LogicalMessage::Message(msg) => format!(
            "MESSAGE prefix={:?}{}: {}",
            msg.prefix,
            if msg.is_transactional() {
                " (transactional)"
            } else {
                ""
            },
            String::from_utf8_lossy(&msg.content)
        ),
        _ => return None,
    })
}

fn describe_json(rels: &Relations, m: &LogicalMessage) -> Option<Value> {
    Some(match m {
        LogicalMessage::Insert(i) => {
            json!({"op": "insert", "table": rels.name(i.relid), "new": rels.tuple_json(i.relid, &i.new, false)})
        }
        LogicalMessage::Update(u) => {
            let mut v = json!({"op": "update", "table": rels.name(u.relid), "new": rels.tuple_json(u.relid, &u.new, false)});
            match &u.old {
                Some(OldTuple::Key(k)) => v["old_key"] = rels.tuple_json(u.relid, k, true),
                Some(OldTuple::Full(o)) => v["old"] = rels.tuple_json(u.relid, o, false),
                None => {}
            }
            v
        }
        LogicalMessage::Delete(d) => match &d.old {
            OldTuple::Key(k) => {
                json!({"op": "delete", "table": rels.name(d.relid), "old_key": rels.tuple_json(d.relid, k, true)})
            }
            OldTuple::Full(o) => {
                json!({"op": "delete", "table": rels.name(d.relid), "old": rels.tuple_json(d.relid, o, false)})
            }
        },
        LogicalMessage::Truncate(t) => {
            json!({"op": "truncate", "tables": t.relids.iter().map(|r| rels.name(*r)).collect::<Vec<_>>(),
            "cascade": t.cascade(), "restart_identity": t.restart_identity()})
        }
        LogicalMessage::Message(msg) => {
            json!({"op": "message", "prefix": msg.prefix, "transactional": msg.is_transactional(),
            "content": String::from_utf8_lossy(&msg.content)})
        }
        _ => return None,
    })
}

pub fn inspect(a: InspectArgs) -> anyhow::Result<ExitCode> {
    let reader = open(&a.buffer.buffer)?;
    let mut rels = Relations(HashMap::new());
    let mut shown = 0usize;
    let mut txn_lines: Vec<String> = Vec::new();
    let mut txn_json: Vec<Value> = Vec::new();
    let mut xid = 0u32;
    let mut more = false;
    for ev in reader.transactions_from(a.from)? {
        let ev = ev?;
        let rec = match &ev {
            TxnEvent::Begin(r)
            | TxnEvent::Change(r)
            | TxnEvent::Standalone(r)
            | TxnEvent::Commit { record: r, .. } => r,
        };
        let msg = pgoutput::decode(&rec.payload).with_context(|| {
            format!(
                "decoding the record at {:?} (LSN {}) of {}",
                rec.pos,
                rec.lsn,
                a.buffer.buffer.display()
            )
        })?;
        if let LogicalMessage::Relation(r) = &msg {
            rels.0.insert(r.relid, r.clone());
            continue;
        }
        match ev {
            TxnEvent::Begin(_) => {
                if shown >= a.limit {
                    more = true;
                    break;
                }
                txn_lines.clear();
                txn_json.clear();
                if let LogicalMessage::Begin(b) = &msg {
                    xid = b.xid;
                }
            }
            TxnEvent::Change(_) => {
                if a.json {
                    txn_json.extend(describe_json(&rels, &msg));
                } else {
                    txn_lines.extend(describe(&rels, &msg));
                }
            }
            TxnEvent::Commit { commit, .. } => {
                shown += 1;
                let LogicalMessage::Commit(c) = &msg else {
                    continue;
                };
                let when = commit_time(Some(&commit)).unwrap_or_default();
                if a.json {
                    println!(
                        "{}",
                        json!({"xid": xid, "commit_lsn": c.commit_lsn.to_string(), "end_lsn": c.end_lsn.to_string(),
                               "commit_time": when, "changes": txn_json})
                    );
                } else {
                    println!(
                        "commit {} (end {})  xid {}  {}  {} change(s)",
                        c.commit_lsn,
                        c.end_lsn,
                        xid,
                        when,
                        txn_lines.len()
                    );
                    for l in &txn_lines {
                        println!("  {l}");
                    }
                }
            }
            TxnEvent::Standalone(_) => {
                if a.json {
                    if let Some(v) = describe_json(&rels, &msg) {
                        println!("{}", json!({"standalone": v, "lsn": rec.lsn.to_string()}));
                    }
                } else if let Some(l) = describe(&rels, &msg) {
                    println!("{} {l}", rec.lsn);
                }
            }
        }
    }
    if more && !a.json {
        eprintln!(
            "(more transactions follow: raise --limit, or pass --from <end LSN of the last one shown>)"
        );
    }
    Ok(ExitCode::SUCCESS)
}
