//! `fwdllm-agent predict`: use a trained adapter on new text. Reads texts (one per line, or
//! JSONL objects with a text field) from a file or stdin, runs them through the engine with
//! an adapter — an exported GGUF, or the daemon's current replica from its state directory —
//! and writes one JSON object per text: the predicted label and every label's probability.
//! It runs the same engine path as `eval`, so its predictions on the held-out split give
//! `eval`'s accuracy.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{bail, Context};
use serde::Serialize;

use crate::cli_args::{EngineArgs, TaskArgs};
use crate::data::TaskConfig;
use crate::engine::Engine;

mod sft;

/// How the input is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InputFormat {
    /// JSONL if the first non-empty line is a JSON object, else lines.
    Auto,
    /// One text per line (empty lines skipped).
    Lines,
    /// One JSON object per line with the text in `--text-field`.
    Jsonl,
}

/// Classify texts with a trained adapter; writes JSONL with the label and probabilities.
#[derive(Debug, clap::Args)]
pub struct PredictArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub task: TaskArgs,
    /// GGUF LoRA adapter (e.g. an aggregator export or train-local's adapter.gguf).
    #[arg(long, conflicts_with = "state_dir")]
    pub adapter: Option<PathBuf>,
    /// An agent's state directory: use its current replica (`weights.bin`).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Allow running the base model without any adapter.
    #[arg(long)]
    pub base: bool,
    /// Input file (`-` = stdin).
    #[arg(long, default_value = "-")]
    pub input: PathBuf,
    #[arg(long, value_enum, default_value_t = InputFormat::Auto)]
    pub format: InputFormat,
    /// JSONL field holding the text.
    #[arg(long, default_value = "text")]
    pub text_field: String,
    /// Output file (`-` = stdout).
    #[arg(long, default_value = "-")]
    pub out: PathBuf,
}

/// One output line.
#[derive(Debug, Serialize)]
struct Prediction<'a> {
    /// 1-based line of the input the text came from.
    line: usize,
    label: &'a str,
    /// Label → probability, in the task's label order.
    probabilities: serde_json::Map<String, serde_json::Value>,
}

/// One input: a plain line, or a JSON object (JSONL input).
pub(crate) enum Input {
    Line(String),
    Object(serde_json::Value),
}

/// Reads `(line number, text)` pairs.
fn read_texts(args: &PredictArgs) -> anyhow::Result<Vec<(usize, String)>> {
    let name = args.input.display().to_string();
    read_inputs(args)?
        .into_iter()
        .map(|(n, input)| match input {
            Input::Line(l) => Ok((n, l)),
            Input::Object(v) => {
                let text = v
                    .get(&args.text_field)
                    .and_then(|t| t.as_str())
                    .with_context(|| {
                        format!(
                            "{name} line {n}: no string field `{}` (set --text-field)",
                            args.text_field
                        )
                    })?;
                Ok((n, text.to_string()))
            }
        })
        .collect()
}

/// Reads `(line number, input)` pairs: lines, or JSON objects (see [`InputFormat`]).
pub(crate) fn read_inputs(args: &PredictArgs) -> anyhow::Result<Vec<(usize, Input)>> {
    let name = args.input.display().to_string();
    let reader: Box<dyn BufRead> = if args.input.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::io::BufReader::new(
            std::fs::File::open(&args.input).with_context(|| format!("opening --input {name}"))?,
        ))
    };
    let mut lines = Vec::new();
    for (i, l) in reader.lines().enumerate() {
        let l = l.with_context(|| format!("reading {name} line {}", i + 1))?;
        if !l.trim().is_empty() {
            lines.push((i + 1, l));
        }
    }
    let jsonl = match args.format {
        InputFormat::Jsonl => true,
        InputFormat::Lines => false,
        InputFormat::Auto => lines
            .first()
            .is_some_and(|(_, l)| l.trim_start().starts_with('{')),
    };
    if !jsonl {
        return Ok(lines
            .into_iter()
            .map(|(n, l)| (n, Input::Line(l)))
            .collect());
    }
    lines
        .into_iter()
        .map(|(n, l)| {
            let v: serde_json::Value = serde_json::from_str(&l).with_context(|| {
                format!("{name} line {n}: not a JSON object (use --format lines for plain text)")
            })?;
            Ok((n, Input::Object(v)))
        })
        .collect()
}

/// Sets the adapter the arguments name on `e`.
pub(crate) fn set_adapter(e: &mut Engine, args: &PredictArgs) -> anyhow::Result<String> {
    if let Some(a) = &args.adapter {
        if !a.is_file() {
            bail!(
                "adapter {} does not exist; pass a GGUF LoRA exported by `fwdllm-aggregator export` or written by train-local",
                a.display()
            );
        }
        e.set_adapter_file(a)
            .with_context(|| format!("loading adapter {}", a.display()))?;
        return Ok(a.display().to_string());
    }
    if let Some(dir) = &args.state_dir {
        let path = dir.join("weights.bin");
        let bytes = std::fs::read(&path).with_context(|| {
            format!(
                "reading {}: is {} an agent state directory that has synced a replica?",
                path.display(),
                dir.display()
            )
        })?;
        let checkpoint: fwdllm_shared::wire::Checkpoint = fwdllm_shared::wire::decode(&bytes)
            .with_context(|| format!("decoding {}", path.display()))?;
        let weights = checkpoint
            .to_weights()
            .with_context(|| format!("{}: replica is corrupt", path.display()))?;
        e.set_adapter(&weights).with_context(|| {
            format!(
                "setting the replica of {} (version {})",
                dir.display(),
                checkpoint.model_version
            )
        })?;
        return Ok(format!(
            "{} (replica version {})",
            path.display(),
            checkpoint.model_version
        ));
    }
    if args.base {
        return Ok("none (base model)".into());
    }
    bail!("predict needs --adapter FILE or --state-dir DIR (or --base for the model without an adapter)")
}

/// Opens `--out` (`-` = stdout).
pub(crate) fn open_out(args: &PredictArgs) -> anyhow::Result<Box<dyn Write>> {
    Ok(if args.out.as_os_str() == "-" {
        Box::new(std::io::stdout().lock())
    } else {
        Box::new(std::io::BufWriter::new(
            std::fs::File::create(&args.out)
                .with_context(|| format!("creating --out {}", args.out.display()))?,
        ))
    })
}

/// Runs `predict`: label probabilities for a classification task, greedy generations for an
/// instruction task (`crate::predict::sft`).
pub fn run(args: PredictArgs) -> anyhow::Result<()> {
    let tcfg = match args.task.task_file()? {
        crate::data::TaskFile::Sft(t) => return sft::run(args, t),
        crate::data::TaskFile::Classification(t) => t,
    };
    let texts = read_texts(&args)?;
    let mut e = Engine::load(&args.engine.config())?;
    e.set_task(&tcfg)?;
    let which = set_adapter(&mut e, &args)?;
    log::info!(
        "predict: {} texts, task {}, adapter {which}, {}",
        texts.len(),
        tcfg.name,
        e.describe_path()
    );
    let task = e.task().cloned().context("task")?;
    let mut out = open_out(&args)?;
    for chunk in texts.chunks(8) {
        let refs: Vec<&str> = chunk.iter().map(|(_, t)| t.as_str()).collect();
        let probs = e.label_probabilities(&task, &refs)?;
        for ((line, _), p) in chunk.iter().zip(&probs) {
            writeln!(
                out,
                "{}",
                serde_json::to_string(&prediction(&tcfg, *line, p))?
            )?;
        }
    }
    out.flush()?;
    Ok(())
}

fn prediction<'a>(task: &'a TaskConfig, line: usize, p: &[f64]) -> Prediction<'a> {
    // First maximum wins, as in the loss's predictions.
    let mut best = 0;
    for k in 1..p.len() {
        if p[k] > p[best] {
            best = k;
        }
    }
    let probabilities = task
        .labels
        .iter()
        .zip(p)
        .map(|(l, &x)| (l.clone(), serde_json::json!(x)))
        .collect();
    Prediction {
        line,
        label: &task.labels[best],
        probabilities,
    }
}
