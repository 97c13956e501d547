//! Embedded MQTT broker: rumqttd in-process on loopback. rumqttd's config is a large struct
//! meant for TOML files; this builds the few parts we need programmatically.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum BrokerError {
    #[error("no free port on {host}: {source}")]
    NoPort {
        host: String,
        source: std::io::Error,
    },
    #[error("embedded broker did not accept connections on {addr} within {secs} s")]
    NotReady { addr: SocketAddr, secs: u64 },
    #[error("broker address {0:?} is not a loopback IP address; the embedded broker only listens on loopback")]
    NotLoopback(String),
}

/// A running embedded broker. rumqttd has no shutdown API: its threads end with the process.
#[derive(Debug, Clone)]
pub struct EmbeddedBroker {
    addr: SocketAddr,
}

impl EmbeddedBroker {
    /// Starts rumqttd on `host:port` (port 0 = a free port) and waits until it accepts
    /// connections. `max_payload` bounds one MQTT packet (must hold a checkpoint).
    pub fn start(host: &str, port: u16, max_payload: usize) -> Result<EmbeddedBroker, BrokerError> {
        Self::start_with_users(host, port, max_payload, None)
    }

    /// [`Self::start`] with username/password authentication: with `users` (username →
    /// password) a client must present one of them, anonymous connections are refused.
    pub fn start_with_users(
        host: &str,
        port: u16,
        max_payload: usize,
        users: Option<HashMap<String, String>>,
    ) -> Result<EmbeddedBroker, BrokerError> {
        let ip: std::net::IpAddr = host
            .parse()
            .map_err(|_| BrokerError::NotLoopback(host.to_string()))?;
        if !ip.is_loopback() {
            return Err(BrokerError::NotLoopback(host.to_string()));
        }
        let port = if port == 0 { free_port(host)? } else { port };
        let addr = SocketAddr::new(ip, port);
        let connections = ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: max_payload,
            max_inflight_count: 500,
            auth: users,
            external_auth: None,
            dynamic_filters: true,
        };
        let server = ServerSettings {
            name: "v4-loopback".into(),
            listen: addr,
            tls: None,
            next_connection_delay_ms: 0,
            connections,
        };
        let router = RouterConfig {
            // Twice a 10,000-board fleet: a burst of connects overflows the listen backlog,
            // and boards that retry while their half-open attempts still hold a slot must
            // find room. rumqttd answers a connection beyond this with no CONNACK at all (it
            // logs "no space for new connection"), so a board would hang, not fail. A slot
            // is a few empty `Slab` entries.
            max_connections: 20_000,
            // Also the cap on retained messages delivered to one QoS 0 subscription (the
            // aggregator's status filter: one per board), so well above the board count.
            max_outgoing_packet_count: 20_000,
            // One segment must hold the largest message (a checkpoint).
            max_segment_size: max_payload.max(1 << 20) * 2,
            max_segment_count: 10,
            ..RouterConfig::default()
        };
        let config = Config {
            id: 0,
            router,
            v4: Some(HashMap::from([("1".to_string(), server)])),
            ..Config::default()
        };
        std::thread::Builder::new()
            .name("rumqttd".into())
            .spawn(move || {
                let mut broker = Broker::new(config);
                if let Err(e) = broker.start() {
                    log::error!("embedded broker stopped: {e}");
                }
            })
            .expect("spawn broker thread");
        // Readiness: poll until the listener accepts (bounded; a failure guard, not a delay).
        let start = Instant::now();
        let limit = Duration::from_secs(10);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if start.elapsed() > limit {
                return Err(BrokerError::NotReady {
                    addr,
                    secs: limit.as_secs(),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        log::info!("embedded broker listening on {addr}");
        Ok(EmbeddedBroker { addr })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    pub fn host(&self) -> String {
        self.addr.ip().to_string()
    }
    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

/// A port that was free a moment ago (bind :0, read, release).
pub fn free_port(host: &str) -> Result<u16, BrokerError> {
    let l = TcpListener::bind((host, 0)).map_err(|source| BrokerError::NoPort {
        host: host.to_string(),
        source,
    })?;
    let port = l.local_addr().map_err(|source| BrokerError::NoPort {
        host: host.to_string(),
        source,
    })?;
    Ok(port.port())
}

/// Raises the soft limit of open files to the hard limit (10,000 connections need as many
/// descriptors here, and as many again in a broker child, which inherits the limit).
/// Returns (soft, hard) after the change.
pub fn raise_fd_limit() -> std::io::Result<(u64, u64)> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed by reference.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok((r.rlim_cur, r.rlim_max))
}
