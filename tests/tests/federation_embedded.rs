//! Federation end-to-end suite on the embedded rumqttd broker: real aggregator, real agents
//! (synthetic gradient source), real MQTT.

mod federation_support;

use federation_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_three_agents_agree_after_every_commit() {
    three_agents_agree_after_every_commit(&Broker::embedded()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_killed_agent_does_not_stall_the_round() {
    killed_agent_does_not_stall_the_round(&Broker::embedded()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_late_joiner_catches_up() {
    late_joiner_catches_up(&Broker::embedded()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_aggregator_restart_resumes() {
    aggregator_restart_resumes(&Broker::embedded()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_duplicate_counted_once_and_stale_ignored() {
    duplicate_counted_once_and_stale_ignored(&Broker::embedded()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_many_retained_statuses_are_all_seen() {
    many_retained_statuses_are_all_seen(&Broker::embedded()).await;
}
