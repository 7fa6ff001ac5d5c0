//! The demo's path end to end (smaller and shorter): clone during writes, capture with a
//! restart, replay following, and the copy verified equal to the live database.

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
    assert!(
        report.replayed_changes >= report.writer.transactions,
        "{report:?}"
    );
    let text = lines.into_inner().unwrap().join("\n");
    assert_eq!(text.matches("checksums equal").count(), 3, "{text}");
}
