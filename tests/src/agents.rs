//! Real agents (`fwdllm_agent::daemon::Agent` with the synthetic gradient source) for the
//! suites: the test config every suite starts from, and a handle that records every
//! (version, hash) the agent was seen at.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use fwdllm_agent::config::{AgentConfig, GradientSection, LimitsSection, MqttSection, SourceKind};
use fwdllm_agent::daemon::{Agent, AgentError, AgentInfo, SyntheticSource};
use fwdllm_shared::lora::WeightsHash;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::broker::MAX_PACKET;
use crate::WAIT;

/// An agent of `job` on `broker` with fast reconnects, no device limits, no systemd and the
/// synthetic source two seeds at a time.
pub fn agent_config(broker: SocketAddr, job: &str, id: &str, state_dir: &Path) -> AgentConfig {
    let d = AgentConfig::default();
    let mut c = AgentConfig {
        mqtt: MqttSection {
            host: broker.ip().to_string(),
            port: broker.port(),
            max_packet_bytes: MAX_PACKET,
            keep_alive_s: 5,
            backoff_initial_ms: 50,
            backoff_max_ms: 500,
            ..d.mqtt
        },
        limits: LimitsSection {
            min_free_memory_mb: 0,
            max_temperature_c: 0.0,
            ..d.limits
        },
        gradient: GradientSection {
            source: SourceKind::Synthetic,
            seeds_per_chunk: 2,
            ..d.gradient
        },
        ..d
    };
    c.agent.client_id = id.into();
    c.agent.job = job.into();
    c.agent.state_dir = state_dir.display().to_string();
    c.agent.systemd_notify = false;
    c
}

/// Every (version, hash) an agent was observed at.
pub type Seen = Arc<Mutex<Vec<(u64, Option<WeightsHash>)>>>;

pub struct RunningAgent {
    pub id: String,
    pub info: watch::Receiver<AgentInfo>,
    pub stop: CancellationToken,
    pub task: JoinHandle<Result<(), AgentError>>,
    /// Every (version, hash) the agent was observed at.
    pub seen: Seen,
}

/// Starts an agent with the synthetic source its config names.
pub fn spawn_agent(config: AgentConfig) -> RunningAgent {
    let id = config.client_id();
    let source = SyntheticSource::new(
        config.gradient.synthetic_target_seed,
        config.gradient.synthetic_target_scale,
    );
    let agent = Agent::new(config, Box::new(source)).expect("valid agent config");
    let info = agent.watch();
    let seen = agent.version_trail();
    let stop = CancellationToken::new();
    let task = tokio::spawn(agent.run(stop.clone()));
    RunningAgent {
        id,
        info,
        stop,
        task,
        seen,
    }
}

impl RunningAgent {
    /// Waits until the agent's info satisfies `f` (failure guard: [`WAIT`]).
    pub async fn wait_info(&mut self, what: &str, f: impl FnMut(&AgentInfo) -> bool) -> AgentInfo {
        let got = match tokio::time::timeout(WAIT, self.info.wait_for(f)).await {
            Ok(Ok(info)) => Some(info.clone()),
            Ok(Err(_)) => panic!(
                "agent {} info channel closed while waiting for {what}",
                self.id
            ),
            Err(_) => None,
        };
        got.unwrap_or_else(|| {
            panic!(
                "timed out waiting for agent {}: {what}; last {:?}",
                self.id,
                *self.info.borrow()
            )
        })
    }

    /// Waits until the agent holds `version` and returns its hash there.
    pub async fn at_version(&mut self, version: u64) -> Option<WeightsHash> {
        self.wait_info(&format!("version {version}"), |i| {
            i.model_version >= version
        })
        .await;
        self.seen
            .lock()
            .unwrap()
            .iter()
            .find(|(v, _)| *v == version)
            .and_then(|(_, h)| *h)
    }

    /// Graceful stop; the run must end without error.
    pub async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("agent stops")
            .expect("agent task")
            .expect("agent run ok");
    }

    /// Kills the agent without a goodbye (the broker publishes its last will).
    pub fn kill(self) {
        self.task.abort();
    }
}
