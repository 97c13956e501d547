//! Federation end-to-end suite on the mosquitto broker started by the test on 127.0.0.1 (random port): real aggregator, real agents
//! (synthetic gradient source), real MQTT.

mod federation_support;

use federation_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mosquitto_three_agents_agree_after_every_commit() {
    three_agents_agree_after_every_commit(&Broker::mosquitto()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mosquitto_killed_agent_does_not_stall_the_round() {
    killed_agent_does_not_stall_the_round(&Broker::mosquitto()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mosquitto_late_joiner_catches_up() {
    late_joiner_catches_up(&Broker::mosquitto()).await;
}

// Known gap: against mosquitto the restarted aggregator stops before reporting its resume
// (passes on the embedded broker); under investigation.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mosquitto_aggregator_restart_resumes() {
    aggregator_restart_resumes(&Broker::mosquitto()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mosquitto_duplicate_counted_once_and_stale_ignored() {
    duplicate_counted_once_and_stale_ignored(&Broker::mosquitto()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mosquitto_many_retained_statuses_are_all_seen() {
    many_retained_statuses_are_all_seen(&Broker::mosquitto()).await;
}
