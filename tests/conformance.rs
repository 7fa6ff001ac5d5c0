//! Conformance suite: workloads nobody on this project wrote (PostgreSQL's subscription tests,
//! pgcopydb's CDC tests over Pagila) and walshift's own extra cases, each run through capture →
//! clone → replay at every sync point with one and with two apply connections, every table
//! compared with the source independently of walshift's verify. Workloads and their markers:
//! `tests/conformance/README.md`; the harness: `tests/common/conformance.rs`.

mod common;
#[path = "common/conformance.rs"]
mod conformance;

use conformance::{Dest, RunOptions, Step, assert_conforms, parse_segments, run_workload};

macro_rules! workloads {
    ($($test:ident => $folder:literal,)*) => {
        $(
            #[test]
            fn $test() {
                assert_conforms($folder);
            }
        )*
        const FOLDERS: &[&str] = &[$($folder),*];
    };
}

workloads! {
    h1_pg_subscription_types => "H1-pg-subscription-types",
    h2_pg_subscription_partitions_truncate => "H2-pg-subscription-partitions-truncate",
    h3_pagila_cdc => "H3-pagila-cdc",
    h4_pg_subscription_rep_changes => "H4-pg-subscription-rep-changes",
    x01_types_and_names => "X01-types-and-names",
    x02_include_key => "X02-include-key",
    x03_identity_columns => "X03-identity-columns",
    x04_replica_identity_index => "X04-replica-identity-index",
    x05_no_columns => "X05-no-columns",
    x06_full_identity_json_point => "X06-full-identity-json-point",
    x07_truncate_cascade_restart_identity => "X07-truncate-cascade-restart-identity",
    x08_key_swaps => "X08-key-swaps",
    x09_unlogged_table => "X09-unlogged-table",
    x10_large_objects => "X10-large-objects",
    x11_tables_added_mid_stream => "X11-tables-added-mid-stream",
    x12_deferrable_primary_key => "X12-deferrable-primary-key",
    x13_triggers_fks_new_enum_value => "X13-triggers-fks-new-enum-value",
    x14_large_transaction => "X14-large-transaction",
}

#[test]
fn every_workload_folder_has_a_test() {
    let mut found: Vec<String> = std::fs::read_dir(conformance::workloads_dir())
        .unwrap()
        .filter_map(|e| {
            let e = e.unwrap();
            let name = e.file_name().into_string().unwrap();
            (e.path().is_dir() && name != "pagila").then_some(name)
        })
        .collect();
    found.sort();
    let mut listed: Vec<String> = FOLDERS.iter().map(|s| s.to_string()).collect();
    listed.sort();
    assert_eq!(found, listed);
}

/// The harness itself: a copy that differs by one row value, by a missing row, or by a table
/// is reported naming the sync point, the table and both counts.
#[test]
fn harness_detects_a_corrupted_copy() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("00-schema.sql"),
        "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'a'), (2, 'b');\n\
         CREATE TABLE u (id int PRIMARY KEY);\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("10-workload.sql"),
        "UPDATE t SET v = 'c' WHERE id = 2;\n-- @sync first\nINSERT INTO t VALUES (3, 'd');\n",
    )
    .unwrap();
    let opts = RunOptions {
        apply_connections: vec![1],
        corrupt_at: Some((
            "first".into(),
            "UPDATE t SET v = 'x' WHERE id = 1; DROP TABLE u; CREATE TABLE only_here (a int);"
                .into(),
        )),
    };
    let out = run_workload(dir.path(), &opts);
    let all = out.problems.join("\n");
    assert!(
        all.contains("sync \"first\"")
            && all.contains("table \"public\".\"t\": source 2 rows")
            && all.contains("copy 2 rows"),
        "a changed value is a difference naming the sync point, table and counts:\n{all}"
    );
    assert!(
        all.contains("table \"public\".\"u\" exists on the source only"),
        "{all}"
    );
    assert!(
        all.contains("table \"public\".\"only_here\" exists on the copy only"),
        "{all}"
    );
    assert!(
        all.contains("sync \"end\"") && all.contains("source 3 rows"),
        "the corruption persists to the end and is found there too:\n{all}"
    );
    assert_eq!(
        out.syncs.iter().map(|(_, ok)| *ok).collect::<Vec<_>>(),
        [true, false, false],
        "after the clone equal, then different: {:?}",
        out.syncs
    );

    // The same workload without the corruption conforms: the difference came from it.
    let clean = run_workload(
        dir.path(),
        &RunOptions {
            apply_connections: vec![1],
            corrupt_at: None,
        },
    );
    assert!(clean.problems.is_empty(), "{:?}", clean.problems);
}

#[test]
fn markers_split_segments_as_the_readme_says() {
    let steps = parse_segments(
        "-- header only\n-- @prelude\nSET search_path = s;\n-- @src a\nINSERT 1;\n-- @sync one\n\
         INSERT 2;\n-- @both two\nALTER 3;\n-- @src\nINSERT 4;\n-- @target three\nINSERT 5;\n\
         -- @restart-source\n-- @sync four\n",
    )
    .unwrap();
    let run = |dest, body: &str| Step::Run {
        dest,
        sql: format!("SET search_path = s;\n\n{body}\n"),
    };
    let sync = |l: &str| Step::Sync { label: l.into() };
    assert_eq!(
        steps,
        vec![
            run(Dest::Source, "INSERT 1;"),
            sync("one"),
            run(Dest::Source, "INSERT 2;"),
            sync("two"),
            run(Dest::Both, "ALTER 3;"),
            run(Dest::Source, "INSERT 4;"),
            sync("three"),
            run(Dest::Targets, "INSERT 5;"),
            Step::RestartSource,
            sync("four"),
        ]
    );
    assert!(parse_segments("-- @bogus\n").is_err());
}

#[test]
fn plans_read_expected_stops_their_fix_and_restart_arguments() {
    let phases = conformance::parse_plan(
        std::path::Path::new("."),
        "-- @phase\n-- @stop-at truncate of partitions\n-- @expect-stop s.p1\n\
         -- @expect-stop --accept-partition-rewrite\n-- @restart-arg --accept-partition-rewrite\n\
         -- @restart-arg s.p1\n-- @stop-fix\nTRUNCATE s.p1;\n-- @expect-warning w\n",
    )
    .unwrap();
    let p = &phases[0];
    assert_eq!(p.stop_at.as_deref(), Some("truncate of partitions"));
    assert_eq!(p.expect_stop, ["s.p1", "--accept-partition-rewrite"]);
    assert_eq!(p.restart_args, ["--accept-partition-rewrite", "s.p1"]);
    assert_eq!(p.stop_fix, "TRUNCATE s.p1;\n");
    assert_eq!(p.expect_warning, ["w"]);
    assert!(p.fix.is_empty());
}

/// Runs the workload folder named by `WALSHIFT_CONFORMANCE_DIR` (to try a workload by hand):
/// `WALSHIFT_CONFORMANCE_DIR=/path cargo test --test conformance -- --ignored --nocapture`.
#[test]
#[ignore]
fn workload_from_env() {
    let dir = std::env::var("WALSHIFT_CONFORMANCE_DIR").expect("WALSHIFT_CONFORMANCE_DIR");
    let out = run_workload(std::path::Path::new(&dir), &RunOptions::default());
    assert!(out.problems.is_empty(), "{}", out.problems.join("\n"));
}
