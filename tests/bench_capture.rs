//! `walshift bench capture` on a small workload: both tools drain their slots over each
//! transport, and walshift's receive figures (reads, bytes per read, fsyncs) are reported.

mod common;

use std::path::Path;

use walshift::bench::capture::{CaptureBench, Transport};
use walshift::bench::workload::Workload;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_transports_measure_both_tools_with_walshift_receive_figures() {
    let bench = CaptureBench {
        workload: Workload {
            initial_rows: 500,
            changes: 3_000,
            txn_size: 10,
            seed: 0.42,
        },
        runs: 1,
        transports: Transport::parse_list("both").expect("valid"),
    };
    let report = bench
        .run(Path::new(common::cli::EXE), |l| eprintln!("{l}"))
        .await
        .expect("bench ran");
    assert_eq!(report.transports.len(), 2);
    for transport in [Transport::Unix, Transport::Tcp] {
        let runs: Vec<_> = report
            .timings
            .iter()
            .filter(|t| t.transport == transport)
            .collect();
        assert_eq!(runs.len(), 2, "{transport}: one run per tool");
        let ours = runs
            .iter()
            .find(|t| t.tool == "walshift")
            .expect("walshift");
        let theirs = runs
            .iter()
            .find(|t| t.tool == "pg_recvlogical")
            .expect("recv");
        assert!(ours.reads_per_sec.is_some_and(|r| r > 0.0), "{ours:?}");
        assert!(ours.bytes_per_read.is_some_and(|b| b > 0.0), "{ours:?}");
        assert!(ours.fsyncs_per_sec.is_some_and(|f| f > 0.0), "{ours:?}");
        assert!(theirs.reads_per_sec.is_none());
        assert!(ours.user_seconds + ours.system_seconds > 0.0);
        assert!(ours.output_bytes > 0 && theirs.output_bytes > 0);
        let summary = report
            .transports
            .iter()
            .find(|s| s.transport == transport)
            .expect("summary");
        assert_eq!(summary.ratios.len(), 1);
        assert!(summary.ratio_median > 0.0);
    }
    let text = report.to_string();
    assert!(
        text.contains("| unix |") && text.contains("| tcp |"),
        "{text}"
    );
}
