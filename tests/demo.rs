//! The demo's path end to end (smaller and shorter): clone during writes, migration of the copy,
//! capture with a restart, replay through the mapping, cutover while the writer runs. Directly
//! (`pooler: false`): the fence refuses the writer and the copy is verified equal to the live
//! database through the mapping. Through PgBouncer: the writer never sees an error, its
//! transactions land on the live site before the switch and on the copy after it.

use walshift::demo::{self, DemoOptions, DemoReport};

async fn run_demo(opts: DemoOptions) -> (DemoReport, String) {
    let lines = std::sync::Mutex::new(Vec::<String>::new());
    let report = demo::run(opts, |l| lines.lock().unwrap().push(l.to_owned()))
        .await
        .unwrap_or_else(|e| panic!("demo failed: {e}\n{}", lines.lock().unwrap().join("\n")));
    (report, lines.into_inner().unwrap().join("\n"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_path_runs_end_to_end() {
    let (report, text) = run_demo(DemoOptions {
        seconds: 4,
        tps: 60,
        pooler: false,
    })
    .await;
    assert!(!report.pooler, "{text}");
    assert!(report.writer.transactions > 50, "{report:?}");
    assert!(report.replayed_changes > 0, "{report:?}");
    assert_eq!(
        report.cutover.outcome,
        walshift::cutover::Outcome::Switched,
        "{report:?}"
    );
    assert!(
        report.writer.refused.is_some(),
        "the fence must have refused the writer: {report:?}"
    );
    assert_eq!(report.verified_tables, 4, "{text}");
    assert_eq!(text.matches("checksums equal").count(), 4, "{text}");
    assert!(text.contains("window (fence → traffic moved)"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_through_pgbouncer_never_fails_the_writer_and_its_last_order_is_on_the_copy() {
    assert!(
        walshift::localpg::PgBouncer::available(),
        "this test needs PgBouncer (Debian package pgbouncer, installed by .ci/run)"
    );
    let (report, text) = run_demo(DemoOptions {
        seconds: 4,
        tps: 60,
        pooler: true,
    })
    .await;
    assert!(report.pooler, "{text}");
    assert_eq!(
        report.cutover.outcome,
        walshift::cutover::Outcome::Switched,
        "{text}"
    );
    let w = &report.writer;
    assert_eq!(w.refused, None, "{text}");
    assert_eq!(w.on_live + w.on_copy, w.transactions, "{report:?}");
    assert!(w.on_live > 0, "{report:?}");
    assert!(
        w.on_copy > 0,
        "nothing ran on the copy after RESUME: {report:?}"
    );
    assert_eq!(
        w.last_order_side,
        Some(demo::shop::Side::Copy),
        "{report:?}"
    );
    assert!(
        w.first_copy_order_id > w.max_live_order_id,
        "the copy handed out an id the live site had: {report:?}"
    );
    let p = report
        .cutover
        .pooler
        .as_ref()
        .expect("the report's pooler part");
    assert!(p.resumed, "{text}");
    assert!(p.paused_secs.is_some(), "{text}");
    assert_eq!(report.cutover.verify_mode, "checksum", "{text}");
    assert_eq!(report.verified_tables, 4, "{text}");
    assert!(report.cutover.verified.iter().all(|t| t.equal), "{text}");
    assert!(
        text.contains("repointed to") && text.contains("and resumed"),
        "{text}"
    );
    assert!(text.contains("the writer never saw an error"), "{text}");
    assert!(text.contains("is on the copy"), "{text}");
}
