//! Fixed-seed train / dev / held-out splits and per-client shards (IID or Dirichlet over the
//! labels), and writing shards as JSONL for the agents.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::{io_err, DataError, Example};

/// The pinned generator of splits and shards (it lives in `shared`, next to `mix64`).
pub use fwdllm_shared::perturb::SplitMix64;

/// Train / dev / held-out partition of a task's examples (classification by default, or
/// [`super::SftExample`]s).
#[derive(Debug, Clone)]
pub struct Split<T = Example> {
    pub train: Vec<T>,
    pub dev: Vec<T>,
    pub heldout: Vec<T>,
}

/// Fixed-seed shuffle, then the first `heldout` examples are held out, the next `dev` are dev.
pub fn split<T>(mut examples: Vec<T>, seed: u64, heldout: usize, dev: usize) -> Split<T> {
    SplitMix64::new(seed ^ SPLIT_DOMAIN).shuffle(&mut examples);
    let h = heldout.min(examples.len());
    let d = dev.min(examples.len() - h);
    let rest = examples.split_off(h + d);
    let dev_v = examples.split_off(h);
    Split {
        train: rest,
        dev: dev_v,
        heldout: examples,
    }
}

/// Domain separation for the split stream, so a split seed never replays a shard stream.
const SPLIT_DOMAIN: u64 = 0x5EED_5011_7000_0001;
/// Domain separation for the shard stream.
pub(crate) const SHARD_DOMAIN: u64 = 0x5A4D_0000_0000_0002;

/// Partition of examples into client shards.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Partition {
    /// Shuffled, then dealt round-robin.
    Iid,
    /// Per label, client proportions drawn from Dirichlet(alpha) (FwdLLM's non-IID split);
    /// small alpha = each client sees few labels.
    Dirichlet { alpha: f64 },
}

/// Marsaglia–Tsang Gamma(shape, 1) sampler (with the shape<1 boost); hand-written because the
/// only other need for `rand_distr` would be this one function.
fn gamma(rng: &mut SplitMix64, shape: f64) -> f64 {
    if shape < 1.0 {
        let u = rng.unit();
        return gamma(rng, shape + 1.0) * u.powf(1.0 / shape);
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        // Standard normal via Box-Muller.
        let (u1, u2) = (rng.unit(), rng.unit());
        let x = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
        let v = (1.0 + c * x).powi(3);
        if v <= 0.0 {
            continue;
        }
        let u = rng.unit();
        if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
            return d * v;
        }
    }
}

/// Splits `examples` into `clients` shards (deterministic in `seed`).
pub fn shard(
    examples: &[Example],
    clients: usize,
    partition: Partition,
    seed: u64,
) -> Vec<Vec<Example>> {
    match partition {
        Partition::Iid => shard_iid(examples, clients, seed),
        Partition::Dirichlet { alpha } => shard_dirichlet(examples, clients, alpha, seed),
    }
}

/// IID shards of any examples: shuffled with the shard stream of `seed`, dealt round-robin
/// to `clients` shards.
pub fn shard_iid<T: Clone>(examples: &[T], clients: usize, seed: u64) -> Vec<Vec<T>> {
    let clients = clients.max(1);
    let mut idx: Vec<usize> = (0..examples.len()).collect();
    SplitMix64::new(seed ^ SHARD_DOMAIN).shuffle(&mut idx);
    let mut shards = vec![Vec::new(); clients];
    for (i, &j) in idx.iter().enumerate() {
        shards[i % clients].push(examples[j].clone());
    }
    shards
}

/// Per label, client proportions drawn from Dirichlet(alpha) ([`Partition::Dirichlet`]).
fn shard_dirichlet(
    examples: &[Example],
    clients: usize,
    alpha: f64,
    seed: u64,
) -> Vec<Vec<Example>> {
    let clients = clients.max(1);
    let mut rng = SplitMix64::new(seed ^ SHARD_DOMAIN);
    let mut shards = vec![Vec::new(); clients];
    let n_labels = examples.iter().map(|e| e.label + 1).max().unwrap_or(0);
    for label in 0..n_labels {
        let mut idx: Vec<usize> = (0..examples.len())
            .filter(|&i| examples[i].label == label)
            .collect();
        rng.shuffle(&mut idx);
        let w: Vec<f64> = (0..clients)
            .map(|_| gamma(&mut rng, alpha.max(1e-3)))
            .collect();
        let total: f64 = w.iter().sum();
        // Cumulative cut points; the last client takes the remainder.
        let mut start = 0usize;
        let mut acc = 0.0;
        for (c, wc) in w.iter().enumerate() {
            acc += wc / total;
            let end = if c + 1 == clients {
                idx.len()
            } else {
                ((acc * idx.len() as f64).round() as usize).min(idx.len())
            };
            for &j in &idx[start..end.max(start)] {
                shards[c].push(examples[j].clone());
            }
            start = end.max(start);
        }
    }
    shards
}

/// Writes shards as `<dir>/shard-<i>.jsonl` (`{"text":..., "label": "<label name>"}`), readable
/// back through [`super::DataSource::Jsonl`] with the same task labels.
pub fn write_shards(
    dir: &Path,
    shards: &[Vec<Example>],
    labels: &[String],
) -> Result<Vec<PathBuf>, DataError> {
    write_jsonl_shards(
        dir,
        shards,
        |e| serde_json::json!({"text": e.text, "label": labels[e.label]}),
    )
}

/// Writes shards as `<dir>/shard-<i>.jsonl`, one `row(example)` per line.
pub(crate) fn write_jsonl_shards<T>(
    dir: &Path,
    shards: &[Vec<T>],
    row: impl Fn(&T) -> serde_json::Value,
) -> Result<Vec<PathBuf>, DataError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let mut paths = Vec::new();
    for (i, s) in shards.iter().enumerate() {
        let p = dir.join(format!("shard-{i:03}.jsonl"));
        let mut f = std::io::BufWriter::new(fs::File::create(&p).map_err(io_err(&p))?);
        for e in s {
            writeln!(f, "{}", row(e)).map_err(io_err(&p))?;
        }
        f.flush().map_err(io_err(&p))?;
        paths.push(p);
    }
    Ok(paths)
}
