//! What the tests on the real SmolLM2-135M model of the set-up cache share: where the
//! repository, the model and the prepared copies are, and running `fwdllm-agent predict`.

// Each test binary uses its part.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root.
pub(crate) fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The shipped (quantised) model; `make setup` downloads it.
pub(crate) fn model() -> PathBuf {
    let model = root().join(".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        model.is_file(),
        "{} missing: run `make setup` first",
        model.display()
    );
    model
}

/// Where `prepare` caches the converted copies of the model.
pub(crate) fn cache_dir() -> PathBuf {
    root().join(".cache/prepared")
}

/// `fwdllm-agent predict` of `input` with `task` and `adapter`, on the model, one thread, no
/// prefix states on disk; `extra` arguments too.
pub(crate) fn predict(task: &Path, adapter: &Path, input: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fwdllm-agent"))
        .args(["predict", "--threads", "1", "--no-prefix-cache-disk"])
        .args(extra)
        .arg("--model")
        .arg(model())
        .arg("--cache-dir")
        .arg(cache_dir())
        .arg("--task")
        .arg(task)
        .arg("--adapter")
        .arg(adapter)
        .arg("--input")
        .arg(input)
        .output()
        .unwrap()
}

/// The JSON lines a successful run wrote to stdout (a failed run fails with its stderr).
pub(crate) fn jsonl_stdout(out: Output) -> Vec<serde_json::Value> {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The first `n` held-out examples of the headline task (AG News description → title), cut
/// short (24 text and 8 response tokens) to keep tests fast.
pub(crate) fn headline(
    e: &fwdllm_agent::engine::Engine,
    n: usize,
) -> Vec<fwdllm_agent::data::SftExample> {
    let fwdllm_agent::data::TaskFile::Sft(mut t) = fwdllm_agent::data::TaskFile::from_file(
        &root().join("edge-agent/tasks/ag_news_headline.toml"),
    )
    .unwrap() else {
        panic!("headline task is sft")
    };
    t.max_text_tokens = 24;
    t.max_response_tokens = 8;
    let ex = t
        .load_examples(&root(), &|s, k| e.truncate_text(s, k))
        .unwrap();
    fwdllm_agent::data::sft::split_sft(ex, &t).heldout[..n].to_vec()
}
