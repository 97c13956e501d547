//! The processes and brokers of a chaos run: agents as real `fwdllm-agent run` processes (so a
//! kill is a SIGKILL and a restart reads the agent's persisted state), the aggregator as a child
//! process of this binary (`chaos aggregator`: `server::run` with the rulings log), Debian's
//! mosquitto with persistence (restartable) or the embedded rumqttd.

use std::fs::{File, OpenOptions};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use fwdllm_agent::config::{AgentConfig, SourceKind};
use fwdllm_agent::daemon::state::StateDir;
use fwdllm_aggregator::broker::{free_port, EmbeddedBroker};
use fwdllm_aggregator::config::AggregatorConfig;
use fwdllm_bench::chaos::Rulings;
use fwdllm_shared::lora::WeightsHash;

/// Largest MQTT packet of the synthetic runs (checkpoints of the tiny layout are a few KB).
pub(crate) const MAX_PACKET: usize = 8 << 20;

/// Sends `sig` to a child process.
fn signal(child: &Child, sig: libc::c_int) {
    // SAFETY: kill(2) with the pid of a child we spawned and have not reaped (the caller
    // still holds its `Child`), so the pid cannot have been reused.
    unsafe {
        libc::kill(child.id() as libc::pid_t, sig);
    }
}

/// SIGTERM, then SIGKILL if the process is still there after `grace`; reaps it.
fn terminate(child: &mut Child, grace: Duration) -> Result<()> {
    signal(child, libc::SIGTERM);
    let start = Instant::now();
    while child.try_wait()?.is_none() {
        if start.elapsed() > grace {
            log::warn!(
                "pid {} ignored SIGTERM for {grace:?}; killing it",
                child.id()
            );
            child.kill()?;
            child.wait()?;
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn log_file(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

/// Waits until `addr` accepts TCP connections (a readiness poll, bounded by `guard`).
fn wait_listening(addr: SocketAddr, guard: Duration) -> Result<()> {
    let start = Instant::now();
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        if start.elapsed() > guard {
            bail!("nothing listens on {addr} after {guard:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// The broker of a run.
pub(crate) enum Broker {
    Embedded(EmbeddedBroker),
    Mosquitto(Mosquitto),
}

impl Broker {
    pub(crate) fn addr(&self) -> SocketAddr {
        match self {
            Broker::Embedded(b) => b.addr(),
            Broker::Mosquitto(m) => SocketAddr::from(([127, 0, 0, 1], m.port)),
        }
    }

    pub(crate) fn name(&self) -> &'static str {
        match self {
            Broker::Embedded(_) => "rumqttd (embedded)",
            Broker::Mosquitto(_) => "mosquitto (persistence true)",
        }
    }
}

/// Debian's mosquitto on a fixed loopback port with persistence in its own directory (as
/// Debian's default `/etc/mosquitto/mosquitto.conf` has it), so a restart keeps sessions,
/// queued QoS 1 messages and retained messages.
pub(crate) struct Mosquitto {
    port: u16,
    conf: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Mosquitto {
    pub(crate) fn start(dir: &Path) -> Result<Mosquitto> {
        let bin = Path::new("/usr/sbin/mosquitto");
        if !bin.exists() {
            bail!(
                "/usr/sbin/mosquitto is missing: apt-get install mosquitto (scripts/setup.sh does)"
            );
        }
        std::fs::create_dir_all(dir)?;
        let port = free_port("127.0.0.1")?;
        let conf = dir.join("mosquitto.conf");
        // Started as root, mosquitto drops to user "mosquitto", which cannot write its database
        // into our directory: every restart would then lose all sessions and queued messages.
        // SAFETY: geteuid(2) has no preconditions.
        let user = if unsafe { libc::geteuid() } == 0 {
            "user root\n"
        } else {
            ""
        };
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\n{user}persistence true\n\
                 persistence_location {}/\npersistence_file mosquitto.db\nautosave_interval 0\n\
                 max_packet_size {MAX_PACKET}\nmax_queued_messages 100000\n",
                dir.display()
            ),
        )?;
        let mut m = Mosquitto {
            port,
            conf,
            log: dir.join("mosquitto.log"),
            child: None,
        };
        m.spawn()?;
        Ok(m)
    }

    fn spawn(&mut self) -> Result<()> {
        let child = Command::new("/usr/sbin/mosquitto")
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(log_file(&self.log)?)
            .spawn()
            .context("starting mosquitto")?;
        self.child = Some(child);
        wait_listening(
            SocketAddr::from(([127, 0, 0, 1], self.port)),
            Duration::from_secs(30),
        )
    }

    /// A graceful restart (SIGTERM: mosquitto writes its database, then exits), then the same
    /// broker again on the same port and database.
    pub(crate) fn restart(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            terminate(&mut c, Duration::from_secs(30))?;
        }
        self.spawn()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One daemon as a child process: its command line, log and how long SIGTERM may take;
/// SIGKILL-able and restartable (the aggregator and the agents alike).
pub(crate) struct Daemon {
    exe: PathBuf,
    args: Vec<std::ffi::OsString>,
    rust_log: &'static str,
    log: PathBuf,
    grace: Duration,
    child: Option<Child>,
}

impl Daemon {
    pub(crate) fn start(&mut self) -> Result<()> {
        let child = Command::new(&self.exe)
            .args(&self.args)
            .env("RUST_LOG", self.rust_log)
            .stdout(Stdio::null())
            .stderr(log_file(&self.log)?)
            .spawn()
            .with_context(|| format!("starting {} {:?}", self.exe.display(), self.args))?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL: no shutdown, nothing flushed (an agent's broker publishes its last will).
    pub(crate) fn kill(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    /// SIGTERM (an agent abandons its round, publishes "offline" and disconnects), then
    /// SIGKILL after the grace period.
    pub(crate) fn stop(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            terminate(&mut c, self.grace)?;
        }
        Ok(())
    }
}

/// Both process wrappers start, kill and stop as their [`Daemon`].
macro_rules! daemon_deref {
    ($t:ty) => {
        impl std::ops::Deref for $t {
            type Target = Daemon;
            fn deref(&self) -> &Daemon {
                &self.daemon
            }
        }
        impl std::ops::DerefMut for $t {
            fn deref_mut(&mut self) -> &mut Daemon {
                &mut self.daemon
            }
        }
    };
}
daemon_deref!(AggregatorProc);
daemon_deref!(AgentProc);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// The aggregator as a child process (`<this binary> aggregator`), with its rulings log.
pub(crate) struct AggregatorProc {
    pub(crate) rulings: PathBuf,
    pub(crate) state_dir: PathBuf,
    daemon: Daemon,
}

impl AggregatorProc {
    pub(crate) fn new(exe: &Path, dir: &Path, cfg: &AggregatorConfig) -> Result<AggregatorProc> {
        let config = dir.join("aggregator.toml");
        std::fs::write(&config, toml::to_string(cfg)?)?;
        let rulings = dir.join("rulings.jsonl");
        Ok(AggregatorProc {
            daemon: Daemon {
                exe: exe.to_path_buf(),
                args: vec![
                    "aggregator".into(),
                    "--config".into(),
                    config.clone().into(),
                    "--rulings".into(),
                    rulings.clone().into(),
                ],
                rust_log: "warn,rumqttd=off",
                log: dir.join("aggregator.log"),
                grace: Duration::from_secs(60),
                child: None,
            },
            rulings,
            state_dir: cfg.state.dir.clone(),
        })
    }

    /// What the aggregator ruled so far (its rulings log, across restarts).
    pub(crate) fn rulings(&self) -> Result<Rulings> {
        match std::fs::read_to_string(&self.rulings) {
            Ok(text) => Ok(Rulings::parse_log(&text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Rulings::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", self.rulings.display())),
        }
    }
}

/// One agent: a `fwdllm-agent run` process with the synthetic source, its own state directory
/// and log; SIGKILL-able and restartable on the same state.
pub(crate) struct AgentProc {
    pub(crate) id: String,
    state_dir: PathBuf,
    log: PathBuf,
    daemon: Daemon,
}

impl AgentProc {
    /// Writes the agent's config: `job` on `broker`, fast reconnects, no device limits, the
    /// synthetic source one seed per chunk (so a round takes several work-loop turns).
    pub(crate) fn new(
        bin: &Path,
        dir: &Path,
        id: &str,
        job: &str,
        broker: SocketAddr,
    ) -> Result<Self> {
        let state_dir = dir.join(id);
        std::fs::create_dir_all(&state_dir)?;
        let mut c = AgentConfig::default();
        c.agent.client_id = id.into();
        c.agent.job = job.into();
        c.agent.state_dir = state_dir.display().to_string();
        c.agent.systemd_notify = false;
        c.mqtt.host = broker.ip().to_string();
        c.mqtt.port = broker.port();
        c.mqtt.keep_alive_s = 5;
        c.mqtt.max_packet_bytes = MAX_PACKET;
        c.mqtt.backoff_initial_ms = 50;
        c.mqtt.backoff_max_ms = 1000;
        c.limits.min_free_memory_mb = 0;
        c.limits.max_temperature_c = 0.0;
        c.limits.max_load_per_core = 0.0;
        c.telemetry.interval_s = 0;
        c.gradient.source = SourceKind::Synthetic;
        c.gradient.seeds_per_chunk = 1;
        let config = dir.join(format!("{id}.toml"));
        std::fs::write(&config, toml::to_string(&c)?)?;
        let log = dir.join(format!("{id}.log"));
        Ok(AgentProc {
            id: id.into(),
            state_dir,
            daemon: Daemon {
                exe: bin.to_path_buf(),
                args: vec!["run".into(), "--config".into(), config.into()],
                rust_log: "warn",
                log: log.clone(),
                grace: Duration::from_secs(30),
                child: None,
            },
            log,
        })
    }

    /// The persisted replica: (version, hash in `state.json`, whether `weights.bin` holds
    /// exactly those weights).
    pub(crate) fn replica(&self) -> Result<(u64, Option<WeightsHash>, bool)> {
        let dir = StateDir::open(&self.state_dir)?;
        let s = dir.load_state();
        let ok = s
            .weights_hash
            .is_some_and(|h| dir.load_weights(s.model_version, &h).is_some());
        Ok((s.model_version, s.weights_hash, ok))
    }

    /// Replays whose hash differed from the aggregator's, as the agent logged them.
    pub(crate) fn logged_replay_mismatches(&self) -> u64 {
        std::fs::read_to_string(&self.log)
            .map(|t| t.lines().filter(|l| l.contains("gave hash")).count() as u64)
            .unwrap_or(0)
    }
}
