//! Brokers for the end-to-end suites: the embedded rumqttd (the product's default) and
//! Debian's mosquitto, started here on 127.0.0.1 to prove interoperability.

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Largest MQTT packet the test brokers accept (holds a checkpoint of the test layouts).
pub const MAX_PACKET: usize = 8 << 20;
/// Failure guard for a broker to start listening (never reached when things work).
const START_GUARD: Duration = Duration::from_secs(60);

pub enum Broker {
    Embedded(fwdllm_aggregator::broker::EmbeddedBroker),
    Mosquitto {
        child: Child,
        port: u16,
        _dir: tempfile::TempDir,
    },
}

impl Broker {
    pub fn embedded() -> Broker {
        Broker::Embedded(
            fwdllm_aggregator::broker::EmbeddedBroker::start("127.0.0.1", 0, MAX_PACKET)
                .expect("embedded broker"),
        )
    }

    /// Debian's mosquitto on 127.0.0.1, random free port, generated config; killed on drop.
    pub fn mosquitto() -> Broker {
        Broker::mosquitto_with(|port| {
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_packet_size {MAX_PACKET}\n"
            )
        })
    }

    /// Debian's mosquitto on a free port of 127.0.0.1 with the config `conf(port)` (which
    /// must open a listener on that port); returns once it listens, killed on drop.
    pub fn mosquitto_with(conf: impl FnOnce(u16) -> String) -> Broker {
        let bin = Path::new("/usr/sbin/mosquitto");
        assert!(
            bin.exists(),
            "/usr/sbin/mosquitto is missing: apt-get install mosquitto (scripts/setup.sh does)"
        );
        // Tests in one binary run in parallel: without this lock two of them can be handed
        // the same free port, one mosquitto fails to bind, and its test talks to the other's
        // broker (client-id takeovers reset connections). Held until ours is listening.
        static STARTING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _starting = STARTING.lock().unwrap_or_else(|e| e.into_inner());
        let port = fwdllm_aggregator::broker::free_port("127.0.0.1").expect("free port");
        let dir = tempfile::tempdir().expect("tempdir");
        let conf_path = dir.path().join("mosquitto.conf");
        std::fs::write(&conf_path, conf(port)).expect("write mosquitto.conf");
        let child = Command::new(bin)
            .arg("-c")
            .arg(&conf_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        // Readiness poll of the listener we just started (bounded guard, not a delay).
        let start = Instant::now();
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            assert!(
                start.elapsed() < START_GUARD,
                "mosquitto not listening on {addr}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Broker::Mosquitto {
            child,
            port,
            _dir: dir,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        match self {
            Broker::Embedded(b) => b.addr(),
            Broker::Mosquitto { port, .. } => SocketAddr::from(([127, 0, 0, 1], *port)),
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Broker::Mosquitto { child, .. } = self {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
