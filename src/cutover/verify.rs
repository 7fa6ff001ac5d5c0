//! Verification at cutover: after the drain, with the source fenced, the target must hold what
//! the source holds. `counts` compares row counts per published table; `checksum` also
//! compares an order-independent checksum per table.
//!
//! [`verify_tables`] is the one entry point the orchestrator calls; the comparing is
//! [`crate::verify`]'s, so there is one checksum. With a migration mapping it hands over to
//! [`crate::verify::verify`], which compares every target table with the source *through* the
//! mapping (expressions, filters, split tables; counts only unless `checksum`). Without one
//! (identity), the lighter comparison: each source table against the target table the
//! [`TableMap`] names, column by column of the same names, with
//! [`crate::verify::table_summary`] on both sides at once; a table the map splits or drops is
//! reported as not comparable.
//!
//! `counts` is a plain `count(*)` per table (most of the window goes here). The checksum is
//! verify's: the sum of the first 64 bits of the md5 of each row's text over the source's
//! columns in their order — the same on any PostgreSQL version, so a cutover between major
//! versions compares too — computed on both sides in sessions with the same `TimeZone`,
//! `DateStyle`, `IntervalStyle` and `extra_float_digits` ([`SESSION_SETTINGS`]), so equal rows
//! give equal text.

use tokio_postgres::Client;

use super::journal::Step;
use super::report::TableCheck;
use super::sequences::TableMap;
use super::{Ctx, CutoverError};
use crate::sql::quote_qualified;
use crate::transform::{Mapping, TableName};
use crate::{SqlContext, SqlError};

/// What `--verify` compares.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VerifyMode {
    /// Nothing.
    None,
    /// Row count per published table (default: cheap, catches lost or doubled rows).
    #[default]
    Counts,
    /// Row count and an order-independent checksum of every row (reads every row on both sides).
    Checksum,
}

impl VerifyMode {
    pub fn as_str(self) -> &'static str {
        match self {
            VerifyMode::None => "none",
            VerifyMode::Counts => "counts",
            VerifyMode::Checksum => "checksum",
        }
    }
}

impl std::str::FromStr for VerifyMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(VerifyMode::None),
            "counts" => Ok(VerifyMode::Counts),
            "checksum" => Ok(VerifyMode::Checksum),
            _ => Err(format!(
                "unknown verify mode {s:?}: use none, counts or checksum"
            )),
        }
    }
}

/// Session settings that make row text identical on both sides.
pub const SESSION_SETTINGS: &str = "SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; \
     SET IntervalStyle = 'postgres'; SET extra_float_digits = 3";

/// The source's published tables and their columns (in attribute order).
pub async fn published_tables(
    source: &Client,
    publication: &str,
) -> Result<Vec<(String, String, Vec<String>)>, tokio_postgres::Error> {
    let rows = source
        .query(
            "SELECT p.schemaname::text, p.tablename::text, \
                    array_agg(a.attname::text ORDER BY a.attnum) \
             FROM pg_publication_tables p \
             JOIN pg_namespace n ON n.nspname = p.schemaname \
             JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = p.tablename \
             JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
             WHERE p.pubname = $1 GROUP BY 1, 2 ORDER BY 1, 2",
            &[&publication],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}

/// Verification failures (a difference is not one: it is in the checks).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckError {
    #[error(transparent)]
    Sql(#[from] SqlError),
    #[error("verifying the target through the mapping: {0}")]
    Mapped(#[from] crate::verify::VerifyError),
}

/// Compares every published table of the source with its target table(s): through `mapping`
/// when there is one (its expressions evaluated on the source read-only, volatile functions
/// refused: [`crate::verify::refuse_volatile`]), else through `map`. Both sessions must have
/// run [`SESSION_SETTINGS`] and be outside a transaction. Returns one check per target table; the caller decides what
/// a difference means.
pub async fn verify_tables(
    source: &Client,
    target: &Client,
    tables: &[(String, String, Vec<String>)],
    map: &TableMap,
    mapping: Option<&Mapping>,
    mode: VerifyMode,
) -> Result<Vec<TableCheck>, CheckError> {
    let mut out = Vec::new();
    if mode == VerifyMode::None {
        return Ok(out);
    }
    if let Some(mapping) = mapping {
        let names: Vec<TableName> = tables
            .iter()
            .map(|(s, t, _)| TableName::new(s.clone(), t.clone()))
            .collect();
        let opts = crate::verify::VerifyOptions {
            max_keys: 0,
            checksums: mode == VerifyMode::Checksum,
            // The caller's session-level statement_timeout (what is left of the window) applies.
            source_statement_timeout: None,
            ..Default::default()
        };
        let report = crate::verify::verify(source, target, mapping, &names, &opts).await?;
        return Ok(report
            .tables
            .into_iter()
            .map(|t| TableCheck {
                source: t.source.quoted(),
                target: t.target.quoted(),
                source_rows: t.source_rows,
                target_rows: t.target_rows,
                source_checksum: (!t.source_checksum.is_empty()).then_some(t.source_checksum),
                target_checksum: (!t.target_checksum.is_empty()).then_some(t.target_checksum),
                equal: t.equal,
            })
            .collect());
    }
    let checksum = mode == VerifyMode::Checksum;
    for (schema, table, columns) in tables {
        let targets = map.map(schema, table);
        let [(ts, tt)] = targets.as_slice() else {
            out.push(TableCheck {
                source: quote_qualified(schema, table),
                target: format!(
                    "{} target tables (not comparable table by table)",
                    targets.len()
                ),
                source_rows: -1,
                target_rows: -1,
                source_checksum: None,
                target_checksum: None,
                equal: false,
            });
            continue;
        };
        let (sn, tn) = (
            TableName::new(schema.clone(), table.clone()),
            TableName::new(ts.clone(), tt.clone()),
        );
        let (s, t) = tokio::join!(
            crate::verify::table_summary(source, &sn, columns, checksum),
            crate::verify::table_summary(target, &tn, columns, checksum),
        );
        let (s, t) = (
            s.sql_context("verifying the target")?,
            t.sql_context("verifying the target")?,
        );
        out.push(TableCheck {
            source: quote_qualified(schema, table),
            target: quote_qualified(ts, tt),
            source_rows: s.0,
            target_rows: t.0,
            equal: s == t,
            source_checksum: s.1,
            target_checksum: t.1,
        });
    }
    Ok(out)
}

/// The verify phase, inside the window: [`verify_tables`] as `config.verify` asks, every
/// statement on the source limited to what is left of `max_window`. A difference aborts (a
/// dry run only warns: the source keeps writing).
pub(super) async fn phase(ctx: &mut Ctx<'_>) -> Result<(), CutoverError> {
    let config = ctx.config;
    ctx.deadline_check("verify")?;
    ctx.tl.begin("verify");
    if config.verify != VerifyMode::None {
        let tables = published_tables(&ctx.src, &config.publication)
            .await
            .sql_context("listing the published tables")?;
        let remaining = ctx.remaining();
        // The server stops with the window too: a query left running would hold this session
        // (and the unfence behind it).
        ctx.src
            .batch_execute(&format!(
                "SET statement_timeout = {}",
                remaining.as_millis().max(1)
            ))
            .await
            .sql_context("limiting verify's statements on the source to the window")?;
        let checks = match tokio::time::timeout(
            remaining,
            verify_tables(
                &ctx.src,
                &ctx.tgt,
                &tables,
                &ctx.table_map,
                config.transform.as_deref(),
                config.verify,
            ),
        )
        .await
        {
            Ok(r) => {
                let checks = r?;
                ctx.src
                    .batch_execute("SET statement_timeout = 0")
                    .await
                    .sql_context("resetting statement_timeout on the source")?;
                checks
            }
            Err(_) => {
                return Err(CutoverError::MaxWindow {
                    phase: "verify".into(),
                    max: config.max_window,
                    elapsed: ctx.window_start.map(|s| s.elapsed()).unwrap_or_default(),
                });
            }
        };
        let differing: Vec<String> = checks
            .iter()
            .filter(|c| !c.equal)
            .map(|c| {
                format!(
                    "{} → {}: {} vs {} rows",
                    c.source, c.target, c.source_rows, c.target_rows
                )
            })
            .collect();
        ctx.report.verified = checks;
        if !differing.is_empty() {
            if config.dry_run {
                ctx.report.warnings.push(format!(
                    "dry run: {} table(s) differ (expected while the source keeps writing): {}",
                    differing.len(),
                    differing.join("; ")
                ));
            } else {
                ctx.tl.end(&mut ctx.report, "differences found");
                return Err(CutoverError::VerifyFailed { tables: differing });
            }
        }
        let n = ctx.report.verified.len();
        ctx.record(Step::Verified, format!("{n} tables"))?;
        ctx.tl.end(&mut ctx.report, format!("{n} tables"));
    } else {
        ctx.tl.end(&mut ctx.report, "skipped (--verify none)");
    }
    Ok(())
}
