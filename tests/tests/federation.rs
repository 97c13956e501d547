//! Federation end-to-end on both brokers: real aggregator, real agents (synthetic gradient
//! source), real MQTT. One body per scenario, instantiated per broker: `embedded::…` (the
//! embedded rumqttd) and `mosquitto::…` (Debian's mosquitto, started by the test on 127.0.0.1,
//! random port). Scenarios in `fwdllm_tests::federation_suite`.

macro_rules! federation_suite {
    ($broker:ident) => {
        mod $broker {
            use fwdllm_tests::broker::Broker;
            use fwdllm_tests::federation_suite as scenario;

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn three_agents_agree_after_every_commit() {
                scenario::three_agents_agree_after_every_commit(&Broker::$broker()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn killed_agent_does_not_stall_the_round() {
                scenario::killed_agent_does_not_stall_the_round(&Broker::$broker()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn late_joiner_catches_up() {
                scenario::late_joiner_catches_up(&Broker::$broker()).await;
            }

            // On mosquitto the restarted aggregator was seen once (2026-12-04) to stop before
            // reporting its resume, cause not found; 58 runs in a row passed on 2026-12-05,
            // 50 of them two at a time on the 2 cores.
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn aggregator_restart_resumes() {
                scenario::aggregator_restart_resumes(&Broker::$broker()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn duplicate_counted_once_and_stale_ignored() {
                scenario::duplicate_counted_once_and_stale_ignored(&Broker::$broker()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn many_retained_statuses_are_all_seen() {
                scenario::many_retained_statuses_are_all_seen(&Broker::$broker()).await;
            }
        }
    };
}

federation_suite!(embedded);
federation_suite!(mosquitto);
