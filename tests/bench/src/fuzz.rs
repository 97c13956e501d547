//! Mutation fuzzing of everything that parses untrusted input: the wire decoder, the
//! aggregator's update ingest, the GGUF reader and the config loaders.
//!
//! A property loop on stable Rust, no coverage instrumentation (cargo-fuzz needs nightly):
//! each execution takes a corpus entry (`fuzz/corpus/<target>/`, small valid inputs) or a
//! fresh random input, applies 1–8 structure-blind mutations (bit flips, interesting integers
//! at random offsets, inserts, deletes, duplicated and spliced chunks, truncation, dictionary
//! tokens for text) and runs the target under `catch_unwind`. A target checks properties
//! beyond "no panic" where it can (a decoded message re-encodes to bytes that decode to the
//! same encoding). Panics are counted and the input is returned so the caller can save it;
//! any panic is a bug to fix at its cause. Deterministic for a given seed.
//!
//! The target functions (`wire_target`, [`ingest_target`], `gguf_target`,
//! `aggregator_config_target`, `agent_config_target`; [`TARGETS`]) are what the coverage-guided
//! cargo-fuzz targets of `fuzz/fuzz_targets/` call (`make fuzz`, nightly) and what
//! `tests/bench/tests/fuzz_corpus.rs` replays the committed corpus through in `make test`
//! (stable). `tests/bench/tests/fuzz_short.rs` runs a short loop of this mutator in `make test`;
//! the `fuzz` binary runs it at length.

use std::panic::{self, AssertUnwindSafe};
use std::path::Path;
use std::time::Instant;

use fwdllm_shared::gguf;
use fwdllm_shared::wire::{
    self, AgentStatus, AggregatorMetrics, Checkpoint, ClientUpdate, RoundAnnounce, RoundCommit,
    Telemetry, WireMessage,
};
use serde::Serialize;

/// SplitMix64: small, fast, good enough to drive mutations.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    0x7f,
    0x80,
    0xff,
    0x100,
    0x7fff,
    0x8000,
    0xffff,
    0x1_0000,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x1_0000_0000,
    0x7fff_ffff_ffff_ffff,
    0x8000_0000_0000_0000,
    u64::MAX,
    // f32 NaN, +inf, -inf, 1e30, largest finite.
    0x7fc0_0000,
    0x7f80_0000,
    0xff80_0000,
    0x7149_f2ca,
    0x7f7f_ffff,
];

/// Tokens spliced into text inputs (TOML configs).
const TEXT_DICT: &[&str] = &[
    "=",
    "[",
    "]",
    "[[",
    "]]",
    "{",
    "}",
    ",",
    ".",
    "\"",
    "'",
    "'''",
    "\"\"\"",
    "\n",
    "#",
    "\\u0000",
    "\\",
    "nan",
    "inf",
    "-inf",
    "+nan",
    "1e999",
    "-1",
    "0",
    "0.0",
    "-0.0",
    "18446744073709551616",
    "9223372036854775807",
    "-9223372036854775808",
    "4294967296",
    "1e-320",
    "true",
    "false",
    "1979-05-27T07:32:00Z",
    "[]",
    "{}",
    "[job]",
    "[broker]",
    "[round]",
    "[robust]",
    "[dp]",
    "[mqtt]",
    "[agent]",
    "[engine]",
    "[gradient]",
    "[lora]",
    "[limits]",
    "[tls]",
    "\u{1F600}",
    "\u{0}",
    "/dev/null",
    "FWDLLM_AGENT__MQTT__PORT",
    "FWDLLM_AGENT__",
    "__",
];

/// Applies 1–8 random mutations to `data` (`other` = another corpus entry for splicing;
/// `text` adds dictionary tokens). The result is at most `max_len` bytes.
pub fn mutate(rng: &mut Rng, data: &mut Vec<u8>, other: &[u8], text: bool, max_len: usize) {
    let n = 1 + rng.below(8);
    for _ in 0..n {
        let len = data.len();
        match rng.below(if text { 11 } else { 10 }) {
            0 if len > 0 => {
                let i = rng.below(len);
                data[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                data[i] = rng.next_u64() as u8;
            }
            2 if len > 0 => {
                // An interesting integer, 1/2/4/8 bytes little-endian (or big-endian).
                let v = INTERESTING[rng.below(INTERESTING.len())];
                let w = [1usize, 2, 4, 8][rng.below(4)];
                let bytes = if rng.below(2) == 0 {
                    v.to_le_bytes()
                } else {
                    v.to_be_bytes()
                };
                let bytes = if rng.below(2) == 0 {
                    &bytes[..w]
                } else {
                    &bytes[8 - w..]
                };
                let i = rng.below(len);
                for (k, b) in bytes.iter().enumerate() {
                    if i + k < len {
                        data[i + k] = *b;
                    }
                }
            }
            3 => {
                let i = rng.below(len + 1);
                let k = 1 + rng.below(16);
                let fill: Vec<u8> = (0..k).map(|_| rng.next_u64() as u8).collect();
                data.splice(i..i, fill);
            }
            4 if len > 0 => {
                let i = rng.below(len);
                let k = 1 + rng.below((len - i).min(32));
                data.drain(i..i + k);
            }
            5 if len > 0 => {
                // Duplicate a chunk somewhere else.
                let i = rng.below(len);
                let k = 1 + rng.below((len - i).min(64));
                let chunk = data[i..i + k].to_vec();
                let at = rng.below(len + 1);
                data.splice(at..at, chunk);
            }
            6 if len > 0 => data.truncate(rng.below(len)),
            7 if !other.is_empty() => {
                // Splice: our head, the other's tail.
                let i = rng.below(len + 1);
                let j = rng.below(other.len());
                data.truncate(i);
                data.extend_from_slice(&other[j..]);
            }
            8 if len > 0 => {
                // Repeat one byte many times (long strings, deep nesting).
                let i = rng.below(len);
                let b = data[i];
                let k = [16usize, 256, 4096][rng.below(3)];
                data.splice(i..i, std::iter::repeat_n(b, k));
            }
            9 if len > 1 => {
                let (a, b) = (rng.below(len), rng.below(len));
                data.swap(a, b);
            }
            10 => {
                let t = TEXT_DICT[rng.below(TEXT_DICT.len())].as_bytes();
                let i = rng.below(len + 1);
                if rng.below(2) == 0 || len == 0 {
                    data.splice(i..i, t.iter().copied());
                } else {
                    let end = (i + t.len()).min(len);
                    data.splice(i..end, t.iter().copied());
                }
            }
            _ => {}
        }
    }
    data.truncate(max_len);
}

/// Floats that break naive arithmetic.
const INTERESTING_F32: &[f32] = &[
    f32::NAN,
    f32::INFINITY,
    f32::NEG_INFINITY,
    f32::MAX,
    f32::MIN,
    f32::MIN_POSITIVE,
    1e-45,
    -0.0,
    0.0,
    1.0,
    -1.0,
    1e4,
    10_000.001,
    -1e30,
    3.4e38,
];

/// Structure-aware mutation of a `ClientUpdate` (other inputs get blind mutations): add,
/// drop, duplicate or reorder pairs, set a g, seed, round, seq or version to an interesting
/// value, rename the client; then re-encode.
pub fn mutate_update(rng: &mut Rng, bytes: &mut Vec<u8>) {
    let Ok(mut u) = wire::decode::<ClientUpdate>(bytes) else {
        return mutate(rng, bytes, &[], false, 1 << 16);
    };
    for _ in 0..1 + rng.below(4) {
        let n = u.pairs.len();
        match rng.below(9) {
            0 => u.pairs.push(wire::SeedScalar {
                seed: rng.next_u64(),
                g: INTERESTING_F32[rng.below(INTERESTING_F32.len())],
            }),
            1 if n > 0 => {
                u.pairs.remove(rng.below(n));
            }
            2 if n > 0 => {
                let p = u.pairs[rng.below(n)];
                u.pairs.push(p);
            }
            3 if n > 0 => {
                let i = rng.below(n);
                u.pairs[i].g = if rng.below(2) == 0 {
                    INTERESTING_F32[rng.below(INTERESTING_F32.len())]
                } else {
                    u.pairs[i].g * [1e3f32, -1.0, -1e3, 1e-3][rng.below(4)]
                };
            }
            4 if n > 0 => {
                let i = rng.below(n);
                u.pairs[i].seed = INTERESTING[rng.below(INTERESTING.len())];
            }
            5 => u.round = INTERESTING[rng.below(INTERESTING.len())],
            6 => u.seq = INTERESTING[rng.below(INTERESTING.len())] as u32,
            7 => u.base_version = INTERESTING[rng.below(INTERESTING.len())],
            8 => {
                let k = 1 + rng.below(64);
                u.pairs.extend((0..k).map(|_| wire::SeedScalar {
                    seed: rng.next_u64(),
                    g: (rng.next_u64() as i64 as f64 / 1e18) as f32,
                }));
            }
            _ => u.client_id = ["a", "b", "", "a/b", "c"][rng.below(5)].into(),
        }
    }
    *bytes = wire::encode(&u);
}

/// One fuzz target: a name, its seed inputs, whether inputs are text, and the function under test.
pub struct Target<'a> {
    pub name: &'static str,
    pub corpus: Vec<Vec<u8>>,
    pub text: bool,
    pub max_len: usize,
    /// Structure-aware mutation tried on half of the inputs (e.g. [`mutate_update`]): blind
    /// byte mutations rarely keep a postcard message decodable while changing its counts.
    pub structured: Option<fn(&mut Rng, &mut Vec<u8>)>,
    pub run: RunFn<'a>,
}

/// The function under test of a [`Target`].
pub type RunFn<'a> = Box<dyn FnMut(&[u8]) + 'a>;

/// Result of fuzzing one target.
#[derive(Debug, Clone, Serialize)]
pub struct TargetReport {
    pub target: String,
    pub executions: u64,
    pub crashes: u64,
    pub seconds: f64,
    pub corpus_files: usize,
    /// First crash messages (at most 5).
    pub crash_messages: Vec<String>,
    /// Inputs of the first crashes (at most 5), to save and replay.
    #[serde(skip)]
    pub crash_inputs: Vec<Vec<u8>>,
}

/// Runs `executions` mutated inputs through `target`.
pub fn fuzz(target: &mut Target<'_>, executions: u64, seed: u64) -> TargetReport {
    let mut rng = Rng::new(seed ^ blake3_u64(target.name));
    let started = Instant::now();
    let mut crashes = 0;
    let mut messages = Vec::new();
    let mut inputs = Vec::new();
    let previous = panic::take_hook();
    // Silence the default hook: a crash is reported once, with its input, not as a backtrace
    // per execution. The message is kept for the report.
    panic::set_hook(Box::new(|info| {
        LAST_PANIC.with(|m| *m.borrow_mut() = info.to_string());
    }));
    let mut buf = Vec::new();
    for i in 0..executions {
        buf.clear();
        let fresh = target.corpus.is_empty() || rng.below(16) == 0;
        if fresh {
            let n = rng.below(256);
            buf.extend((0..n).map(|_| rng.next_u64() as u8));
        } else {
            buf.extend_from_slice(&target.corpus[rng.below(target.corpus.len())]);
        }
        // 1 in 64 executions runs a corpus entry unmutated (it must pass too).
        if fresh || i % 64 != 0 {
            let other = if target.corpus.is_empty() {
                &[][..]
            } else {
                &target.corpus[rng.below(target.corpus.len())][..]
            };
            match target.structured {
                Some(f) if rng.below(2) == 0 => f(&mut rng, &mut buf),
                _ => mutate(&mut rng, &mut buf, other, target.text, target.max_len),
            }
        }
        let run = &mut target.run;
        if panic::catch_unwind(AssertUnwindSafe(|| run(&buf))).is_err() {
            crashes += 1;
            if messages.len() < 5 {
                messages.push(LAST_PANIC.with(|m| m.borrow().clone()));
                inputs.push(buf.clone());
            }
        }
    }
    panic::set_hook(previous);
    TargetReport {
        target: target.name.to_string(),
        executions,
        crashes,
        seconds: started.elapsed().as_secs_f64(),
        corpus_files: target.corpus.len(),
        crash_messages: messages,
        crash_inputs: inputs,
    }
}

thread_local! {
    static LAST_PANIC: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

fn blake3_u64(s: &str) -> u64 {
    let h = blake3::hash(s.as_bytes());
    u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"))
}

/// The files of `dir` (sorted by name), as corpus entries.
pub fn load_corpus(dir: &Path) -> std::io::Result<Vec<Vec<u8>>> {
    let mut names: Vec<_> = std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    names.sort();
    names.iter().map(std::fs::read).collect()
}

/// The corpus of `target`: the files of `dir/target` plus, for the config loaders, the shipped
/// example configs as they are now (so the seeds never drift from the real files).
pub fn corpus(dir: &Path, target: &str) -> std::io::Result<Vec<Vec<u8>>> {
    let mut c = load_corpus(&dir.join(target))?;
    match target {
        "aggregator_config" => {
            c.push(include_bytes!("../../../systemd/fwdllm-aggregator.toml").to_vec())
        }
        "agent_config" => c.push(include_bytes!("../../../systemd/fwdllm-agent.toml").to_vec()),
        _ => {}
    }
    Ok(c)
}

/// Decodes as `T`; a message that decodes must re-encode to bytes that decode to the same
/// encoding (compared as bytes: NaN payloads make `PartialEq` useless here).
fn roundtrip<T: WireMessage>(bytes: &[u8]) {
    if let Ok(m) = wire::decode::<T>(bytes) {
        let once = wire::encode(&m);
        let again = wire::decode::<T>(&once).expect("a re-encoded message decodes");
        assert_eq!(wire::encode(&again), once, "re-encoding is stable");
    }
}

/// The wire decoder: every binary kind, the kind peek and every JSON message.
pub fn wire_target(bytes: &[u8]) {
    let _ = wire::peek_kind(bytes);
    roundtrip::<RoundAnnounce>(bytes);
    roundtrip::<ClientUpdate>(bytes);
    roundtrip::<RoundCommit>(bytes);
    if let Ok(c) = wire::decode::<Checkpoint>(bytes) {
        // The receiver's next step with a checkpoint: rebuild and verify the weights.
        let _ = c.to_weights();
    }
    let _ = wire::decode_json::<AgentStatus>(bytes);
    let _ = wire::decode_json::<Telemetry>(bytes);
    let _ = wire::decode_json::<AggregatorMetrics>(bytes);
}

/// The GGUF reader: whole-file and header-only reads, then what callers do with a file.
pub fn gguf_target(bytes: &[u8]) {
    if let Ok(f) = gguf::read_gguf(bytes) {
        let _ = f.model_shape();
        for n_embd in [0, 1, 64, 576] {
            let _ = gguf::read_adapter_head(&f, n_embd);
        }
        let names: Vec<String> = f.tensors.iter().map(|t| t.name.clone()).collect();
        for name in names {
            let _ = f.tensor_data(&name);
            let _ = f.tensor_f32(&name);
        }
    }
    if let Ok(f) = gguf::read_gguf_header(bytes) {
        let _ = f.model_shape();
    }
}

/// The aggregator's TOML config: parse, then validate.
pub fn aggregator_config_target(bytes: &[u8]) {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    if let Ok(cfg) = fwdllm_aggregator::config::AggregatorConfig::from_toml(text) {
        let _ = cfg.validate();
    }
}

/// The aggregator's ingest of updates (decode, checks, pooling, robust step, commit) on a live
/// coordinator of the tiny layout with two selected clients. A decodable input is sent as is
/// and also re-addressed to the open request, so the checks past "stale round" are reached.
pub struct IngestTarget {
    coord: fwdllm_aggregator::coordinator::Coordinator,
    now: u64,
    _dir: tempfile::TempDir,
}

impl IngestTarget {
    pub fn new() -> std::io::Result<IngestTarget> {
        let dir = tempfile::tempdir()?;
        let mut cfg = fwdllm_aggregator::config::AggregatorConfig::tiny("fuzz", dir.path());
        cfg.round.min_clients = 2;
        cfg.round.perturbations_per_client = 16;
        cfg.pacing.max_perturbations = 24;
        let mut coord = fwdllm_aggregator::coordinator::Coordinator::open(cfg)
            .map_err(std::io::Error::other)?;
        for id in ["a", "b"] {
            let s = wire::AgentStatus::new(id, wire::AgentState::Online);
            coord.on_status(id, &wire::encode_json(&s), 0);
        }
        Ok(IngestTarget {
            coord,
            now: 1,
            _dir: dir,
        })
    }

    pub fn run(&mut self, bytes: &[u8]) {
        let who = if bytes.first().is_some_and(|b| b & 1 == 1) {
            "a"
        } else {
            "b"
        };
        self.deliver(who, bytes);
    }

    /// `bytes` from `who` as is, then re-addressed to the open request.
    fn deliver(&mut self, who: &str, bytes: &[u8]) {
        self.now += 1;
        self.coord.on_update(who, bytes, self.now);
        if let (Ok(mut u), Some(open)) = (
            wire::decode::<ClientUpdate>(bytes),
            self.coord.open_round().cloned(),
        ) {
            u.round = open.round;
            u.base_version = open.base_version;
            u.seq = u.seq.min(open.extend);
            u.client_id = who.into();
            self.coord.on_update(who, &wire::encode(&u), self.now);
        }
        // Deadlines pass too: every 256 inputs jump past the open round's.
        if self.now % 256 == 0 {
            if let Some(d) = self.coord.next_deadline_ms() {
                self.now = self.now.max(d);
            }
        }
        self.coord.tick(self.now);
        self.coord.take_outgoing();
        self.coord.take_events();
        self.coord.take_records();
    }
}

/// The update ingest for cargo-fuzz and the corpus replay: one input through a fresh
/// coordinator, from both clients (so the pooled pairs can reach a commit), then past the
/// round's deadline. The outcome depends on the input alone, so a crash replays from its file.
pub fn ingest_target(bytes: &[u8]) {
    let mut t = IngestTarget::new().expect("a coordinator in a temporary directory");
    t.deliver("a", bytes);
    t.deliver("b", bytes);
    if let Some(d) = t.coord.next_deadline_ms() {
        t.now = t.now.max(d);
    }
    t.coord.tick(t.now);
    t.coord.take_outgoing();
    t.coord.take_events();
    t.coord.take_records();
}

/// A target function: any input, no panic.
pub type TargetFn = fn(&[u8]);

/// The fuzz targets by name (the folders of `fuzz/corpus/` and the binaries of
/// `fuzz/fuzz_targets/`), each with the function both call.
pub const TARGETS: &[(&str, TargetFn)] = &[
    ("wire", wire_target),
    ("ingest", ingest_target),
    ("gguf", gguf_target),
    ("aggregator_config", aggregator_config_target),
    ("agent_config", agent_config_target),
];

/// What one libFuzzer run printed about itself (`make fuzz` reads it into `fuzz.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct LibFuzzerSummary {
    /// Inputs run: `Done N runs`, or the last `#N` status line when the run stopped early.
    pub execs: u64,
    /// `Done N runs in S second(s)`; None when the run did not finish (a crash).
    pub seconds: Option<u64>,
    /// Coverage of the last status line: edges (`cov:`) and features (`ft:`).
    pub cov: Option<u64>,
    pub ft: Option<u64>,
    /// Corpus units of the last status line (`corp: N/…`).
    pub corpus_units: Option<u64>,
    /// libFuzzer reported a crash (deadly signal, panic, leak, timeout, out of memory).
    pub crashed: bool,
}

/// Reads libFuzzer's output (its stderr); None when it holds no status line at all.
pub fn libfuzzer_summary(log: &str) -> Option<LibFuzzerSummary> {
    let field = |line: &str, key: &str| -> Option<u64> {
        let rest = &line[line.find(key)? + key.len()..];
        let digits: String = rest
            .trim_start()
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    };
    let mut s = LibFuzzerSummary {
        execs: 0,
        seconds: None,
        cov: None,
        ft: None,
        corpus_units: None,
        crashed: false,
    };
    let mut seen = false;
    for line in log.lines() {
        if let Some(rest) = line.strip_prefix('#') {
            let Some(n) = rest
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            seen = true;
            s.execs = s.execs.max(n);
            s.cov = field(line, "cov:").or(s.cov);
            s.ft = field(line, "ft:").or(s.ft);
            s.corpus_units = field(line, "corp:").or(s.corpus_units);
        } else if let Some(rest) = line.strip_prefix("Done ") {
            if let Some(n) = rest.split_whitespace().next().and_then(|n| n.parse().ok()) {
                seen = true;
                s.execs = n;
                s.seconds = field(line, " in ");
            }
        } else if (line.starts_with("==") && line.contains("ERROR: libFuzzer"))
            || line.contains("SUMMARY: libFuzzer")
        {
            s.crashed = true;
        }
    }
    seen.then_some(s)
}

/// The agent's config loader: TOML text, then (after a NUL) `KEY=VALUE` environment lines
/// (the `FWDLLM_AGENT__*` overrides).
pub fn agent_config_target(bytes: &[u8]) {
    let (text, env) = match bytes.iter().position(|&b| b == 0) {
        Some(i) => (&bytes[..i], &bytes[i + 1..]),
        None => (bytes, &[][..]),
    };
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    let env: Vec<(String, String)> = String::from_utf8_lossy(env)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let _ = fwdllm_agent::config::AgentConfig::from_toml_with_env(text, env, "fuzz");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines as libFuzzer 0.4 prints them (a finished run; a run stopped by a panic).
    #[test]
    fn libfuzzer_output_is_read_field_by_field() {
        let done = "INFO: Seed: 1\n\
            #2\tINITED cov: 120 ft: 130 corp: 3/2048b exec/s: 0 rss: 30Mb\n\
            #1048576\tpulse  cov: 400 ft: 900 corp: 50/9kb lim: 4096 exec/s: 52428 rss: 60Mb\n\
            #1234567\tDONE   cov: 410 ft: 950 corp: 55/10kb lim: 4096 exec/s: 61728 rss: 61Mb\n\
            Done 1234567 runs in 20 second(s)\n";
        assert_eq!(
            libfuzzer_summary(done),
            Some(LibFuzzerSummary {
                execs: 1_234_567,
                seconds: Some(20),
                cov: Some(410),
                ft: Some(950),
                corpus_units: Some(55),
                crashed: false,
            })
        );
        let crash =
            "#5000\tNEW    cov: 90 ft: 100 corp: 9/1kb lim: 4 exec/s: 0 rss: 30Mb L: 3/3 MS: 1\n\
            thread '<unnamed>' panicked at src/x.rs:1:1:\n\
            ==1== ERROR: libFuzzer: deadly signal\n\
            SUMMARY: libFuzzer: deadly signal\n";
        let s = libfuzzer_summary(crash).unwrap();
        assert_eq!(
            (s.execs, s.seconds, s.cov, s.crashed),
            (5000, None, Some(90), true)
        );
        assert_eq!(libfuzzer_summary("error: could not compile\n"), None);
    }
}
