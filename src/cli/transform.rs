//! `walshift transform check`: compile a mapping against the target (and the source's table
//! shapes) without applying anything, and print the SQL replay would run.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use super::args::{Target, own_help};
use crate::conn::ConnInfo;
use crate::lsn::Lsn;
use crate::transform::{self, Mapping, SourcePlan, SourceTable, TableName};

#[derive(clap::Subcommand, Debug)]
pub enum TransformCommand {
    /// Compile the mapping against the target catalog; print the SQL per table.
    Check(CheckArgs),
}

#[derive(clap::Args, Debug)]
#[command(mut_args(own_help(&[
    ("target", "The migrated target database"),
])))]
pub struct CheckArgs {
    /// The mapping file (TOML).
    #[arg(long, value_name = "FILE")]
    transform: PathBuf,
    #[command(flatten)]
    target: Target,
    /// The source database, for the source tables' columns and keys. Without it (and without
    /// --buffer) only the target side is checked.
    #[arg(long, value_name = "CONN")]
    source: Option<String>,
    /// A capture buffer whose Relation messages give the source tables' shapes.
    #[arg(long, value_name = "DIR", conflicts_with = "source")]
    buffer: Option<PathBuf>,
    /// Print only the verdict, not the SQL.
    #[arg(long)]
    quiet: bool,
}

pub async fn run(c: TransformCommand) -> anyhow::Result<ExitCode> {
    let TransformCommand::Check(a) = c;
    let mapping = Mapping::load(&a.transform)?;
    transform::plan::check_mapping(&mapping)?;
    let target = a.target.conn()?.connect().await?;
    let sources: Vec<TableName> = {
        let mut v: Vec<TableName> = mapping
            .tables
            .iter()
            .map(|t| t.source.value.clone())
            .collect();
        v.dedup();
        v
    };
    let mut shapes: Vec<SourceTable> = Vec::new();
    if let Some(s) = &a.source {
        let source = ConnInfo::parse(s).context("--source")?.connect().await?;
        for name in &sources {
            match transform::catalog::source_table(&source, name).await? {
                Some(t) => shapes.push(t),
                None => {
                    let line = mapping
                        .tables
                        .iter()
                        .find(|t| &t.source.value == name)
                        .map_or(0, |t| t.source.line);
                    return Err(transform::TransformError::Mapping {
                        path: mapping.path.clone(),
                        line,
                        message: format!(
                            "source table {name} does not exist on the source: fix the name"
                        ),
                    }
                    .into());
                }
            }
        }
    } else if let Some(dir) = &a.buffer {
        let (rels, types) = crate::apply::replay::scan_relations(dir, Lsn::ZERO, &mapping)?;
        for rel in rels {
            let shape = transform::catalog::source_from_relation(&target, &rel, &types).await?;
            if sources.contains(&shape.name) && !shapes.iter().any(|s| s.name == shape.name) {
                shapes.push(shape);
            }
        }
    }
    let mut unchecked = Vec::new();
    for name in &sources {
        if let Some(shape) = shapes.iter().find(|s| &s.name == name) {
            let plan = transform::catalog::compile(&target, &mapping, shape).await?;
            if !a.quiet {
                print_plan(&plan);
            }
        } else {
            for entry in mapping.for_source(name) {
                if transform::catalog::target_table(&target, &entry.target.value)
                    .await?
                    .is_none()
                {
                    return Err(transform::TransformError::Mapping {
                        path: mapping.path.clone(),
                        line: entry.target.line,
                        message: format!(
                            "target table {} does not exist on the target",
                            entry.target.value
                        ),
                    }
                    .into());
                }
            }
            unchecked.push(name.to_string());
        }
    }
    if unchecked.is_empty() {
        println!(
            "{}: OK — {} source table(s) compiled and type-checked on the target",
            mapping.path,
            sources.len()
        );
    } else {
        println!(
            "{}: target tables exist; expressions of {} not type-checked: pass --source <conn> or --buffer <dir> \
             so the source tables' columns are known",
            mapping.path,
            unchecked.join(", ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn print_plan(plan: &SourcePlan) {
    use crate::transform::sql as tsql;
    for t in &plan.targets {
        println!(
            "-- {} → {} (mapping line {})",
            plan.source.name, t.target, t.line
        );
        for (i, c) in t.columns.iter().enumerate() {
            println!(
                "--   {}{} {} = {}",
                c.name,
                if t.key.contains(&i) { " (key)" } else { "" },
                c.type_sql,
                c.expr.sql
            );
        }
        if let Some(f) = &t.filter {
            println!("--   filter: {}", f.sql);
        }
        let every: Vec<usize> = (0..plan.source.columns.len()).collect();
        println!("{};", tsql::insert(plan, t));
        if t.filter.is_some() {
            println!("{};", tsql::upsert(plan, t));
        }
        println!("{};", tsql::delete(plan, t));
        if let Ok(shape) = tsql::update_shape(plan, t, &every, false) {
            println!("{};", tsql::update(plan, t, &every, &shape, false));
        }
        println!();
    }
}
