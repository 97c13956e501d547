//! The broker's own ceiling: Mosquitto's QoS-1 fan-in from as many bare publisher connections
//! as the headline run has clients to one bare subscriber that only counts (no decode, no
//! aggregator, no fsync), measured on the same broker in the same run.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value};
use tokio::runtime::Runtime;

use super::cpu::{cpu_json, sample_cpu};
use super::BenchBroker;
use crate::fleet;
use fwdllm_aggregator::connection::no_delay;

/// Mosquitto's QoS-1 fan-in: `publishers` connections publish `messages` update-sized
/// payloads in all, as fast as they can, to one bare subscriber that only counts them.
pub(super) fn broker_ceiling(
    sim: &Runtime,
    broker: &BenchBroker,
    publishers: usize,
    messages: usize,
    payload_len: usize,
) -> anyhow::Result<Value> {
    let port = broker.port();
    let per = messages.div_ceil(publishers).max(1);
    let total = per * publishers;
    let broker_pid = broker.pid();
    sim.block_on(async move {
        let topic = |i: usize| format!("fwdllm/v1/ceiling/update/p{i:05}");
        // The bare subscriber: QoS 1, acknowledges each message, decodes nothing.
        let mut o = MqttOptions::new("ceiling-sub", "127.0.0.1", port);
        o.set_clean_session(true);
        o.set_keep_alive(Duration::from_secs(60));
        let (sub, mut sub_el) = AsyncClient::new(o, 16);
        no_delay(&mut sub_el);
        sub.subscribe("fwdllm/v1/ceiling/update/+", QoS::AtLeastOnce)
            .await?;
        loop {
            match sub_el.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => break,
                Ok(_) => {}
                Err(e) => bail!("ceiling subscriber: {e}"),
            }
        }
        let base = Instant::now();
        let first_pub = Arc::new(AtomicU64::new(u64::MAX));
        let connected = Arc::new(AtomicU64::new(0));
        let (go_tx, go_rx) = tokio::sync::watch::channel(false);
        let gate = Arc::new(tokio::sync::Semaphore::new(fleet::CONNECT_BURST));
        let payload = vec![0x5au8; payload_len];
        let mut tasks = Vec::new();
        for i in 0..publishers {
            let (first_pub, connected, mut go, gate) = (
                first_pub.clone(),
                connected.clone(),
                go_rx.clone(),
                gate.clone(),
            );
            let (topic, payload) = (topic(i), payload.clone());
            tasks.push(tokio::spawn(async move {
                let mut o = MqttOptions::new(format!("ceiling-p{i:05}"), "127.0.0.1", port);
                o.set_clean_session(true);
                o.set_keep_alive(Duration::from_secs(60));
                let (c, mut el) = AsyncClient::new(o, per.max(16));
                no_delay(&mut el);
                let permit = gate.acquire_owned().await.expect("gate");
                loop {
                    match el.poll().await {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => break,
                        Ok(_) => {}
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
                drop(permit);
                connected.fetch_add(1, Ordering::Relaxed);
                while !*go.borrow_and_update() {
                    if go.changed().await.is_err() {
                        return;
                    }
                }
                first_pub.fetch_min(base.elapsed().as_nanos() as u64, Ordering::Relaxed);
                for _ in 0..per {
                    if c.try_publish(&topic, QoS::AtLeastOnce, false, payload.clone())
                        .is_err()
                    {
                        break;
                    }
                }
                let mut acked = 0;
                while acked < per {
                    match el.poll().await {
                        Ok(Event::Incoming(Packet::PubAck(_))) => acked += 1,
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
                let _ = c.disconnect().await;
                let _ = tokio::time::timeout(Duration::from_secs(2), el.poll()).await;
            }));
        }
        // Every publisher connected: go. The subscriber keeps its connection alive meanwhile.
        while (connected.load(Ordering::Relaxed) as usize) < publishers {
            tokio::select! {
                ev = sub_el.poll() => { ev?; }
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
        let cpu0 = sample_cpu(broker_pid);
        go_tx.send_replace(true);
        let mut got = 0usize;
        let mut last = base;
        let deadline = Instant::now() + Duration::from_secs(300);
        while got < total && Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_secs(30), sub_el.poll()).await {
                Ok(Ok(Event::Incoming(Packet::Publish(_)))) => {
                    got += 1;
                    last = Instant::now();
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => bail!("ceiling subscriber: {e}"),
                Err(_) => break,
            }
        }
        let cpu1 = sample_cpu(broker_pid);
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
        let _ = sub.disconnect().await;
        let first = base + Duration::from_nanos(first_pub.load(Ordering::Relaxed));
        let wall = last.saturating_duration_since(first).as_secs_f64();
        let mut out = json!({
            "publishers": publishers,
            "messages_sent": total,
            "messages_received": got,
            "payload_bytes": payload_len,
        });
        if got == total && wall > 0.0 {
            out["msgs_per_s"] = json!(got as f64 / wall);
            out["window_s"] = json!(wall);
            out["cpu"] = cpu_json(&cpu0, &cpu1, wall);
        } else {
            out["absent_reason"] = json!(format!("received {got} of {total} messages"));
        }
        Ok(out)
    })
}

/// The size of one update of `perturbations` pairs from a client of the fleet's names.
pub(super) fn update_len(perturbations: u32) -> usize {
    use fwdllm_shared::wire::{self, ClientUpdate, SeedScalar};
    wire::encode(&ClientUpdate {
        client_id: "s1000-00000".into(),
        round: 1,
        base_version: 0,
        seq: 0,
        pairs: (0..perturbations)
            .map(|k| SeedScalar {
                seed: u64::MAX - u64::from(k),
                g: 0.5,
            })
            .collect(),
        samples: perturbations,
        loss_mean: 1.0,
        loss_m2: 0.0,
    })
    .len()
}
