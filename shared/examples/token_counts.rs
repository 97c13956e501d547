//! Token-count statistics of the BBC corpus from the model's GGUF header alone: what the
//! aggregator (no llama.cpp, no weights in memory) can tell about prompt lengths.
//!
//! ```text
//! cargo run -p fwdllm-shared --features tokenizer --example token_counts -- \
//!     [MODEL.gguf] [BBC_DIR] [BUDGET]
//! ```
//! Defaults (relative to the repository root): `.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf`,
//! `.cache/data/bbcnews`, budget 80 (the BBC task's `max_text_tokens`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use fwdllm_shared::tokenizer::GgufTokenizer;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("token_counts: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut args = std::env::args().skip(1);
    let model = args.next().map_or_else(
        || root.join(".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"),
        PathBuf::from,
    );
    let dir = args
        .next()
        .map_or_else(|| root.join(".cache/data/bbcnews"), PathBuf::from);
    let budget: usize = args.next().map_or(Ok(80), |s| s.parse())?;

    let t0 = Instant::now();
    let tok = GgufTokenizer::from_gguf(&model)?;
    let load = t0.elapsed();
    println!(
        "{}: {} tokens, pre-tokenizer {:?}, built from the header in {:.0} ms",
        model.display(),
        tok.vocab_size(),
        tok.pre(),
        load.as_secs_f64() * 1e3
    );

    let t1 = Instant::now();
    let mut counts = Vec::new();
    let mut bytes = 0usize;
    for file in txt_files(&dir)? {
        let raw = std::fs::read(&file).map_err(|e| format!("{}: {e}", file.display()))?;
        // As the agent's data module reads the corpus: lossy UTF-8, trimmed.
        let text = String::from_utf8_lossy(&raw);
        let text = text.trim();
        bytes += text.len();
        counts.push(tok.count(text)?);
    }
    if counts.is_empty() {
        return Err(format!("{}: no */*.txt files", dir.display()).into());
    }
    let elapsed = t1.elapsed();
    counts.sort_unstable();
    let n = counts.len();
    let total: usize = counts.iter().sum();
    let pct = |p: usize| counts[((n - 1) * p).div_ceil(100)];
    let over = counts.iter().filter(|&&c| c > budget).count();
    println!(
        "{n} articles, {total} tokens ({:.2} bytes/token), tokenized in {:.2} s ({:.1} MB/s)",
        bytes as f64 / total as f64,
        elapsed.as_secs_f64(),
        bytes as f64 / 1e6 / elapsed.as_secs_f64()
    );
    println!(
        "tokens per article: mean {:.1}, min {}, p50 {}, p95 {}, max {}",
        total as f64 / n as f64,
        counts[0],
        pct(50),
        pct(95),
        counts[n - 1]
    );
    println!(
        "{over}/{n} articles ({:.1}%) exceed a budget of {budget} tokens and are truncated",
        100.0 * over as f64 / n as f64
    );
    Ok(())
}

/// `<dir>/<label>/*.txt`, sorted.
fn txt_files(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let list = |d: &Path| -> Result<Vec<PathBuf>, String> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(d)
            .map_err(|e| format!("{}: {e}", d.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        v.sort();
        Ok(v)
    };
    let mut files = Vec::new();
    for sub in list(dir)?.into_iter().filter(|p| p.is_dir()) {
        files.extend(
            list(&sub)?
                .into_iter()
                .filter(|p| p.extension().is_some_and(|x| x == "txt")),
        );
    }
    Ok(files)
}
