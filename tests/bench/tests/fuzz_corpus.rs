//! The committed fuzz corpus (`fuzz/corpus/<target>/`, plus the shipped example configs for
//! the config loaders) replayed on the stable toolchain through the same target functions the
//! cargo-fuzz targets call (`fwdllm_bench::fuzz::TARGETS`): an input that once crashed, added
//! to the corpus, stays a regression test of `make test`.

use std::path::PathBuf;

use fwdllm_bench::fuzz::{self, TARGETS};

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus")
}

#[test]
fn every_target_has_a_corpus_and_a_cargo_fuzz_target() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let manifest = std::fs::read_to_string(root.join("fuzz/Cargo.toml")).expect("fuzz/Cargo.toml");
    for (name, _) in TARGETS {
        assert!(
            corpus_dir().join(name).is_dir(),
            "no fuzz/corpus/{name}/ for target {name}"
        );
        let source = root.join(format!("fuzz/fuzz_targets/{name}.rs"));
        let text = std::fs::read_to_string(&source)
            .unwrap_or_else(|e| panic!("{}: {e}", source.display()));
        assert!(
            text.contains(&format!("fwdllm_bench::fuzz::{name}_target(")),
            "{} must call fwdllm_bench::fuzz::{name}_target",
            source.display()
        );
        assert!(
            manifest.contains(&format!("name = \"{name}\"")),
            "fuzz/Cargo.toml has no bin {name}"
        );
    }
}

#[test]
fn the_committed_corpus_replays_without_a_panic() {
    let mut replayed = 0;
    for (name, target) in TARGETS {
        let inputs = fuzz::corpus(&corpus_dir(), name).expect("corpus");
        assert!(!inputs.is_empty(), "corpus of {name} is empty");
        for input in &inputs {
            target(input);
        }
        replayed += inputs.len();
    }
    assert!(replayed >= TARGETS.len());
}
