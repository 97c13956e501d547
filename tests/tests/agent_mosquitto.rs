//! Agent daemon end-to-end against the Debian mosquitto broker (started by the test on 127.0.0.1): status and last will,
//! replay, checkpoint catch-up, de-duplication, device limits. Scenarios in agent_support.

mod agent_support;

use agent_support::Broker;

fn broker() -> Broker {
    Broker::mosquitto()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_online_last_will_reconnect_and_graceful_offline() {
    agent_support::status_lifecycle(&broker()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_commit_log_and_answers_with_decodable_update() {
    agent_support::replay_and_answer(&broker()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_joiner_and_diverged_replica_catch_up_by_checkpoint() {
    agent_support::checkpoint_catch_up(&broker()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_round_extend_is_answered_once_across_restarts() {
    agent_support::duplicate_announce_answered_once(&broker()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_device_sits_the_round_out() {
    agent_support::busy_sits_out(&broker()).await;
}
