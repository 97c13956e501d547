//! A hand-driven MQTT client for the suites: it subscribes, waits for the SUBACKs, and hands
//! every publish it receives to the test in arrival order.

use std::net::SocketAddr;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::broker::MAX_PACKET;
use crate::WAIT;

/// One publish the client received.
pub struct Received {
    pub topic: String,
    pub payload: Vec<u8>,
}

/// What the client's network task does when the connection fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// Panic, ending the task: the test's next wait fails (for peers that must never lose the
    /// broker).
    Fail,
    /// Poll again after a short pause (rumqttc reconnects on the next poll).
    Retry,
}

pub struct TestClient {
    pub client: AsyncClient,
    pub rx: mpsc::UnboundedReceiver<Received>,
    task: JoinHandle<()>,
}

impl TestClient {
    /// Connects as `id`, subscribes to `filters` at QoS 1 and waits for their SUBACKs.
    pub async fn connect(
        addr: SocketAddr,
        id: &str,
        keep_alive: Duration,
        on_error: OnError,
        filters: &[String],
    ) -> TestClient {
        let mut opts = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        opts.set_max_packet_size(MAX_PACKET, MAX_PACKET);
        opts.set_keep_alive(keep_alive);
        let (client, mut el) = AsyncClient::new(opts, 64);
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = tx.send(Received {
                            topic: p.topic,
                            payload: p.payload.to_vec(),
                        });
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = ready_tx.send(());
                    }
                    Ok(_) => {}
                    Err(e) if on_error == OnError::Fail => {
                        panic!("test peer lost the broker: {e}")
                    }
                    // A pause between reconnect attempts, not synchronisation.
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        for f in filters {
            client.subscribe(f.clone(), QoS::AtLeastOnce).await.unwrap();
        }
        for _ in filters {
            tokio::time::timeout(WAIT, ready_rx.recv())
                .await
                .expect("SUBACK")
                .expect("peer running");
        }
        TestClient { client, rx, task }
    }

    /// Next message accepted by `f` (others are skipped), or panics after [`WAIT`].
    pub async fn next<T>(&mut self, what: &str, mut f: impl FnMut(&Received) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let m = tokio::time::timeout_at(deadline, self.rx.recv())
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
                .expect("peer running");
            if let Some(v) = f(&m) {
                return v;
            }
        }
    }
}

impl Drop for TestClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}
