//! Sequences: logical decoding does not carry them, so at cutover every target sequence is set
//! to its source counterpart's current state (`last_value`, `is_called`), after the fence (a
//! read-only transaction cannot call `nextval`, so the source's values no longer move).
//!
//! Which target sequence a source sequence feeds: a sequence owned by a column (`serial`,
//! identity) follows its table through the [`TableMap`] — the target table's sequence for the
//! same column (`pg_get_serial_sequence`); otherwise (or if that finds nothing) the sequence
//! of the same schema-qualified name. A source sequence with no counterpart on the target is
//! reported as skipped. When several source sequences feed one target sequence, it gets the
//! largest value.
//!
//! **Never backwards:** a target sequence already past its source value (the application
//! took numbers on the target after a switch, or an earlier cutover set it) is left as it
//! is — the target gets the greater of the two (in the sequence's direction), so a cutover run
//! again after a switch cannot hand out numbers the new primary already used.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio_postgres::Client;

use super::journal::Step;
use super::report::SequenceSync;
use super::{Ctx, CutoverError};
use crate::SqlContext;
use crate::sql::{quote_ident, quote_qualified};

/// Where a source table's rows land on the target: `(schema, table)` → target tables.
/// Identity by default; a migration mapping that renames or splits tables supplies its own.
#[derive(Clone)]
pub struct TableMap(Arc<MapFn>);

/// The mapping function behind a [`TableMap`].
type MapFn = dyn Fn(&str, &str) -> Vec<(String, String)> + Send + Sync;

impl TableMap {
    /// Every table maps to the table of the same name.
    pub fn identity() -> Self {
        TableMap(Arc::new(|s, t| vec![(s.to_owned(), t.to_owned())]))
    }

    /// A custom mapping.
    pub fn new(f: impl Fn(&str, &str) -> Vec<(String, String)> + Send + Sync + 'static) -> Self {
        TableMap(Arc::new(f))
    }

    /// The tables a migration mapping sends each source table to (itself when not named).
    pub fn from_mapping(mapping: std::sync::Arc<crate::transform::Mapping>) -> Self {
        TableMap::new(move |s, t| {
            mapping
                .targets_of(&crate::transform::TableName::new(s, t))
                .into_iter()
                .map(|n| (n.schema, n.name))
                .collect()
        })
    }

    /// The target tables of a source table (empty: the table is dropped by the mapping).
    pub fn map(&self, schema: &str, table: &str) -> Vec<(String, String)> {
        (self.0)(schema, table)
    }
}

impl Default for TableMap {
    fn default() -> Self {
        TableMap::identity()
    }
}

impl std::fmt::Debug for TableMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TableMap(..)")
    }
}

/// A source sequence, its owning column if any, and its state.
struct SourceSequence {
    schema: String,
    name: String,
    owner: Option<(String, String, String)>,
    last_value: i64,
    is_called: bool,
}

/// What [`sync`] did.
#[derive(Debug, Default)]
pub struct SequencesSynced {
    pub set: Vec<SequenceSync>,
    pub skipped: Vec<String>,
}

/// The source's sequences and their owning columns (catalog only: no values).
const SOURCE_SEQUENCES: &str = "SELECT n.nspname::text, c.relname::text, tn.nspname::text, t.relname::text, a.attname::text \
     FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
     LEFT JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = c.oid \
          AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i') AND d.refobjsubid > 0 \
     LEFT JOIN pg_class t ON t.oid = d.refobjid \
     LEFT JOIN pg_namespace tn ON tn.oid = t.relnamespace \
     LEFT JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid \
     WHERE c.relkind = 'S' AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'walshift') \
       AND n.nspname NOT LIKE 'pg\\_%' \
     ORDER BY 1, 2";

/// Which target sequence each source sequence feeds, worked out from the catalogs alone —
/// before the fence, so that the window only reads values and sets them ([`apply`]).
pub struct Plan {
    seqs: Vec<SourceSequence>,
    /// md5 of the source catalog rows the plan was made from: [`apply`] checks it in the same
    /// statement that reads the values, and refuses a plan the catalog has moved past.
    fingerprint: String,
    /// Target sequence (quoted, qualified) → the source sequences feeding it.
    targets: BTreeMap<String, Vec<usize>>,
    skipped: Vec<String>,
}

impl Plan {
    /// Source sequences the plan covers.
    pub fn len(&self) -> usize {
        self.seqs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }
}

/// The catalog fingerprint's SQL: the md5 of [`SOURCE_SEQUENCES`]'s rows.
fn fingerprint_sql() -> String {
    format!(
        "SELECT md5(coalesce(string_agg(concat_ws('/', s.*), ';'), '')) FROM ({SOURCE_SEQUENCES}) s"
    )
}

/// Reads the source's sequences and resolves their target counterparts (four statements,
/// whatever the number of sequences; no values).
pub async fn plan(
    source: &Client,
    target: &Client,
    map: &TableMap,
) -> Result<Plan, tokio_postgres::Error> {
    let rows = source.query(SOURCE_SEQUENCES, &[]).await?;
    let fingerprint: String = source.query_one(&fingerprint_sql(), &[]).await?.get(0);
    let seqs: Vec<SourceSequence> = rows
        .iter()
        .map(|r| SourceSequence {
            schema: r.get(0),
            name: r.get(1),
            owner: match (
                r.get::<_, Option<String>>(2),
                r.get::<_, Option<String>>(3),
                r.get::<_, Option<String>>(4),
            ) {
                (Some(s), Some(t), Some(c)) => Some((s, t, c)),
                _ => None,
            },
            last_value: 0,
            is_called: false,
        })
        .collect();
    let mut out = Plan {
        seqs,
        fingerprint,
        targets: BTreeMap::new(),
        skipped: Vec::new(),
    };
    if out.seqs.is_empty() {
        return Ok(out);
    }

    // Candidates per source sequence: (owning target table, column) pairs and the same name.
    let mut idx: Vec<i32> = Vec::new();
    let mut tables: Vec<Option<String>> = Vec::new();
    let mut columns: Vec<Option<String>> = Vec::new();
    let mut same_names: Vec<String> = Vec::new();
    for (i, s) in out.seqs.iter().enumerate() {
        let same = quote_qualified(&s.schema, &s.name);
        match &s.owner {
            Some((ts, tt, col)) => {
                for (ms, mt) in map.map(ts, tt) {
                    idx.push(i as i32);
                    tables.push(Some(quote_qualified(&ms, &mt)));
                    columns.push(Some(col.clone()));
                    same_names.push(same.clone());
                }
                if map.map(ts, tt).is_empty() {
                    idx.push(i as i32);
                    tables.push(None);
                    columns.push(None);
                    same_names.push(same);
                }
            }
            None => {
                idx.push(i as i32);
                tables.push(None);
                columns.push(None);
                same_names.push(same);
            }
        }
    }
    let resolved = target
        .query(
            // Resolved to an oid first, then named schema-qualified and quoted, whichever way
            // it was found.
            "SELECT y.i, CASE WHEN c.oid IS NOT NULL THEN format('%I.%I', n.nspname, c.relname) END FROM ( \
               SELECT x.i, coalesce( \
                 CASE WHEN x.tq IS NOT NULL AND to_regclass(x.tq) IS NOT NULL AND EXISTS ( \
                     SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass(x.tq) AND attname = x.col AND NOT attisdropped) \
                 THEN to_regclass(pg_get_serial_sequence(x.tq, x.col)) END, \
                 to_regclass(x.sq)) AS seq \
               FROM unnest($1::int4[], $2::text[], $3::text[], $4::text[]) AS x(i, tq, col, sq)) y \
             LEFT JOIN pg_class c ON c.oid = y.seq AND c.relkind = 'S' \
             LEFT JOIN pg_namespace n ON n.oid = c.relnamespace",
            &[&idx, &tables, &columns, &same_names],
        )
        .await?;
    let mut found = vec![false; out.seqs.len()];
    for r in resolved {
        let i = r.get::<_, i32>(0) as usize;
        let Some(t) = r.get::<_, Option<String>>(1) else {
            continue;
        };
        found[i] = true;
        out.targets.entry(t).or_default().push(i);
    }
    for (i, s) in out.seqs.iter().enumerate() {
        if !found[i] {
            out.skipped.push(format!(
                "{}.{}",
                quote_ident(&s.schema),
                quote_ident(&s.name)
            ));
        }
    }
    Ok(out)
}

/// Reads every source sequence's state and sets the target's counterparts: [`plan`], then
/// the values read and set at once (a sequence renamed in between is an error).
pub async fn sync(
    source: &Client,
    target: &Client,
    map: &TableMap,
) -> Result<SequencesSynced, tokio_postgres::Error> {
    let p = plan(source, target, map).await?;
    Ok(set_from(source, target, p, false)
        .await?
        .unwrap_or_default())
}

/// Sets the target sequences of `plan` from the source's current values, never backwards:
/// one statement reads every value and checks the source catalog still matches the plan
/// (`Ok(None)` when it does not, or a planned sequence is gone: plan again), one reads the
/// target's positions, one sets them — each sent without a separate prepare round trip.
pub async fn apply(
    source: &Client,
    target: &Client,
    plan: Plan,
) -> Result<Option<SequencesSynced>, tokio_postgres::Error> {
    set_from(source, target, plan, true).await
}

async fn set_from(
    source: &Client,
    target: &Client,
    plan: Plan,
    check_catalog: bool,
) -> Result<Option<SequencesSynced>, tokio_postgres::Error> {
    let Plan {
        mut seqs,
        fingerprint,
        targets,
        skipped,
    } = plan;
    if seqs.is_empty() && !check_catalog {
        return Ok(Some(SequencesSynced::default()));
    }
    // One statement reads them all, and the catalog's fingerprint.
    let values_sql = seqs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            format!(
                "SELECT {i}, last_value, is_called, NULL::text FROM {}",
                quote_qualified(&s.schema, &s.name)
            )
        })
        .chain(check_catalog.then(|| format!("SELECT -1, 0::int8, false, ({})", fingerprint_sql())))
        .collect::<Vec<_>>()
        .join(" UNION ALL ");
    let values = match source.query_typed(&values_sql, &[]).await {
        Ok(rows) => rows,
        // A planned sequence renamed or dropped since: plan again.
        Err(e)
            if check_catalog
                && e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    for r in values {
        let i: i32 = r.get(0);
        if i < 0 {
            if r.get::<_, Option<String>>(3).as_deref() != Some(fingerprint.as_str()) {
                return Ok(None);
            }
            continue;
        }
        let s = &mut seqs[i as usize];
        s.last_value = r.get(1);
        s.is_called = r.get(2);
    }
    let mut out = SequencesSynced {
        set: Vec::new(),
        skipped,
    };
    // Target sequence → (value, called, sources) keeping the largest value.
    let mut planned: BTreeMap<String, (i64, bool, Vec<usize>)> = BTreeMap::new();
    for (t, sources) in targets {
        let mut best: Option<(i64, bool)> = None;
        for &i in &sources {
            let v = (seqs[i].last_value, seqs[i].is_called);
            if best.is_none_or(|b| v > b) {
                best = Some(v);
            }
        }
        let (v, c) = best.expect("every planned target has a source");
        planned.insert(t, (v, c, sources));
    }
    if planned.is_empty() {
        return Ok(Some(out));
    }
    // The target's own positions: a target already ahead keeps its value.
    let current_sql = planned
        .keys()
        .enumerate()
        .map(|(i, t)| {
            format!(
                "SELECT {i}, last_value, is_called, \
                 (SELECT seqincrement FROM pg_sequence WHERE seqrelid = {}::regclass) FROM {t}",
                crate::sql::quote_literal(t)
            )
        })
        .collect::<Vec<_>>()
        .join(" UNION ALL ");
    let mut ahead = vec![false; planned.len()];
    for r in target.query_typed(&current_sql, &[]).await? {
        let i = r.get::<_, i32>(0) as usize;
        let (tv, tc, inc): (i64, bool, i64) = (r.get(1), r.get(2), r.get(3));
        let e = planned
            .values_mut()
            .nth(i)
            .expect("one row per planned sequence");
        let next = |v: i64, c: bool| if c { v.saturating_add(inc) } else { v };
        let (src_next, tgt_next) = (next(e.0, e.1), next(tv, tc));
        if (inc > 0 && tgt_next > src_next) || (inc < 0 && tgt_next < src_next) {
            e.0 = tv;
            e.1 = tc;
            ahead[i] = true;
        }
    }
    let mut names: Vec<&str> = Vec::new();
    let mut values: Vec<i64> = Vec::new();
    let mut called: Vec<bool> = Vec::new();
    for ((name, (v, c, _)), _) in planned.iter().zip(&ahead).filter(|(_, a)| !**a) {
        names.push(name);
        values.push(*v);
        called.push(*c);
    }
    if !names.is_empty() {
        use tokio_postgres::types::Type;
        target
            .query_typed(
                "SELECT setval(x.s::regclass, x.v, x.c) FROM unnest($1::text[], $2::int8[], $3::bool[]) AS x(s, v, c)",
                &[
                    (&names, Type::TEXT_ARRAY),
                    (&values, Type::INT8_ARRAY),
                    (&called, Type::BOOL_ARRAY),
                ],
            )
            .await?;
    }
    for ((t, (v, c, sources)), &target_ahead) in planned.iter().zip(&ahead) {
        for &i in sources {
            out.set.push(SequenceSync {
                source: quote_qualified(&seqs[i].schema, &seqs[i].name),
                target: t.clone(),
                last_value: *v,
                is_called: *c,
                target_ahead,
            });
        }
    }
    Ok(Some(out))
}

/// The sequences phase: [`sync`] over the cutover's table map, journaled.
pub(super) async fn phase(ctx: &mut Ctx<'_>) -> Result<(), CutoverError> {
    ctx.deadline_check("sequences")?;
    ctx.tl.begin("sequences");
    let planned = match ctx.sequence_plan.take() {
        Some(p) => apply(&ctx.src, &ctx.tgt, p)
            .await
            .sql_context("syncing sequences")?,
        None => None,
    };
    let synced = match planned {
        Some(done) => done,
        // No plan, or the source's sequences changed since it was made.
        None => sync(&ctx.src, &ctx.tgt, &ctx.table_map)
            .await
            .sql_context("syncing sequences")?,
    };
    ctx.report.sequences = synced.set;
    ctx.report.sequences_skipped = synced.skipped;
    let note = format!("{} set", ctx.report.sequences.len());
    ctx.note(Step::Sequences, note.clone());
    ctx.tl.end(&mut ctx.report, note);
    Ok(())
}
