//! `fwdllm-aggregator broker`: the embedded broker as its own process (a site without
//! mosquitto; the scale bench's embedded runs). A QoS-1 message published by one client
//! reaches another through it, a retained one reaches a later subscriber, and a non-loopback
//! address is refused with a message naming the fix.

use std::process::{Command, Stdio};
use std::time::Duration;

use fwdllm_aggregator::broker::free_port;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

/// A failure guard (never reached when things work), not a synchronisation.
const GUARD: Duration = Duration::from_secs(60);

struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Connects (retrying while the broker process starts: a refused connection is an error
/// event, and rumqttc reconnects on the next poll) and subscribes to `topic`; returns once
/// the subscription is acknowledged.
async fn subscriber(port: u16, id: &str, topic: &str) -> (AsyncClient, rumqttc::EventLoop) {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(5));
    let (c, mut el) = AsyncClient::new(o, 16);
    c.subscribe(topic, QoS::AtLeastOnce).await.unwrap();
    tokio::time::timeout(GUARD, async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => break,
                Ok(_) => {}
                // The listener may not be up yet: poll again (rumqttc reconnects).
                Err(_) => tokio::task::yield_now().await,
            }
        }
    })
    .await
    .expect("subscribed");
    (c, el)
}

async fn next_payload(el: &mut rumqttc::EventLoop) -> (Vec<u8>, bool) {
    tokio::time::timeout(GUARD, async {
        loop {
            if let Event::Incoming(Packet::Publish(p)) = el.poll().await.expect("connection") {
                return (p.payload.to_vec(), p.retain);
            }
        }
    })
    .await
    .expect("a message")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_subcommand_relays_and_retains() {
    let port = free_port("127.0.0.1").unwrap();
    let _broker = Killed(
        Command::new(env!("CARGO_BIN_EXE_fwdllm-aggregator"))
            .args(["broker", "--port", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("fwdllm-aggregator broker"),
    );
    let (_sub, mut sub_el) = subscriber(port, "sub", "fwdllm/v1/t/round").await;
    let mut o = MqttOptions::new("pub", "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(5));
    let (publ, mut pub_el) = AsyncClient::new(o, 16);
    tokio::spawn(async move { while pub_el.poll().await.is_ok() {} });
    publ.publish("fwdllm/v1/t/round", QoS::AtLeastOnce, true, b"r1".to_vec())
        .await
        .unwrap();
    assert_eq!(next_payload(&mut sub_el).await, (b"r1".to_vec(), false));
    // A later subscriber gets the retained copy.
    let (_late, mut late_el) = subscriber(port, "late", "fwdllm/v1/t/round").await;
    assert_eq!(next_payload(&mut late_el).await, (b"r1".to_vec(), true));
}

#[test]
fn a_non_loopback_address_is_refused_with_the_fix() {
    let out = Command::new(env!("CARGO_BIN_EXE_fwdllm-aggregator"))
        .args(["broker", "--host", "0.0.0.0", "--port", "1"])
        .output()
        .expect("fwdllm-aggregator broker");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("0.0.0.0") && err.contains("loopback"), "{err}");
}
