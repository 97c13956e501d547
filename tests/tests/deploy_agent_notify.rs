//! The real agent daemon under a fake service manager (the receiving end of NOTIFY_SOCKET,
//! with WATCHDOG_USEC set as systemd does for `WatchdogSec=`): it sends READY=1 once
//! connected, pings the watchdog while its loop runs, and a round whose gradient computation
//! hangs (`gradient.synthetic_hang_at_round`, a wedged forward pass) stops the pings for
//! good, which is what lets systemd restart it.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fwdllm_tests::agent_suite::{agent_config, Peer, Reference};
use fwdllm_tests::broker::Broker;
use tokio::net::UnixDatagram;

const AGENT: &str = env!("CARGO_BIN_EXE_fwdllm-agent-under-test");
/// WatchdogSec=0.4 s: the agent pings every 0.2 s while healthy.
const WATCHDOG_USEC: u64 = 400_000;
/// Failure guard for waiting on a message that must come.
const MUST_ARRIVE: Duration = Duration::from_secs(60);

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn next_message(sock: &UnixDatagram, within: Duration) -> Option<String> {
    let mut buf = [0u8; 4096];
    let n = tokio::time::timeout(within, sock.recv(&mut buf))
        .await
        .ok()?
        .expect("notify socket recv");
    // One datagram may carry several newline-separated assignments (sd_notify(3)).
    let text = std::str::from_utf8(&buf[..n]).expect("sd_notify messages are UTF-8");
    Some(text.trim_end_matches('\n').to_string())
}

/// Reads messages until one equal to or starting with `want`; returns those seen before it.
async fn until(sock: &UnixDatagram, want: &str) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        let m = next_message(sock, MUST_ARRIVE)
            .await
            .unwrap_or_else(|| panic!("no {want:?} from the agent; saw {seen:?}"));
        if m.lines().any(|line| line.starts_with(want)) {
            return seen;
        }
        seen.push(m);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_sends_ready_and_watchdog_and_a_hung_round_stops_the_pings() {
    let broker = Broker::embedded();
    let dir = tempfile::tempdir().unwrap();
    let id = "agent-notify";
    let mut config = agent_config(broker.addr(), id, &dir.path().join("state"));
    config.agent.systemd_notify = true;
    config.telemetry.interval_s = 0;
    config.gradient.synthetic_hang_at_round = 2;
    let config_path = dir.path().join("agent.toml");
    std::fs::write(&config_path, toml::to_string(&config).unwrap()).unwrap();

    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let _agent = KillOnDrop(
        Command::new(AGENT)
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .env("NOTIFY_SOCKET", &sock_path)
            .env("WATCHDOG_USEC", WATCHDOG_USEC.to_string())
            .env_remove("WATCHDOG_PID")
            .env_remove("JOURNAL_STREAM")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the agent"),
    );

    // READY comes once the broker connection is up, then the idle loop keeps pinging.
    let before_ready = until(&sock, "READY=1").await;
    assert!(
        before_ready.iter().all(|m| m == "WATCHDOG=1"),
        "{before_ready:?}"
    );
    until(&sock, "WATCHDOG=1").await;
    until(&sock, "WATCHDOG=1").await;

    // Round 1 is computed and answered; the loop pings around it.
    let mut peer = Peer::connect(broker.addr(), "test-peer").await;
    let mut reference = Reference::new();
    peer.checkpoint(0, &reference.weights).await;
    peer.announce(&reference.announce(1, 0, 2)).await;
    until(&sock, "STATUS=round 1 extend 0: computing 2 perturbations").await;
    until(&sock, "STATUS=round 1 extend 0: sent 2 perturbations").await;
    peer.next_update(id).await;
    until(&sock, "WATCHDOG=1").await;

    // Round 2 hangs inside the computation: after at most one ping interval the pings stop
    // and never resume (a timer-driven ping would keep coming and fail this wait).
    peer.commit(&reference.commit(1)).await;
    peer.announce(&reference.announce(2, 0, 2)).await;
    until(&sock, "STATUS=round 2 extend 0: computing 2 perturbations").await;
    let silence = Duration::from_micros(10 * WATCHDOG_USEC);
    let guard = tokio::time::Instant::now() + MUST_ARRIVE;
    let mut pings_after_hang = 0;
    loop {
        match next_message(&sock, silence).await {
            None => break,
            Some(m) => {
                assert_eq!(m, "WATCHDOG=1", "unexpected message while hung");
                pings_after_hang += 1;
                assert!(
                    tokio::time::Instant::now() < guard,
                    "still {pings_after_hang} pings while the round hangs: the watchdog is not tied to the work loop"
                );
            }
        }
    }
    let mut agent = _agent;
    assert!(
        agent.0.try_wait().unwrap().is_none(),
        "the agent must hang (and be killed by systemd), not exit"
    );
    drop(agent);
    drop(peer);
}
