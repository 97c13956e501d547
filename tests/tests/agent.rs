//! Agent daemon end-to-end on both brokers: status and last will, replay, checkpoint catch-up,
//! a restart on a stale replica, de-duplication, device limits. One body per scenario, instantiated per broker:
//! `embedded::…` (the embedded rumqttd) and `mosquitto::…` (Debian's mosquitto, started by the
//! test on 127.0.0.1). Scenarios in `fwdllm_tests::agent_suite`.

macro_rules! agent_suite {
    ($broker:ident) => {
        mod $broker {
            use fwdllm_tests::agent_suite as scenario;
            use fwdllm_tests::broker::Broker;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn status_online_last_will_reconnect_and_graceful_offline() {
                scenario::status_lifecycle(&Broker::$broker()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn replays_commit_log_and_answers_with_decodable_update() {
                scenario::replay_and_answer(&Broker::$broker()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn late_joiner_and_diverged_replica_catch_up_by_checkpoint() {
                scenario::checkpoint_catch_up(&Broker::$broker()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn each_round_extend_is_answered_once_across_restarts() {
                scenario::duplicate_announce_answered_once(&Broker::$broker()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn stale_replica_catches_up_from_the_log_with_its_session_kept() {
                scenario::stale_replica_restart(&Broker::$broker(), scenario::Session::Kept).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn stale_replica_catches_up_from_the_log_with_its_session_wiped() {
                scenario::stale_replica_restart(&Broker::$broker(), scenario::Session::Wiped).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn busy_device_sits_the_round_out() {
                scenario::busy_sits_out(&Broker::$broker()).await;
            }
        }
    };
}

agent_suite!(embedded);
agent_suite!(mosquitto);
