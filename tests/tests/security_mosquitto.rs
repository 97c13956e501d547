//! TLS + authentication + ACL on a real mosquitto started here on 127.0.0.1: mutual TLS
//! (throwaway CA and certificates from the `openssl` CLI), passwords from `mosquitto_passwd`,
//! and the shipped ACL `systemd/mosquitto-fwdllm.acl`. The real aggregator and two real agents
//! (synthetic gradients) train through it; an authenticated but hostile client ("mallory")
//! publishes an update as another board and a forged commit and round. The broker refuses
//! them (a spy subscribed to everything never receives them before mallory's own, allowed
//! marker message, which mosquitto delivers in order after them), the agents' replicas never
//! move off the aggregator's hashes, and the rounds go on.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fwdllm_agent::config::{AgentConfig, SourceKind};
use fwdllm_agent::daemon::{Agent, SyntheticSource};
use fwdllm_aggregator::config::AggregatorConfig;
use fwdllm_aggregator::coordinator::AggEvent;
use fwdllm_aggregator::server::{self, BrokerTarget, Hooks};
use fwdllm_shared::lora::WeightsHash;
use fwdllm_shared::mqtt_tls::TlsSettings;
use fwdllm_shared::topics::Topics;
use fwdllm_shared::wire::{self, ClientUpdate, RoundCommit, SeedScalar};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

const JOB: &str = "sec";
const WAIT: Duration = Duration::from_secs(90);
const MAX_PACKET: usize = 8 << 20;
const USERS: [&str; 4] = ["fwdllm-aggregator", "pi-1", "pi-2", "mallory"];

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("run tool");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// CA, broker certificate (SAN 127.0.0.1) and one fleet client certificate, all throwaway.
fn make_certs(dir: &Path) {
    let p = |n: &str| dir.join(n);
    let openssl = || Command::new("openssl");
    run(openssl()
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .arg("-keyout")
        .arg(p("ca.key"))
        .arg("-out")
        .arg(p("ca.pem"))
        .args(["-subj", "/CN=fwdllm test CA"]));
    for (name, ext) in [
        ("broker", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
        ("client", "extendedKeyUsage=clientAuth"),
    ] {
        run(openssl()
            .args(["req", "-newkey", "rsa:2048", "-nodes"])
            .arg("-keyout")
            .arg(p(&format!("{name}.key")))
            .arg("-out")
            .arg(p(&format!("{name}.csr")))
            .args(["-subj", &format!("/CN={name}")]));
        std::fs::write(p(&format!("{name}.ext")), format!("{ext}\n")).unwrap();
        run(openssl()
            .args(["x509", "-req", "-days", "2"])
            .arg("-in")
            .arg(p(&format!("{name}.csr")))
            .arg("-CA")
            .arg(p("ca.pem"))
            .arg("-CAkey")
            .arg(p("ca.key"))
            .arg("-CAcreateserial")
            .arg("-extfile")
            .arg(p(&format!("{name}.ext")))
            .arg("-out")
            .arg(p(&format!("{name}.pem"))));
    }
}

struct Mosquitto {
    child: Child,
    port: u16,
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_mosquitto(dir: &Path) -> Mosquitto {
    let pw = dir.join("passwd");
    for (i, u) in USERS.iter().enumerate() {
        let mut c = Command::new("mosquitto_passwd");
        if i == 0 {
            c.arg("-c");
        }
        run(c.arg("-b").arg(&pw).arg(u).arg(format!("pw-{u}")));
    }
    let acl = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../systemd/mosquitto-fwdllm.acl");
    let port = fwdllm_aggregator::broker::free_port("127.0.0.1").unwrap();
    let conf = dir.join("mosquitto.conf");
    let p = |n: &str| dir.join(n).display().to_string();
    std::fs::write(
        &conf,
        format!(
            "per_listener_settings false\nallow_anonymous false\npassword_file {}\nacl_file {}\n\
             persistence false\nmax_packet_size {MAX_PACKET}\nlistener {port} 127.0.0.1\n\
             cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\nuser root\n",
            pw.display(),
            acl.display(),
            p("ca.pem"),
            p("broker.pem"),
            p("broker.key"),
        ),
    )
    .unwrap();
    // `user root`: started as root (CI), mosquitto would drop to its own user, which cannot
    // read the keys in our private temporary directory. Ignored when not started as root.
    let child = Command::new("/usr/sbin/mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start mosquitto");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let start = Instant::now();
    // Readiness poll of the listener (bounded failure guard, not a delay).
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(start.elapsed() < WAIT, "mosquitto not listening on {addr}");
        std::thread::sleep(Duration::from_millis(10));
    }
    Mosquitto { child, port }
}

fn tls(dir: &Path) -> TlsSettings {
    TlsSettings {
        enabled: true,
        ca_file: dir.join("ca.pem").display().to_string(),
        cert_file: dir.join("client.pem").display().to_string(),
        key_file: dir.join("client.key").display().to_string(),
    }
}

fn password_file(dir: &Path, user: &str) -> String {
    let p = dir.join(format!("{user}.password"));
    std::fs::write(&p, format!("pw-{user}\n")).unwrap();
    p.display().to_string()
}

/// A raw rumqttc client with the fleet's TLS and `user`'s password.
fn raw_client(dir: &Path, port: u16, user: &str, id: &str) -> (AsyncClient, rumqttc::EventLoop) {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_max_packet_size(MAX_PACKET, MAX_PACKET);
    o.set_credentials(user, format!("pw-{user}"));
    let cfg = tls(dir).client_config("test", None).unwrap().unwrap();
    o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(cfg)));
    AsyncClient::new(o, 64)
}

async fn next_event(el: &mut rumqttc::EventLoop) -> Event {
    tokio::time::timeout(WAIT, el.poll())
        .await
        .expect("MQTT event within the guard")
        .expect("MQTT connection")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_acl_refuse_impersonation_and_forged_commits_and_rounds_go_on() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    make_certs(dir);
    let broker = start_mosquitto(dir);
    let topics = Topics::new(JOB).unwrap();

    // Aggregator over TLS with its password.
    let mut cfg = AggregatorConfig::default();
    cfg.job.name = JOB.into();
    cfg.model.preset = "tiny".into();
    cfg.broker.keep_alive_s = 5;
    cfg.broker.max_packet_bytes = MAX_PACKET;
    cfg.broker.username = "fwdllm-aggregator".into();
    cfg.broker.password_file = password_file(dir, "fwdllm-aggregator");
    cfg.broker.tls = tls(dir);
    cfg.state.dir = dir.join("agg");
    cfg.state.plot_every = 0;
    cfg.round.min_clients = 2;
    cfg.round.quorum = 2;
    cfg.round.perturbations_per_client = 4;
    cfg.pacing.max_extends = 0;
    cfg.pacing.min_perturbations = 1;
    cfg.pacing.target_z = 1e9;
    assert_eq!(cfg.validate(), vec![]);
    let (tx, mut events) = broadcast::channel(4096);
    let stop = CancellationToken::new();
    let agg = tokio::spawn(server::run(
        cfg,
        BrokerTarget {
            host: "127.0.0.1".into(),
            port: broker.port,
        },
        stop.clone(),
        Hooks {
            events: Some(tx),
            ..Hooks::default()
        },
    ));

    // Two agents over mutual TLS, each with its own username = client id.
    let mut agent_tasks = Vec::new();
    let mut infos = Vec::new();
    for id in ["pi-1", "pi-2"] {
        let mut c = AgentConfig::default();
        c.agent.client_id = id.into();
        c.agent.job = JOB.into();
        c.agent.state_dir = dir.join(id).display().to_string();
        c.agent.systemd_notify = false;
        c.mqtt.host = "127.0.0.1".into();
        c.mqtt.port = broker.port;
        c.mqtt.max_packet_bytes = MAX_PACKET;
        c.mqtt.keep_alive_s = 5;
        c.mqtt.username = id.into();
        c.mqtt.password_file = password_file(dir, id);
        c.mqtt.tls = tls(dir);
        c.limits.min_free_memory_mb = 0;
        c.limits.max_temperature_c = 0.0;
        c.gradient.source = SourceKind::Synthetic;
        let source = SyntheticSource::new(
            c.gradient.synthetic_target_seed,
            c.gradient.synthetic_target_scale,
        );
        let agent = Agent::new(c, Box::new(source)).expect("agent config");
        infos.push(agent.watch());
        agent_tasks.push(tokio::spawn(agent.run(stop.clone())));
    }

    let committed = |events: &mut broadcast::Receiver<AggEvent>, version: u64| {
        let mut events = events.resubscribe();
        async move {
            tokio::time::timeout(WAIT, async {
                loop {
                    if let AggEvent::Committed {
                        version: v, hash, ..
                    } = events.recv().await.expect("aggregator events")
                    {
                        if v >= version {
                            return (v, hash);
                        }
                    }
                }
            })
            .await
            .expect("commit within the guard")
        }
    };
    let hashes = Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::new()));
    {
        let (h, mut rx) = (hashes.clone(), events.resubscribe());
        tokio::spawn(async move {
            while let Ok(e) = rx.recv().await {
                if let AggEvent::Committed { version, hash, .. } = e {
                    h.lock().unwrap().insert(version, hash);
                }
            }
        });
    }
    let (v1, _) = committed(&mut events, 1).await;

    // The spy reads everything (the aggregator's user may, under its own client id).
    let (spy, mut spy_el) = raw_client(dir, broker.port, "fwdllm-aggregator", "spy");
    spy.subscribe(topics.all_filter(), QoS::AtLeastOnce)
        .await
        .unwrap();
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = next_event(&mut spy_el).await {
            break;
        }
    }

    // Mallory: a valid certificate and password, hostile intent.
    let (mallory, mut mallory_el) = raw_client(dir, broker.port, "mallory", "mallory");
    let forged_update = wire::encode(&ClientUpdate {
        client_id: "pi-1".into(),
        round: 1_000_000,
        base_version: v1,
        seq: 0,
        pairs: vec![SeedScalar {
            seed: 0xbad_5eed,
            g: 9999.0,
        }],
        samples: 1,
        loss_mean: 0.0,
        loss_m2: 0.0,
    });
    let forged_commit = wire::encode(&RoundCommit {
        round: 1_000_000,
        base_version: v1,
        new_version: v1 + 1,
        pairs: vec![fwdllm_shared::update::SeedCoeff {
            seed: 0xbad_5eed,
            coeff: 1e6,
        }],
        weights_hash: WeightsHash([0xee; 32]),
    });
    let forged = [
        (topics.update("pi-1"), forged_update.clone()),
        (topics.commit(), forged_commit.clone()),
        (topics.commit_log(v1 + 1), forged_commit.clone()),
        (topics.round(), forged_commit.clone()),
    ];
    for (topic, payload) in &forged {
        mallory
            .publish(topic.clone(), QoS::AtLeastOnce, false, payload.clone())
            .await
            .unwrap();
    }
    // Mallory's own telemetry is allowed: the marker that everything before it was handled.
    let marker = b"{\"client_id\":\"mallory\",\"unix_ms\":424242}".to_vec();
    mallory
        .publish(
            topics.telemetry("mallory"),
            QoS::AtLeastOnce,
            false,
            marker.clone(),
        )
        .await
        .unwrap();
    let mallory_task = tokio::spawn(async move {
        loop {
            if mallory_el.poll().await.is_err() {
                break;
            }
        }
    });
    let mut seen_forged = Vec::new();
    loop {
        if let Event::Incoming(Packet::Publish(p)) = next_event(&mut spy_el).await {
            if p.topic == topics.telemetry("mallory") && p.payload[..] == marker[..] {
                break;
            }
            if forged.iter().any(|(_, f)| p.payload[..] == f[..]) {
                seen_forged.push(p.topic.clone());
            }
        }
    }
    assert!(
        seen_forged.is_empty(),
        "the broker delivered forged messages on {seen_forged:?}"
    );

    // The rounds go on, and every agent's replica matches the aggregator's hashes.
    let (v2, h2) = committed(&mut events, v1 + 2).await;
    for info in &mut infos {
        let i = tokio::time::timeout(WAIT, info.wait_for(|i| i.model_version >= v2))
            .await
            .expect("agent reaches the new version")
            .expect("agent info")
            .clone();
        let want = hashes.lock().unwrap().get(&i.model_version).copied();
        assert_eq!(i.weights_hash, want, "agent at version {}", i.model_version);
        if i.model_version == v2 {
            assert_eq!(i.weights_hash, Some(h2));
        }
    }
    // The aggregator rejected nothing: the forged update never reached it.
    stop.cancel();
    let summary = tokio::time::timeout(WAIT, agg)
        .await
        .expect("aggregator stops")
        .expect("aggregator task")
        .expect("aggregator run");
    assert_eq!(summary.rejected, 0);
    for t in agent_tasks {
        let _ = tokio::time::timeout(WAIT, t).await;
    }
    mallory_task.abort();

    // Without the right password the broker refuses the connection outright.
    let (_c, mut el) = {
        let mut o = MqttOptions::new("pi-3", "127.0.0.1", broker.port);
        o.set_credentials("pi-1", "wrong");
        let cfg = tls(dir).client_config("test", None).unwrap().unwrap();
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(cfg)));
        AsyncClient::new(o, 8)
    };
    let refused = tokio::time::timeout(WAIT, el.poll()).await.expect("answer");
    assert!(
        matches!(refused, Err(rumqttc::ConnectionError::ConnectionRefused(_))),
        "{refused:?}"
    );
}
