//! TLS + authentication + ACL on a real mosquitto started here on 127.0.0.1: mutual TLS
//! (throwaway CA and certificates from the `openssl` CLI), passwords from `mosquitto_passwd`,
//! and the shipped ACL `systemd/mosquitto-fwdllm.acl`. The real aggregator and two real agents
//! (synthetic gradients) train through it; an authenticated but hostile client ("mallory")
//! publishes an update as another board and a forged commit and round. The broker refuses
//! them (a spy subscribed to everything never receives them before mallory's own, allowed
//! marker message, which mosquitto delivers in order after them), the agents' replicas never
//! move off the aggregator's hashes, and the rounds go on.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use fwdllm_agent::config::{AgentConfig, SourceKind};
use fwdllm_agent::daemon::{Agent, SyntheticSource};
use fwdllm_shared::lora::WeightsHash;
use fwdllm_shared::mqtt_tls::TlsSettings;
use fwdllm_shared::topics::Topics;
use fwdllm_shared::wire::{self, ClientUpdate, RoundCommit, SeedScalar};
use fwdllm_tests::broker::{Broker, MAX_PACKET};
use fwdllm_tests::federation_suite::{aggregator_config, spawn_aggregator, JOB};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(90);
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

/// The fleet's mosquitto: passwords of [`USERS`], the shipped ACL, mutual TLS.
fn start_mosquitto(dir: &Path) -> Broker {
    let pw = dir.join("passwd");
    for (i, u) in USERS.iter().enumerate() {
        let mut c = Command::new("mosquitto_passwd");
        if i == 0 {
            c.arg("-c");
        }
        run(c.arg("-b").arg(&pw).arg(u).arg(format!("pw-{u}")));
    }
    let acl = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../systemd/mosquitto-fwdllm.acl");
    let p = |n: &str| dir.join(n).display().to_string();
    // `user root`: started as root (CI), mosquitto would drop to its own user, which cannot
    // read the keys in our private temporary directory. Ignored when not started as root.
    Broker::mosquitto_with(|port| {
        format!(
            "per_listener_settings false\nallow_anonymous false\npassword_file {}\nacl_file {}\n\
             persistence false\nmax_packet_size {MAX_PACKET}\nlistener {port} 127.0.0.1\n\
             cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\nuser root\n",
            pw.display(),
            acl.display(),
            p("ca.pem"),
            p("broker.pem"),
            p("broker.key"),
        )
    })
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

    // The suites' aggregator, over TLS with its password.
    let mut cfg = aggregator_config(&dir.join("agg"), 2, 2);
    cfg.broker.username = "fwdllm-aggregator".into();
    cfg.broker.password_file = password_file(dir, "fwdllm-aggregator");
    cfg.broker.tls = tls(dir);
    assert_eq!(cfg.validate(), vec![]);
    let mut agg = spawn_aggregator(cfg, broker.addr());
    let port = broker.addr().port();
    let stop = CancellationToken::new();

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
        c.mqtt.port = port;
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

    let v1 = 1;
    agg.committed(v1).await;

    // The spy reads everything (the aggregator's user may, under its own client id).
    let (spy, mut spy_el) = raw_client(dir, port, "fwdllm-aggregator", "spy");
    spy.subscribe(topics.all_filter(), QoS::AtLeastOnce)
        .await
        .unwrap();
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = next_event(&mut spy_el).await {
            break;
        }
    }

    // Mallory: a valid certificate and password, hostile intent.
    let (mallory, mut mallory_el) = raw_client(dir, port, "mallory", "mallory");
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
        step: wire::CommitStep::Pairs(vec![fwdllm_shared::update::SeedCoeff {
            seed: 0xbad_5eed,
            coeff: 1e6,
        }]),
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
    let v2 = v1 + 2;
    let h2 = agg.committed(v2).await;
    for info in &mut infos {
        let i = tokio::time::timeout(WAIT, info.wait_for(|i| i.model_version >= v2))
            .await
            .expect("agent reaches the new version")
            .expect("agent info")
            .clone();
        let want = agg.hash_of(i.model_version);
        assert_eq!(i.weights_hash, want, "agent at version {}", i.model_version);
        if i.model_version == v2 {
            assert_eq!(i.weights_hash, Some(h2));
        }
    }
    // The aggregator rejected nothing: the forged update never reached it.
    stop.cancel();
    assert_eq!(agg.stop().await.rejected, 0);
    for t in agent_tasks {
        let _ = tokio::time::timeout(WAIT, t).await;
    }
    mallory_task.abort();

    // Without the right password the broker refuses the connection outright.
    let (_c, mut el) = {
        let mut o = MqttOptions::new("pi-3", "127.0.0.1", port);
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
