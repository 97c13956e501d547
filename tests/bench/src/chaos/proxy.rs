//! A TCP proxy between MQTT clients and the broker that delivers every QoS 1 update twice, as
//! a client does when a PUBACK is lost and it retransmits: each client → broker `PUBLISH` on an
//! `update/` topic goes out once as sent and once more with the DUP flag (same packet id), and
//! the broker's first PUBACK of that packet id is swallowed so the client sees exactly one. A
//! QoS 1 broker treats the copy as a new publication (MQTT 3.1.1 §4.3.2), so every subscriber —
//! the aggregator included — receives the update twice. Only MQTT 3.1.1 framing is parsed
//! (fixed header, remaining length, topic, packet id); everything else passes unchanged.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use log::debug;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// A running duplicating proxy; stops (closing its connections) when dropped.
pub struct DupProxy {
    addr: SocketAddr,
    injected: Arc<AtomicU64>,
    stop: CancellationToken,
}

impl Drop for DupProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl DupProxy {
    /// Listens on a free loopback port and forwards every connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<DupProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let injected = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let (inj, st) = (injected.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (client, _) = tokio::select! {
                    _ = st.cancelled() => return,
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                };
                let (inj, st) = (inj.clone(), st.clone());
                tokio::spawn(async move {
                    match TcpStream::connect(upstream).await {
                        Ok(broker) => {
                            tokio::select! {
                                _ = st.cancelled() => {}
                                _ = relay(client, broker, inj) => {}
                            }
                        }
                        Err(e) => debug!("proxy: connecting to {upstream}: {e}"),
                    }
                });
            }
        });
        Ok(DupProxy {
            addr,
            injected,
            stop,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Update publishes delivered a second time so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }
}

/// Packet ids whose next PUBACK the client must not see (per connection).
type Swallow = Arc<Mutex<HashMap<u16, u32>>>;

async fn relay(client: TcpStream, broker: TcpStream, injected: Arc<AtomicU64>) {
    let _ = client.set_nodelay(true);
    let _ = broker.set_nodelay(true);
    let (mut cr, mut cw) = client.into_split();
    let (mut br, mut bw) = broker.into_split();
    let swallow: Swallow = Arc::default();
    let sw = swallow.clone();
    let up = async move {
        let mut f = Framer::default();
        loop {
            while let Some(pkt) = f.next_packet() {
                if let Some(pkid) = update_publish_qos1(&pkt) {
                    *sw.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .entry(pkid)
                        .or_insert(0) += 1;
                    bw.write_all(&pkt).await?;
                    let mut dup = pkt;
                    dup[0] |= 0x08;
                    bw.write_all(&dup).await?;
                    injected.fetch_add(1, Ordering::Relaxed);
                } else {
                    bw.write_all(&pkt).await?;
                }
            }
            if !f.fill(&mut cr).await? {
                return Ok::<(), std::io::Error>(());
            }
        }
    };
    let down = async move {
        let mut f = Framer::default();
        loop {
            while let Some(pkt) = f.next_packet() {
                if let Some(pkid) = puback_id(&pkt) {
                    let mut s = swallow.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some(n) = s.get_mut(&pkid).filter(|n| **n > 0) {
                        *n -= 1;
                        if *n == 0 {
                            s.remove(&pkid);
                        }
                        continue;
                    }
                }
                cw.write_all(&pkt).await?;
            }
            if !f.fill(&mut br).await? {
                return Ok::<(), std::io::Error>(());
            }
        }
    };
    // Either side closing ends the connection (both halves are dropped).
    tokio::select! {
        r = up => if let Err(e) = r { debug!("proxy upstream: {e}") },
        r = down => if let Err(e) = r { debug!("proxy downstream: {e}") },
    }
}

/// Splits a byte stream into MQTT control packets.
#[derive(Default)]
struct Framer {
    buf: Vec<u8>,
}

impl Framer {
    /// Reads more bytes; false at end of stream.
    async fn fill(&mut self, r: &mut (impl AsyncReadExt + Unpin)) -> std::io::Result<bool> {
        let mut chunk = [0u8; 16 * 1024];
        let n = r.read(&mut chunk).await?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n > 0)
    }

    /// The next complete packet, if the buffer holds one. A malformed length passes the
    /// buffered bytes through unparsed (the broker will close the connection).
    fn next_packet(&mut self) -> Option<Vec<u8>> {
        match packet_len(&self.buf) {
            Some(Ok(n)) if self.buf.len() >= n => Some(self.buf.drain(..n).collect()),
            Some(Err(())) if !self.buf.is_empty() => Some(std::mem::take(&mut self.buf)),
            _ => None,
        }
    }
}

/// Total length of the packet at the start of `buf`: `None` if the header is incomplete,
/// `Some(Err)` if the remaining length is malformed (more than 4 bytes).
fn packet_len(buf: &[u8]) -> Option<Result<usize, ()>> {
    let mut len = 0usize;
    for i in 0..4 {
        let b = *buf.get(1 + i)?;
        len |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some(Ok(1 + i + 1 + len));
        }
    }
    Some(Err(()))
}

/// Offset of the variable header of a complete packet.
fn body(pkt: &[u8]) -> Option<&[u8]> {
    let mut i = 1;
    while pkt.get(i)? & 0x80 != 0 {
        i += 1;
    }
    pkt.get(i + 1..)
}

/// The packet id of a QoS 1 PUBLISH on an `…/update/…` topic.
fn update_publish_qos1(pkt: &[u8]) -> Option<u16> {
    let h = *pkt.first()?;
    if h >> 4 != 3 || (h >> 1) & 0x03 != 1 {
        return None;
    }
    let b = body(pkt)?;
    let tlen = usize::from(u16::from_be_bytes([*b.first()?, *b.get(1)?]));
    let topic = std::str::from_utf8(b.get(2..2 + tlen)?).ok()?;
    if !topic.contains("/update/") {
        return None;
    }
    Some(u16::from_be_bytes([*b.get(2 + tlen)?, *b.get(3 + tlen)?]))
}

/// The packet id of a PUBACK.
fn puback_id(pkt: &[u8]) -> Option<u16> {
    if *pkt.first()? != 0x40 {
        return None;
    }
    let b = body(pkt)?;
    Some(u16::from_be_bytes([*b.first()?, *b.get(1)?]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(topic: &str, qos: u8, pkid: u16, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&(topic.len() as u16).to_be_bytes());
        v.extend_from_slice(topic.as_bytes());
        if qos > 0 {
            v.extend_from_slice(&pkid.to_be_bytes());
        }
        v.extend_from_slice(payload);
        let mut p = vec![0x30 | (qos << 1)];
        let mut n = v.len();
        loop {
            let mut b = (n % 128) as u8;
            n /= 128;
            if n > 0 {
                b |= 0x80;
            }
            p.push(b);
            if n == 0 {
                break;
            }
        }
        p.extend(v);
        p
    }

    #[test]
    fn framing_finds_packets_and_their_ids() {
        let big = vec![7u8; 300]; // a two-byte remaining length
        let a = publish("fwdllm/v1/j/update/a", 1, 9, &big);
        let b = publish("fwdllm/v1/j/status/a", 1, 10, b"{}");
        let c = publish("fwdllm/v1/j/update/a", 0, 0, b"x");
        assert_eq!(update_publish_qos1(&a), Some(9));
        assert_eq!(update_publish_qos1(&b), None);
        assert_eq!(update_publish_qos1(&c), None);
        assert_eq!(puback_id(&[0x40, 2, 0, 9]), Some(9));
        assert_eq!(puback_id(&[0x20, 2, 0, 0]), None);
        let mut f = Framer::default();
        f.buf.extend_from_slice(&a);
        f.buf.extend_from_slice(&b[..3]);
        assert_eq!(f.next_packet().as_deref(), Some(&a[..]));
        assert_eq!(f.next_packet(), None);
        f.buf.extend_from_slice(&b[3..]);
        assert_eq!(f.next_packet().as_deref(), Some(&b[..]));
        assert_eq!(packet_len(&[0x30, 0xff, 0xff, 0xff, 0xff]), Some(Err(())));
        assert_eq!(packet_len(&[0x30, 0xff]), None);
    }
}
