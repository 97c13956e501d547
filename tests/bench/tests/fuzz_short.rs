//! The short fuzz run of `make test` (the long one is `make fuzz`): mutated inputs through the
//! wire decoder, the update ingest, the GGUF reader and the aggregator's config loader, 0 panics.
//! The agent's config loader has its own short run in `tests/tests/fuzz_agent_config.rs`.

use std::path::PathBuf;

use fwdllm_bench::fuzz::{self, IngestTarget, Target};
use fwdllm_shared::wire::{self, ClientUpdate};

/// Per target: enough to cover every mutation kind on every corpus entry many times over in a
/// debug build (about a second each).
const EXECUTIONS: u64 = 20_000;

fn corpus(name: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus");
    let c = fuzz::corpus(&dir, name).expect("corpus");
    assert!(!c.is_empty(), "corpus of {name} is empty");
    c
}

fn check(mut t: Target<'_>) {
    let r = fuzz::fuzz(&mut t, EXECUTIONS, 1);
    assert_eq!(r.executions, EXECUTIONS);
    assert_eq!(r.crashes, 0, "{}: {:?}", r.target, r.crash_messages);
}

#[test]
fn wire_decoder_never_panics() {
    check(Target {
        name: "wire",
        corpus: corpus("wire"),
        text: false,
        max_len: 1 << 16,
        structured: Some(fuzz::mutate_update),
        run: Box::new(fuzz::wire_target),
    });
}

#[test]
fn update_ingest_never_panics() {
    let mut ingest = IngestTarget::new().unwrap();
    check(Target {
        name: "ingest",
        corpus: corpus("ingest"),
        text: false,
        max_len: 1 << 14,
        structured: Some(fuzz::mutate_update),
        run: Box::new(|b: &[u8]| ingest.run(b)),
    });
}

#[test]
fn gguf_reader_never_panics() {
    check(Target {
        name: "gguf",
        corpus: corpus("gguf"),
        text: false,
        max_len: 1 << 16,
        structured: None,
        run: Box::new(fuzz::gguf_target),
    });
}

#[test]
fn aggregator_config_loader_never_panics() {
    check(Target {
        name: "aggregator_config",
        corpus: corpus("aggregator_config"),
        text: true,
        max_len: 1 << 14,
        structured: None,
        run: Box::new(fuzz::aggregator_config_target),
    });
}

/// The corpus is what it claims: valid inputs the targets accept unmutated.
#[test]
fn corpus_entries_are_valid_inputs() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus");
    for name in ["wire/update.bin", "ingest/update.bin"] {
        wire::decode::<ClientUpdate>(&std::fs::read(dir.join(name)).unwrap()).expect(name);
    }
    for f in corpus("gguf") {
        fwdllm_shared::gguf::read_gguf(&f).expect("gguf seed parses");
    }
    for f in corpus("aggregator_config") {
        let cfg = fwdllm_aggregator::config::AggregatorConfig::from_toml(
            std::str::from_utf8(&f).unwrap(),
        )
        .expect("config seed parses");
        assert_eq!(cfg.validate(), vec![]);
    }
}

/// The harness finds a planted bug reachable only by mutating a seed (a decodable update of
/// exactly three pairs; the seeds have four or two), so a clean report means something.
#[test]
fn the_harness_finds_a_planted_panic() {
    let mut t = Target {
        name: "planted",
        corpus: corpus("ingest"),
        text: false,
        max_len: 1 << 14,
        structured: Some(fuzz::mutate_update),
        run: Box::new(|b: &[u8]| {
            if let Ok(u) = wire::decode::<ClientUpdate>(b) {
                assert_ne!(u.pairs.len(), 3, "planted");
            }
        }),
    };
    let r = fuzz::fuzz(&mut t, EXECUTIONS, 1);
    assert!(r.crashes > 0, "{r:?}");
    assert!(
        r.crash_messages[0].contains("planted"),
        "{:?}",
        r.crash_messages
    );
    assert!(wire::decode::<ClientUpdate>(&r.crash_inputs[0]).is_ok());
}
