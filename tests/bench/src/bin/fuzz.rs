//! The random-mutation fuzzer (stable toolchain, no coverage feedback; `make fuzz` runs the
//! coverage-guided cargo-fuzz targets instead): ≥ 10M mutated inputs per target through the
//! wire decoder, the aggregator's update ingest, the GGUF reader and both config loaders;
//! writes executions and crashes per target as JSON and saves every crashing input under
//! `<out dir>/fuzz-crashes/`. Exits non-zero on any crash.
//!
//! `--write-corpus DIR` (re)writes the seed corpus kept in the repo (`fuzz/corpus`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Parser;
use fwdllm_aggregator::config::AggregatorConfig;
use fwdllm_bench::fuzz::{self, IngestTarget, Target, TargetReport};
use fwdllm_shared::gguf::{self, GgufValue};
use fwdllm_shared::lora::{LoraConfig, LoraLayout, LoraWeights, WeightsHash};
use fwdllm_shared::wire::{
    self, AgentState, AgentStatus, AggregatorMetrics, Checkpoint, ClientSelection, ClientUpdate,
    RoundAnnounce, RoundCommit, SeedScalar, TaskParams, Telemetry,
};

#[derive(Parser)]
struct Args {
    /// Executions per target.
    #[arg(long, default_value_t = 10_000_000)]
    executions: u64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Seed corpus (one directory per target).
    #[arg(long, default_value = "fuzz/corpus")]
    corpus: PathBuf,
    /// Only these targets (comma-separated); default all.
    #[arg(long)]
    targets: Option<String>,
    #[arg(long, default_value = "target/bench/fuzz-random.json")]
    out: PathBuf,
    /// Write the seed corpus to this directory and exit.
    #[arg(long)]
    write_corpus: Option<PathBuf>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(dir) = &args.write_corpus {
        return write_corpus(dir);
    }
    let wanted = |name: &str| {
        args.targets
            .as_deref()
            .is_none_or(|t| t.split(',').any(|x| x == name))
    };
    let corpus = |name: &str| {
        fuzz::corpus(&args.corpus, name)
            .with_context(|| format!("reading corpus {}", args.corpus.join(name).display()))
    };
    let mut ingest = IngestTarget::new().context("ingest target state dir")?;
    let mut targets = vec![
        Target {
            name: "wire",
            corpus: corpus("wire")?,
            text: false,
            max_len: 1 << 16,
            structured: Some(fuzz::mutate_update),
            run: Box::new(fuzz::wire_target),
        },
        Target {
            name: "ingest",
            corpus: corpus("ingest")?,
            text: false,
            max_len: 1 << 14,
            structured: Some(fuzz::mutate_update),
            run: Box::new(|b: &[u8]| ingest.run(b)),
        },
        Target {
            name: "gguf",
            corpus: corpus("gguf")?,
            text: false,
            max_len: 1 << 16,
            structured: None,
            run: Box::new(fuzz::gguf_target),
        },
        Target {
            name: "aggregator_config",
            corpus: corpus("aggregator_config")?,
            text: true,
            max_len: 1 << 14,
            structured: None,
            run: Box::new(fuzz::aggregator_config_target),
        },
    ];
    targets.push(Target {
        name: "agent_config",
        corpus: corpus("agent_config")?,
        text: true,
        max_len: 1 << 14,
        structured: None,
        run: Box::new(fuzz::agent_config_target),
    });
    targets.retain(|t| wanted(t.name));
    let crash_dir = args
        .out
        .parent()
        .unwrap_or(Path::new("."))
        .join("fuzz-crashes");
    let mut reports: Vec<TargetReport> = Vec::new();
    for t in &mut targets {
        eprintln!("fuzzing {} ({} executions)...", t.name, args.executions);
        let r = fuzz::fuzz(t, args.executions, args.seed);
        eprintln!(
            "  {}: {} executions, {} crashes, {:.0} s ({:.0}/s)",
            r.target,
            r.executions,
            r.crashes,
            r.seconds,
            r.executions as f64 / r.seconds
        );
        for (i, input) in r.crash_inputs.iter().enumerate() {
            std::fs::create_dir_all(&crash_dir)?;
            let p = crash_dir.join(format!("{}-{i}.bin", r.target));
            std::fs::write(&p, input)?;
            eprintln!("  crash {i}: {} -> {}", r.crash_messages[i], p.display());
        }
        reports.push(r);
    }
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let json = serde_json::json!({
        "what": "mutation fuzzing (property loop, stable Rust): executions and crashes (panics) per target",
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "seed": args.seed,
        "targets": reports,
        "total_crashes": reports.iter().map(|r| r.crashes).sum::<u64>(),
    });
    std::fs::write(&args.out, serde_json::to_vec_pretty(&json)?)
        .with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!("wrote {}", args.out.display());
    if reports.iter().any(|r| r.crashes > 0) {
        anyhow::bail!("fuzzing found crashes; inputs in {}", crash_dir.display());
    }
    Ok(())
}

fn write_corpus(dir: &Path) -> Result<()> {
    let put = |target: &str, name: &str, bytes: &[u8]| -> Result<()> {
        let d = dir.join(target);
        std::fs::create_dir_all(&d)?;
        std::fs::write(d.join(name), bytes).with_context(|| format!("writing {target}/{name}"))
    };
    let layout = AggregatorConfig {
        model: fwdllm_aggregator::config::ModelConfig {
            preset: "tiny".into(),
            ..Default::default()
        },
        ..Default::default()
    }
    .layout()
    .map_err(anyhow::Error::msg)?;
    let weights = LoraWeights::init(layout.clone());
    let head_layout = LoraLayout::new(
        layout.shape(),
        &LoraConfig {
            head_rows: 3,
            ..Default::default()
        },
    )?;
    let head = LoraWeights::init(head_layout);
    let update = ClientUpdate {
        client_id: "a".into(),
        round: 1,
        base_version: 0,
        seq: 0,
        pairs: (0..4)
            .map(|k| SeedScalar {
                seed: 0x1234_5678_9abc_def0 + k,
                g: 0.5 - k as f32,
            })
            .collect(),
        samples: 8,
        loss_mean: 1.25,
        loss_m2: 0.5,
    };
    let announce = RoundAnnounce {
        job: "fuzz".into(),
        round: 1,
        model_version: 0,
        weights_hash: weights.hash(),
        perturbations_per_client: 16,
        eps: 1e-3,
        deadline_unix_ms: 1_700_000_000_000,
        selection: ClientSelection::Clients(vec!["a".into(), "b".into()]),
        task: TaskParams {
            extra: vec![("head_per_direction".into(), "4".into())],
            ..TaskParams::default()
        },
        seed_base: 7,
        extend: 0,
    };
    let commit = RoundCommit {
        round: 1,
        base_version: 0,
        new_version: 1,
        step: wire::CommitStep::Pairs(vec![fwdllm_shared::update::SeedCoeff {
            seed: 3,
            coeff: -0.25,
        }]),
        weights_hash: WeightsHash([9; 32]),
    };
    let dense_commit = RoundCommit {
        step: wire::CommitStep::Dense(vec![0.5, -0.25, 1e-3]),
        ..commit.clone()
    };
    put("wire", "announce.bin", &wire::encode(&announce))?;
    put("wire", "update.bin", &wire::encode(&update))?;
    put("wire", "commit.bin", &wire::encode(&commit))?;
    put("wire", "commit-dense.bin", &wire::encode(&dense_commit))?;
    put(
        "wire",
        "checkpoint.bin",
        &wire::encode(&Checkpoint::from_weights(0, &weights)),
    )?;
    let mut status = AgentStatus::new("a", AgentState::Online);
    status.weights_hash = Some(weights.hash());
    put("wire", "status.json", &wire::encode_json(&status))?;
    put(
        "wire",
        "telemetry.json",
        &wire::encode_json(&Telemetry {
            client_id: "a".into(),
            temperature_c: Some(50.0),
            ..Default::default()
        }),
    )?;
    put(
        "wire",
        "metrics.json",
        &wire::encode_json(&AggregatorMetrics {
            job: "fuzz".into(),
            dp_epsilon: Some(1.5),
            ..Default::default()
        }),
    )?;
    put("ingest", "update.bin", &wire::encode(&update))?;
    let mut b_update = update.clone();
    b_update.client_id = "b".into();
    b_update.pairs.truncate(2);
    put("ingest", "update-b.bin", &wire::encode(&b_update))?;
    put("gguf", "adapter.gguf", &gguf::write_lora_adapter(&weights))?;
    put(
        "gguf",
        "adapter-head.gguf",
        &gguf::write_lora_adapter(&head),
    )?;
    let u32v = |k: &str, v: u32| (k.to_string(), GgufValue::U32(v));
    let model_kv = vec![
        (
            "general.architecture".to_string(),
            GgufValue::String("llama".into()),
        ),
        u32v("llama.block_count", 2),
        u32v("llama.embedding_length", 64),
        u32v("llama.attention.head_count", 4),
        u32v("llama.attention.head_count_kv", 2),
        u32v("llama.feed_forward_length", 128),
    ];
    put(
        "gguf",
        "model-header.gguf",
        &gguf::write_gguf_f32(&model_kv, &[]),
    )?;
    put(
        "aggregator_config",
        "small.toml",
        b"[job]\nname = \"j\"\n[model]\npreset = \"tiny\"\n[lora]\nhead_rows = 4\nmodules = []\n[round]\nquorum = 2\nmin_clients = 2\n[robust]\nmax_abs_g = 100.0\n[dp]\nenabled = true\n",
    )?;
    put(
        "agent_config",
        "small-env.toml",
        b"[agent]\nclient_id = \"pi-1\"\njob = \"j\"\n[mqtt]\nhost = \"127.0.0.1\"\nport = 1883\n\0FWDLLM_AGENT__MQTT__PORT=1884\nFWDLLM_AGENT__AGENT__CLIENT_ID=pi-2\n",
    )?;
    Ok(())
}
