//! Bridged brokers: simulated clients on a site Mosquitto bridged to the central Mosquitto of
//! the aggregator, the bridge cut in the middle of a round. Nothing sent is lost, nothing is
//! committed twice, every client replica reproduces every commit hash, and once the bridge is
//! drained both brokers hold the same retained state.

use std::path::Path;

use fwdllm_bench::bridge;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bridge_restart_mid_round_loses_and_doubles_nothing() {
    let bin = Path::new("/usr/sbin/mosquitto");
    assert!(
        bin.exists(),
        "/usr/sbin/mosquitto is missing: apt-get install mosquitto (scripts/setup.sh does)"
    );
    let o = bridge::bridged_run(bin, 6, 4).await.expect("bridged run");
    assert_eq!(o.commits, 4);
    assert_eq!(o.versions_seen, [1, 2, 3, 4], "{o:?}");
    assert_eq!(o.replica_commits_applied, 6 * 4, "{o:?}");
    assert_eq!(o.lost, 0, "{o:?}");
    assert_eq!(o.doubled, 0, "{o:?}");
    assert_eq!(o.hash_mismatches, 0, "{o:?}");
    assert!(o.retained_differences.is_empty(), "{o:?}");
    // Six statuses, the aggregator's, the commit, the log since the checkpoint, the
    // checkpoint and the metrics: the comparison is not of two empty sets.
    assert!(o.retained_topics >= 10, "{o:?}");
    assert!(
        o.bridge_connections >= 2,
        "the bridge reconnected after the cut: {o:?}"
    );
}

#[test]
fn the_shipped_bridge_config_carries_the_tested_topics() {
    let shipped = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/mosquitto-fwdllm-bridge.conf"),
    )
    .unwrap();
    let topics = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| l.starts_with("topic "))
            .map(str::to_owned)
            .collect()
    };
    let tested = topics(&bridge::bridge_conf("127.0.0.1:1", 1));
    assert_eq!(topics(&shipped), tested);
    for key in ["cleansession false", "try_private true", "connection "] {
        assert!(shipped.contains(key), "{key}");
    }
}
