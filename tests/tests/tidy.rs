//! Tidy checks (rust-analyzer style): ordinary tests that keep the repository easy to find
//! one's way in. They read the sources and documents as text and fail with what to fix:
//! - every `.rs` file opens with a module doc comment (`//!`): sources, and also integration
//!   tests, examples and the test support library, since each says what it covers;
//! - ARCHITECTURE.md names every module of every crate in that crate's code-map section;
//! - the shipped example configs list every key with the code's default;
//! - every `make X` shown in README.md is a Makefile target;
//! - no `.rs` file has more than [`MAX_LINES`] lines before its `#[cfg(test)]` module;
//! - no import cycle between the modules of a crate ([`module_graph`] says what counts).

use std::path::{Path, PathBuf};

mod module_graph;

/// The longest a file may be before its test module: past this it holds more than one
/// responsibility and should be split (see ARCHITECTURE.md for where things live).
const MAX_LINES: usize = 800;

/// The workspace's crates: directory and the name of its code-map section in ARCHITECTURE.md.
/// A crate may sit inside another's directory (`aggregator/frontdoor`, `tests/bench`); each
/// file belongs to the innermost one.
const CRATES: &[&str] = &[
    "shared",
    "edge-agent",
    "aggregator",
    "aggregator/frontdoor",
    "tests",
    "tests/bench",
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Every `.rs` file below `dir`, skipping build output, hidden folders (`.cache`) and the
/// directories of other crates (a `Cargo.toml` of their own), which are walked as themselves.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .collect();
    entries.sort();
    for p in entries {
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with('.') || name == "target" {
            continue;
        }
        if p.is_dir() {
            if !p.join("Cargo.toml").exists() {
                rust_files(&p, out);
            }
        } else if name.ends_with(".rs") {
            out.push(p);
        }
    }
}

/// `(path relative to the root, contents)` of every `.rs` file of the workspace's crates.
fn workspace_sources() -> Vec<(String, String)> {
    let root = root();
    let mut files = Vec::new();
    for c in CRATES {
        rust_files(&root.join(c), &mut files);
    }
    assert!(files.len() > 50, "found only {} .rs files", files.len());
    files
        .into_iter()
        .map(|p| {
            let rel = p
                .strip_prefix(&root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            (rel, read(&p))
        })
        .collect()
}

/// The `members` of the workspace's Cargo.toml, as written.
fn workspace_members(manifest: &str) -> Vec<String> {
    let line = manifest
        .lines()
        .find(|l| l.trim_start().starts_with("members"))
        .expect("Cargo.toml has a members list");
    line.split('"')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

/// The checks below (module docs, line limit, code map, import cycles) walk [`CRATES`]: a new
/// crate left out of it would escape them all.
#[test]
fn the_checks_cover_every_workspace_member() {
    let mut members = workspace_members(&read(&root().join("Cargo.toml")));
    members.sort();
    let mut crates: Vec<String> = CRATES.iter().map(|c| c.to_string()).collect();
    crates.sort();
    assert_eq!(
        members, crates,
        "CRATES in tests/tests/tidy.rs differs from the workspace members"
    );
}

#[test]
fn every_rust_file_opens_with_a_module_doc_comment() {
    let missing: Vec<String> = workspace_sources()
        .into_iter()
        .filter(|(_, text)| !has_module_doc(text))
        .map(|(path, _)| path)
        .collect();
    assert!(
        missing.is_empty(),
        "start these files with a `//!` comment saying what the module owns: {missing:#?}"
    );
}

fn has_module_doc(text: &str) -> bool {
    text.lines()
        .find(|l| !l.trim().is_empty())
        .is_some_and(|l| l.starts_with("//!"))
}

#[test]
fn module_doc_check_needs_the_doc_first() {
    assert!(has_module_doc("\n//! Owns x.\nuse y;\n"));
    assert!(!has_module_doc("use y;\n//! Owns x.\n"));
    assert!(!has_module_doc(
        "/// An item doc, not a module doc.\nfn f() {}\n"
    ));
}

/// Lines before the file's `#[cfg(test)]` module (all lines when it has none).
fn lines_before_tests(text: &str) -> usize {
    let lines: Vec<&str> = text.lines().collect();
    lines
        .windows(2)
        .position(|w| w[0] == "#[cfg(test)]" && w[1].starts_with("mod "))
        .unwrap_or(lines.len())
}

#[test]
fn no_file_grows_past_the_line_limit_before_its_tests() {
    let mut over = Vec::new();
    for (path, text) in &workspace_sources() {
        let n = lines_before_tests(text);
        if n > MAX_LINES {
            over.push(format!("{path}: {n} lines"));
        }
    }
    assert!(
        over.is_empty(),
        "split these files by responsibility (at most {MAX_LINES} lines before the test module): {over:#?}"
    );
}

#[test]
fn line_limit_counts_up_to_the_test_module() {
    assert_eq!(
        lines_before_tests("a\nb\n#[cfg(test)]\nmod tests {\n}\n"),
        2
    );
    assert_eq!(lines_before_tests("a\nb\nc\n"), 3);
    // An item gated on tests is not the test module.
    assert_eq!(lines_before_tests("#[cfg(test)]\nfn f() {}\nb\n"), 3);
}

/// Import cycles between modules that may stay, by [`module_graph::Cycle::key`]
/// (`"edge-agent (lib) engine::{train, train_run}"`). Keep it empty: break a cycle by moving
/// what both sides need to the module that owns it, or to a small new module, not by a
/// re-export (the check follows re-exports to where an item is defined).
const ALLOWED_CYCLES: &[&str] = &[];

#[test]
fn no_import_cycles_between_modules() {
    let root = root();
    let display = |p: &Path| p.strip_prefix(&root).unwrap_or(p).display().to_string();
    let (mut found, mut seen, mut references) = (Vec::new(), Vec::new(), 0);
    for krate in CRATES {
        for (name, file) in module_graph::crate_roots(&root.join(krate).join("src")) {
            let graph = module_graph::crate_graph(&name, &file, &display);
            references += graph.edges.len();
            for cycle in module_graph::cycles(&graph) {
                let key = cycle.key(krate, &graph.root);
                if !ALLOWED_CYCLES.contains(&key.as_str()) {
                    found.push(format!("{key}\n      {}", cycle.edges.join("\n      ")));
                }
                seen.push(key);
            }
        }
    }
    // A parser that stopped seeing references would find no cycle either.
    assert!(
        references > 300,
        "only {references} references between modules were read"
    );
    assert!(
        found.is_empty(),
        "import cycles between modules (each: the modules that reach one another, then every \
         reference between them); move what both sides need to the module that owns it, or to \
         a small new module:\n  {}",
        found.join("\n  ")
    );
    let stale: Vec<&&str> = ALLOWED_CYCLES
        .iter()
        .filter(|k| !seen.iter().any(|s| s == *k))
        .collect();
    assert!(
        stale.is_empty(),
        "no longer cycles, drop them from ALLOWED_CYCLES: {stale:?}"
    );
}

/// The module path of a source file of a crate (`daemon::round`), or `None` for crate roots.
/// Binaries are named by their file (`bin/fwdllm`).
fn module_path(rel_to_src: &str) -> Option<String> {
    let p = rel_to_src.strip_suffix(".rs")?;
    if p == "lib" || p == "main" {
        return None;
    }
    if let Some(bin) = p.strip_prefix("bin/") {
        return Some(format!("bin/{bin}"));
    }
    let p = p.strip_suffix("/mod").unwrap_or(p);
    Some(p.replace('/', "::"))
}

/// The text of ARCHITECTURE.md's code-map section of `krate` (heading "### `krate`…").
fn crate_section<'a>(arch: &'a str, krate: &str) -> &'a str {
    // The space keeps `tests` from matching the heading of `tests/bench`.
    let heading = format!("### `{krate}` ");
    let start = arch
        .find(&heading)
        .unwrap_or_else(|| panic!("ARCHITECTURE.md has no section starting {heading:?}"));
    let rest = &arch[start + heading.len()..];
    let end = rest
        .find("\n## ")
        .into_iter()
        .chain(rest.find("\n### "))
        .min();
    &rest[..end.unwrap_or(rest.len())]
}

/// Whether `text` names module `path` in backticks: `path` itself, a path through it
/// (`daemon::round::x`, `fwdllm_agent::daemon::round`), or for binaries `src/bin/x.rs` or `x`.
fn names_module(text: &str, path: &str) -> bool {
    let spans = text.split('`').skip(1).step_by(2);
    let bin = path.strip_prefix("bin/");
    spans
        .flat_map(|s| s.split(|c: char| c.is_whitespace() || c == ',' || c == '(' || c == ')'))
        .any(|t| match bin {
            Some(b) => t == b || t.ends_with(&format!("src/bin/{b}.rs")),
            None => {
                t == path
                    || t.starts_with(&format!("{path}::"))
                    || t.ends_with(&format!("::{path}"))
                    || t.contains(&format!("::{path}::"))
            }
        })
}

#[test]
fn module_naming_reads_backtick_spans() {
    assert!(names_module("the `daemon::round` loop", "daemon::round"));
    assert!(names_module(
        "`fwdllm_agent::daemon::round`",
        "daemon::round"
    ));
    assert!(names_module("`engine::tail` owns", "engine"));
    assert!(names_module("`src/bin/fwdllm.rs` — demo", "bin/fwdllm"));
    assert!(!names_module("the round loop", "daemon::round"));
    assert!(!names_module("`daemon::rounds`", "daemon::round"));
    assert_eq!(module_path("daemon/mod.rs").as_deref(), Some("daemon"));
    assert_eq!(module_path("gguf/read.rs").as_deref(), Some("gguf::read"));
    assert_eq!(module_path("lib.rs"), None);
}

#[test]
fn architecture_names_every_module() {
    let root = root();
    let arch = read(&root.join("ARCHITECTURE.md"));
    let mut missing = Vec::new();
    for krate in CRATES {
        let section = crate_section(&arch, krate);
        let src = root.join(krate).join("src");
        let mut files = Vec::new();
        rust_files(&src, &mut files);
        for f in files {
            let rel = f
                .strip_prefix(&src)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/");
            if let Some(path) = module_path(&rel) {
                if !names_module(section, &path) {
                    missing.push(format!("{krate}/src/{rel} (`{path}`)"));
                }
            }
        }
    }
    assert!(
        missing.is_empty(),
        "name these modules in their crate's section of ARCHITECTURE.md's code map: {missing:#?}"
    );
}

/// Make targets of the Makefile (`name:` at the start of a line, not `NAME := value`).
fn make_targets(makefile: &str) -> Vec<String> {
    makefile
        .lines()
        .filter_map(|l| {
            let (name, rest) = l.split_once(':')?;
            let ok = !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                && !rest.starts_with('=');
            ok.then(|| name.to_owned())
        })
        .collect()
}

/// `X` of every `make X` in README.md's code: inline code spans and fenced blocks.
fn readme_make_commands(readme: &str) -> Vec<String> {
    let mut code = Vec::new();
    let mut fenced = false;
    for line in readme.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        } else if fenced {
            code.push(line.to_owned());
        } else {
            code.extend(line.split('`').skip(1).step_by(2).map(str::to_owned));
        }
    }
    code.iter()
        .filter_map(|c| c.trim().strip_prefix("make "))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn readme_make_commands_are_makefile_targets() {
    let root = root();
    let targets = make_targets(&read(&root.join("Makefile")));
    let commands = readme_make_commands(&read(&root.join("README.md")));
    assert!(
        commands.iter().any(|c| c == "test"),
        "README.md shows no `make test`: {commands:?}"
    );
    let unknown: Vec<&String> = commands.iter().filter(|c| !targets.contains(c)).collect();
    assert!(
        unknown.is_empty(),
        "README.md shows `make X` for these, but the Makefile has no such target: {unknown:?} (targets: {targets:?})"
    );
}

#[test]
fn make_parsing_finds_targets_and_commands() {
    assert_eq!(
        make_targets("SHELL := /bin/bash\n.PHONY: a\ndemo: setup\n\tcargo x\nclean-cache:\n"),
        ["demo", "clean-cache"]
    );
    assert_eq!(
        readme_make_commands("Run `make demo` or\n```sh\nmake test   # all\n```\nto make it."),
        ["demo", "test"]
    );
}

// ---------------------------------------------------------------------------------------------
// Shipped example configs: every key, with the code's default.

#[test]
fn agent_example_config_covers_every_key_with_defaults() {
    use fwdllm_agent::config::AgentConfig;
    let load = |text: &str| {
        AgentConfig::from_toml_with_env(text, std::iter::empty(), "systemd/fwdllm-agent.toml")
    };
    let text = read(&root().join("systemd/fwdllm-agent.toml"));
    // The example parses as shipped (all keys commented out)...
    assert_eq!(load(&text).unwrap(), AgentConfig::default());
    // ...and uncommenting every `# key = value` line gives exactly the defaults, every key once.
    let mut uncommented = String::new();
    let mut seen = Vec::new();
    let mut section = String::new();
    for line in text.lines() {
        if let Some(s) = line.strip_prefix('[') {
            section = s.trim_end_matches(']').to_owned();
            uncommented.push_str(line);
        } else if let Some(rest) = line.strip_prefix("# ").filter(|r| {
            r.split_once(" = ").is_some_and(|(k, _)| {
                !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
            })
        }) {
            seen.push(format!("{section}.{}", rest.split_once(" = ").unwrap().0));
            uncommented.push_str(rest);
        }
        uncommented.push('\n');
    }
    let cfg = load(&uncommented).unwrap_or_else(|e| panic!("uncommented example: {e}"));
    assert_eq!(
        cfg,
        AgentConfig::default(),
        "systemd/fwdllm-agent.toml values differ from the defaults"
    );
    let mut want = AgentConfig::all_keys();
    want.sort();
    seen.sort();
    assert_eq!(
        seen, want,
        "systemd/fwdllm-agent.toml keys differ from the config's keys"
    );
}

fn toml_keys(prefix: &str, v: &toml::Value, out: &mut Vec<String>) {
    if let toml::Value::Table(t) = v {
        for (k, v) in t {
            let path = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            if v.is_table() {
                toml_keys(&path, v, out);
            } else {
                out.push(path);
            }
        }
    }
}

#[test]
fn aggregator_example_config_states_the_defaults() {
    use fwdllm_aggregator::config::AggregatorConfig;
    let text = read(&root().join("systemd/fwdllm-aggregator.toml"));
    let cfg = AggregatorConfig::from_toml(&text).expect("example config parses");
    assert_eq!(
        cfg,
        AggregatorConfig::default(),
        "systemd/fwdllm-aggregator.toml must show every default"
    );
    assert_eq!(cfg.validate(), vec![]);
}

#[test]
fn aggregator_example_config_covers_every_key_with_a_comment() {
    use fwdllm_aggregator::config::AggregatorConfig;
    let text = read(&root().join("systemd/fwdllm-aggregator.toml"));
    let defaults = toml::Value::try_from(AggregatorConfig::default()).unwrap();
    let mut all = Vec::new();
    toml_keys("", &defaults, &mut all);
    assert!(all.len() > 30, "{all:?}");
    let example: toml::Value = toml::from_str(&text).unwrap();
    let mut present = Vec::new();
    toml_keys("", &example, &mut present);
    for k in &all {
        assert!(
            present.contains(k),
            "key {k} missing from systemd/fwdllm-aggregator.toml"
        );
    }
    // Each key line is preceded by a comment line.
    let lines: Vec<&str> = text.lines().collect();
    for (i, l) in lines.iter().enumerate() {
        let t = l.trim();
        if !t.is_empty() && !t.starts_with('#') && !t.starts_with('[') {
            assert!(
                i > 0 && lines[i - 1].trim().starts_with('#'),
                "systemd/fwdllm-aggregator.toml line {} ({t}) has no comment above it",
                i + 1
            );
        }
    }
}
