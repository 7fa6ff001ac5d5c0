//! The demo's path end to end (smaller and shorter): clone during writes, migration of the copy,
//! capture with a restart, replay through the mapping, cutover while the writer runs, and the
//! copy verified equal to the live database through the mapping.

use walshift::demo::{self, DemoOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_path_runs_end_to_end() {
    let lines = std::sync::Mutex::new(Vec::<String>::new());
    let report = demo::run(
        DemoOptions {
            seconds: 4,
            tps: 60,
        },
        |l| lines.lock().unwrap().push(l.to_owned()),
    )
    .await
    .unwrap_or_else(|e| panic!("demo failed: {e}\n{}", lines.lock().unwrap().join("\n")));
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
    let text = lines.into_inner().unwrap().join("\n");
    assert_eq!(report.verified_tables, 4, "{text}");
    assert_eq!(text.matches("checksums equal").count(), 4, "{text}");
    assert!(text.contains("window (fence → switch done)"), "{text}");
}
