//! Short fuzz run of the agent's config loader (TOML plus `FWDLLM_AGENT__*` environment
//! overrides) for `make test`; `make fuzz` runs ≥ 10M executions. 0 panics.

use std::path::PathBuf;

use fwdllm_bench::fuzz::{self, Target};

#[test]
fn agent_config_loader_never_panics() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus");
    let corpus = fuzz::corpus(&dir, "agent_config").expect("corpus");
    assert!(corpus.len() >= 2);
    let mut t = Target {
        name: "agent_config",
        corpus,
        text: true,
        max_len: 1 << 14,
        structured: None,
        run: Box::new(fuzz::agent_config_target),
    };
    let r = fuzz::fuzz(&mut t, 20_000, 1);
    assert_eq!(r.crashes, 0, "{:?}", r.crash_messages);
}
