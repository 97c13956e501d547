//! The shipped example config parses, equals the defaults it documents, and mentions every key.

use fwdllm_aggregator::config::AggregatorConfig;

const EXAMPLE: &str = include_str!("../../systemd/fwdllm-aggregator.toml");

fn keys(prefix: &str, v: &toml::Value, out: &mut Vec<String>) {
    if let toml::Value::Table(t) = v {
        for (k, v) in t {
            let path = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            if v.is_table() {
                keys(&path, v, out);
            } else {
                out.push(path);
            }
        }
    }
}

#[test]
fn example_parses_and_states_the_defaults() {
    let cfg = AggregatorConfig::from_toml(EXAMPLE).expect("example config parses");
    assert_eq!(
        cfg,
        AggregatorConfig::default(),
        "example must show every default"
    );
    assert_eq!(cfg.validate(), vec![]);
}

#[test]
fn example_covers_every_key_with_a_comment() {
    let defaults = toml::Value::try_from(AggregatorConfig::default()).unwrap();
    let mut all = Vec::new();
    keys("", &defaults, &mut all);
    assert!(all.len() > 30, "{all:?}");
    let example: toml::Value = toml::from_str(EXAMPLE).unwrap();
    let mut present = Vec::new();
    keys("", &example, &mut present);
    for k in &all {
        assert!(
            present.contains(k),
            "key {k} missing from systemd/fwdllm-aggregator.toml"
        );
    }
    // Each key line is preceded by a comment line.
    let lines: Vec<&str> = EXAMPLE.lines().collect();
    for (i, l) in lines.iter().enumerate() {
        let t = l.trim();
        if !t.is_empty() && !t.starts_with('#') && !t.starts_with('[') {
            assert!(
                i > 0 && lines[i - 1].trim().starts_with('#'),
                "line {} ({t}) has no comment above it",
                i + 1
            );
        }
    }
}
