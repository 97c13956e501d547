//! Real agents across bridged brokers: three `fwdllm-agent` daemons (synthetic gradient source)
//! on a site Mosquitto, the aggregator on a central one, the shipped bridge config between them
//! (`fwdllm_bench::bridge`). Every round is announced as `All`, the fleet-size form, which
//! goes out at QoS 0 (ARCHITECTURE.md, "Announcements at fleet size"): a QoS-0 message is not
//! queued for a bridge that is down, so the bridge is held down from the moment commit 2 is
//! durable, before the commit and round 3's announcement are published, and released once
//! round 3 is open. Round 3 must still reach the agents (as the retained announcement the
//! bridge receives when it subscribes again) and commit with every agent's update, not time
//! out; replicas equal the aggregator's weights at every version and both brokers end with the
//! same retained state.

use std::path::Path;
use std::sync::Arc;

use fwdllm_aggregator::coordinator::AggEvent;
use fwdllm_bench::bridge::{self, Bridged};
use fwdllm_shared::wire::ClientSelection;
use fwdllm_tests::broker::MAX_PACKET;
use fwdllm_tests::federation_suite::{
    aggregator_config, spawn_agent, spawn_aggregator_hooked, tempdir, Peer, JOB,
};

const AGENTS: usize = 3;
const COMMITS: u64 = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_qos0_round_announced_while_the_bridge_is_down_reaches_real_agents() {
    let bin = Path::new("/usr/sbin/mosquitto");
    assert!(
        bin.exists(),
        "/usr/sbin/mosquitto is missing: apt-get install mosquitto (scripts/setup.sh does)"
    );
    let b = Arc::new(
        Bridged::start(bin, MAX_PACKET)
            .await
            .expect("bridged brokers"),
    );
    let (_d, dir) = tempdir();
    // A device's view of the round topic on the site broker.
    let mut watcher = Peer::connect(b.site.addr(), "round-watcher").await;
    let mut cfg = aggregator_config(&dir.join("agg"), AGENTS as u32, AGENTS as u32);
    // A list longer than 1 becomes `All`: the announcement fleets above 256 devices get.
    cfg.round.selection_list_max = 1;
    cfg.job.max_commits = COMMITS;
    let per_commit = AGENTS * cfg.round.perturbations_per_client as usize;
    let hold = b.clone();
    let mut agg = spawn_aggregator_hooked(
        cfg,
        b.central.addr(),
        Some(Box::new(move |e: &AggEvent| {
            // Durable, not yet published: the commit and the next round cannot cross.
            if let AggEvent::Committed { version: 2, .. } = e {
                hold.relay.hold();
            }
        })),
    );
    let mut agents: Vec<_> = (0..AGENTS)
        .map(|i| spawn_agent(b.site.addr(), &format!("agent-{i}"), &dir))
        .collect();

    let mut committed = Vec::new();
    for version in 1..=COMMITS {
        let (round, perturbations) = agg
            .next(&format!("commit of version {version}"), |e| match e {
                AggEvent::Abandoned { round } => {
                    panic!("round {round} was abandoned: its announcement never reached the agents")
                }
                AggEvent::RoundOpened { round: 3, .. } => {
                    // Round 3 is announced (published before this event is emitted) while
                    // the bridge is held: no agent can have seen commit 2 yet.
                    for a in &agents {
                        assert_eq!(a.info.borrow().model_version, 1, "agent {}", a.id);
                    }
                    b.relay.release();
                    None
                }
                AggEvent::Committed {
                    round,
                    version: v,
                    perturbations,
                    ..
                } if *v == version => Some((*round, *perturbations)),
                _ => None,
            })
            .await;
        committed.push((round, perturbations));
    }
    // One round per commit, each with every agent's update: nothing was lost or timed out.
    assert_eq!(
        committed,
        (1..=COMMITS).map(|r| (r, per_commit)).collect::<Vec<_>>()
    );
    for a in &mut agents {
        a.at_version(COMMITS).await;
        a.assert_replica_matches(&agg);
    }
    assert!(
        b.relay.connections() >= 2,
        "the bridge reconnected after the hold"
    );
    let third = watcher.announce(|a| a.round == 3).await;
    assert_eq!(third.selection, ClientSelection::All);
    for a in agents {
        a.stop().await;
    }
    let summary = agg.stop().await;
    assert_eq!(summary.version, COMMITS);
    assert_eq!(summary.rejected, 0, "no update was rejected");

    let (central, site) = bridge::retained_on_both(&b, JOB)
        .await
        .expect("retained state");
    assert_eq!(central, site, "both brokers hold the same retained state");
}
