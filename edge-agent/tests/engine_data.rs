//! Data pipeline tests (no model needed): readers, errors naming file and line, split and
//! shard determinism.

use std::path::{Path, PathBuf};

use fwdllm_agent::data::{self, DataError, DataSource, LabelCoding, Partition, TaskConfig};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn labels() -> Vec<String> {
    vec!["a".into(), "b".into()]
}

#[test]
fn jsonl_with_unknown_label_names_file_line_and_labels() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.jsonl");
    std::fs::write(
        &p,
        "{\"text\":\"x\",\"label\":\"a\"}\n{\"text\":\"y\",\"label\":\"weather\"}\n",
    )
    .unwrap();
    let err = data::read_jsonl(&p, "text", "label", LabelCoding::Names, &labels()).unwrap_err();
    match &err {
        DataError::UnknownLabel { line, label, .. } => {
            assert_eq!(*line, 2);
            assert_eq!(label, "weather");
        }
        e => panic!("unexpected {e}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("d.jsonl:2") && msg.contains("weather") && msg.contains("\"a\""),
        "{msg}"
    );
}

#[test]
fn jsonl_bad_json_and_missing_field_name_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.jsonl");
    std::fs::write(&p, "{\"text\":\"x\",\"label\":\"a\"}\n{oops\n").unwrap();
    let msg = data::read_jsonl(&p, "text", "label", LabelCoding::Names, &labels())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("d.jsonl:2") && msg.contains("invalid JSON"),
        "{msg}"
    );
    std::fs::write(&p, "{\"label\":\"a\"}\n").unwrap();
    let msg = data::read_jsonl(&p, "text", "label", LabelCoding::Names, &labels())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("d.jsonl:1") && msg.contains("\"text\""),
        "{msg}"
    );
}

#[test]
fn csv_quotes_escapes_and_bad_rows() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.csv");
    std::fs::write(
        &p,
        "label,title,body\nb,\"Hello, \"\"world\"\"\",text\na,t2,b2\n",
    )
    .unwrap();
    let ex = data::read_csv(
        &p,
        "label",
        &["title".into(), "body".into()],
        LabelCoding::Names,
        ". ",
        &labels(),
    )
    .unwrap();
    assert_eq!(ex[0].text, "Hello, \"world\". text");
    assert_eq!(ex[0].label, 1);
    std::fs::write(&p, "label,title,body\na,t,b\nc,t,b\n").unwrap();
    let msg = data::read_csv(
        &p,
        "label",
        &["title".into()],
        LabelCoding::Names,
        ". ",
        &labels(),
    )
    .unwrap_err()
    .to_string();
    assert!(msg.contains("d.csv:3") && msg.contains("\"c\""), "{msg}");
    std::fs::write(&p, "label,title\na,\"unterminated\n").unwrap();
    let msg = data::read_csv(
        &p,
        "label",
        &["title".into()],
        LabelCoding::Names,
        ". ",
        &labels(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        msg.contains("d.csv:2") && msg.contains("unterminated"),
        "{msg}"
    );
    let msg = data::read_csv(
        &p,
        "label",
        &["nope".into()],
        LabelCoding::Names,
        ". ",
        &labels(),
    )
    .unwrap_err()
    .to_string();
    assert!(msg.contains("nope"), "{msg}");
}

#[test]
fn shipped_tasks_read_the_real_data() {
    let bbc = TaskConfig::from_file(&root().join("edge-agent/tasks/bbc.toml")).unwrap();
    let ex = bbc.load_examples(&root()).unwrap();
    assert_eq!(ex.len(), 2225);
    assert_eq!(ex.iter().filter(|e| e.label == 3).count(), 511); // sports
    let ag = TaskConfig::from_file(&root().join("edge-agent/tasks/ag_news.toml")).unwrap();
    let DataSource::Csv { path, .. } = &ag.source else {
        panic!("ag_news is csv")
    };
    let path = root().join(path);
    assert!(path.is_file(), "{} missing", path.display());
    let ex = ag.load_examples(&root()).unwrap();
    assert_eq!(ex.len(), 7600);
    // Balanced test split: 1900 per class.
    for l in 0..4 {
        assert_eq!(ex.iter().filter(|e| e.label == l).count(), 1900);
    }
}

#[test]
fn task_config_errors_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.toml");
    std::fs::write(
        &p,
        "name='x'\nprompt='no placeholder'\nlabels=['a','b']\nwords=[' a',' b']\n[source]\nformat='jsonl'\npath='x.jsonl'\n",
    )
    .unwrap();
    let msg = TaskConfig::from_file(&p).unwrap_err().to_string();
    assert!(msg.contains("{text}"), "{msg}");
    std::fs::write(
        &p,
        "name='x'\nprompt='{text}'\nlabels=['a','b']\nwords=[' a']\n[source]\nformat='jsonl'\npath='x.jsonl'\n",
    )
    .unwrap();
    let msg = TaskConfig::from_file(&p).unwrap_err().to_string();
    assert!(msg.contains("words"), "{msg}");
}

fn examples(n: usize, labels: usize) -> Vec<data::Example> {
    (0..n)
        .map(|i| data::Example {
            text: format!("t{i}"),
            label: i % labels,
        })
        .collect()
}

#[test]
fn split_is_deterministic_and_disjoint() {
    let a = data::split(examples(100, 4), 7, 20, 10);
    let b = data::split(examples(100, 4), 7, 20, 10);
    assert_eq!(a.heldout, b.heldout);
    assert_eq!(a.train, b.train);
    assert_eq!((a.heldout.len(), a.dev.len(), a.train.len()), (20, 10, 70));
    let c = data::split(examples(100, 4), 8, 20, 10);
    assert_ne!(a.heldout, c.heldout);
    let mut all: Vec<_> = a
        .heldout
        .iter()
        .chain(&a.dev)
        .chain(&a.train)
        .map(|e| e.text.clone())
        .collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 100);
}

#[test]
fn shards_cover_everything_and_dirichlet_skews_labels() {
    let ex = examples(1000, 5);
    let iid = data::shard(&ex, 4, Partition::Iid, 1);
    assert_eq!(iid.iter().map(|s| s.len()).sum::<usize>(), 1000);
    assert!(iid.iter().all(|s| s.len() == 250));
    let non = data::shard(&ex, 4, Partition::Dirichlet { alpha: 0.1 }, 1);
    assert_eq!(non.iter().map(|s| s.len()).sum::<usize>(), 1000);
    assert_eq!(
        non,
        data::shard(&ex, 4, Partition::Dirichlet { alpha: 0.1 }, 1)
    );
    // With alpha 0.1 some client holds most of some label.
    let max_share = (0..5)
        .map(|l| {
            non.iter()
                .map(|s| s.iter().filter(|e| e.label == l).count())
                .max()
                .unwrap() as f64
                / 200.0
        })
        .fold(0.0, f64::max);
    assert!(max_share > 0.6, "max per-label share {max_share}");
    let dir = tempfile::tempdir().unwrap();
    let labels: Vec<String> = (0..5).map(|i| format!("l{i}")).collect();
    let paths = data::write_shards(dir.path(), &non, &labels).unwrap();
    let back = data::read_jsonl(&paths[0], "text", "label", LabelCoding::Names, &labels)
        .unwrap_or_default();
    assert_eq!(back, non[0]);
}

#[test]
fn sft_jsonl_reads_prompt_response_and_names_bad_lines() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("sft.jsonl");
    std::fs::write(
        &p,
        "{\"prompt\":\"Q: 2+2?\\nA:\",\"response\":\" 4\",\"id\":7}\n\n{\"prompt\":\"Hi\",\"response\":\" there\"}\n",
    )
    .unwrap();
    let ex = data::read_sft_jsonl(&p).unwrap();
    assert_eq!(ex.len(), 2);
    assert_eq!(ex[0].prompt, "Q: 2+2?\nA:");
    assert_eq!(ex[0].response, " 4");

    std::fs::write(
        &p,
        "{\"prompt\":\"a\",\"response\":\"b\"}\n{\"prompt\":\"a\"}\n",
    )
    .unwrap();
    let err = data::read_sft_jsonl(&p).unwrap_err();
    assert!(matches!(err, DataError::Row { line: 2, .. }), "{err}");
    assert!(err.to_string().contains("\"response\""), "{err}");

    std::fs::write(&p, "{\"prompt\":\"a\",\"response\":\"\"}\n").unwrap();
    let err = data::read_sft_jsonl(&p).unwrap_err();
    assert!(err.to_string().contains("empty \"response\""), "{err}");
}

/// Integer labels, as many exported datasets write them: 1-based by default (AG News), 0-based
/// with `label_index_base = 0`, in CSV and in JSONL (as numbers or numeric strings). A 0 in a
/// 1-based file says which key to set.
#[test]
fn index_labels_from_either_base_in_csv_and_jsonl() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("d.csv");
    std::fs::write(&csv, "label,text\n0,first\n1,second\n").unwrap();
    let zero = LabelCoding::Index { base: 0 };
    let ex = data::read_csv(&csv, "label", &["text".into()], zero, ". ", &labels()).unwrap();
    assert_eq!(
        ex.iter().map(|e| e.label).collect::<Vec<_>>(),
        [0, 1],
        "0-based"
    );
    let one = LabelCoding::Index { base: 1 };
    let msg = data::read_csv(&csv, "label", &["text".into()], one, ". ", &labels())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("d.csv:2") && msg.contains("label_index_base = 0"),
        "{msg}"
    );
    let jsonl = dir.path().join("d.jsonl");
    std::fs::write(
        &jsonl,
        "{\"text\": \"a\", \"label\": 2}\n{\"text\": \"b\", \"label\": \"1\"}\n",
    )
    .unwrap();
    let ex = data::read_jsonl(&jsonl, "text", "label", one, &labels()).unwrap();
    assert_eq!(ex.iter().map(|e| e.label).collect::<Vec<_>>(), [1, 0]);
    // Past the last label in either base: no hint to flip the base.
    std::fs::write(&jsonl, "{\"text\": \"a\", \"label\": 7}\n").unwrap();
    let msg = data::read_jsonl(&jsonl, "text", "label", one, &labels())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("\"7\"") && !msg.contains("label_index_base"),
        "{msg}"
    );
}

#[test]
fn a_label_index_base_other_than_0_or_1_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.toml");
    std::fs::write(
        &p,
        "name = \"t\"\nprompt = \"{text}\"\nlabels = [\"a\", \"b\"]\nwords = [\" a\", \" b\"]\n\
         [source]\nformat = \"jsonl\"\npath = \"x.jsonl\"\nlabel_is_index = true\nlabel_index_base = 2\n",
    )
    .unwrap();
    let msg = TaskConfig::from_file(&p).unwrap_err().to_string();
    assert!(
        msg.contains("label_index_base") && msg.contains("or 0"),
        "{msg}"
    );
}

/// A task file written next to its data, run from elsewhere: the error names the key, the
/// root it was resolved against and `--root`.
#[test]
fn a_missing_data_path_names_the_key_the_root_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.toml");
    std::fs::write(
        &p,
        "name = \"t\"\nprompt = \"{text}\"\nlabels = [\"a\", \"b\"]\nwords = [\" a\", \" b\"]\n\
         [source]\nformat = \"jsonl\"\npath = \"mine.jsonl\"\n",
    )
    .unwrap();
    let task = TaskConfig::from_file(&p).unwrap();
    let msg = task
        .load_examples(Path::new("/nonexistent-root"))
        .unwrap_err()
        .to_string();
    for part in ["source.path", "mine.jsonl", "/nonexistent-root", "--root"] {
        assert!(msg.contains(part), "{part}: {msg}");
    }
}

#[test]
fn csv_quoting_line_breaks_in_fields_crlf_and_a_bom() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.csv");
    let read = |text: &str, cols: &[&str]| {
        std::fs::write(&p, text).unwrap();
        let cols: Vec<String> = cols.iter().map(|c| c.to_string()).collect();
        data::read_csv(&p, "label", &cols, LabelCoding::Names, ". ", &labels())
            .map(|ex| {
                ex.into_iter()
                    .map(|e| (e.label, e.text))
                    .collect::<Vec<_>>()
            })
            .map_err(|e| e.to_string())
    };
    let ok = |v: &[(usize, &str)]| -> Result<Vec<(usize, String)>, String> {
        Ok(v.iter().map(|&(l, t)| (l, t.to_string())).collect())
    };
    // Quoting: delimiters, doubled quotes and an empty quoted field inside quotes; a quote
    // inside an unquoted field is text.
    assert_eq!(
        read(
            "label,title,body\nb,\"a, \"\"b\"\", c\",\"\"\na,5\" screen,x\n",
            &["title", "body"]
        ),
        ok(&[(1, "a, \"b\", c"), (0, "5\" screen. x")])
    );
    // A line break inside a quoted field is part of the field, and the lines below keep
    // their own numbers (the bad label is on line 5).
    assert_eq!(
        read("label,title\na,\"first\nsecond\"\nb,next\n", &["title"]),
        ok(&[(0, "first\nsecond"), (1, "next")])
    );
    let msg = read(
        "label,title\na,\"first\n\nthird\"\nb,ok\nc,bad\n",
        &["title"],
    )
    .unwrap_err();
    assert!(msg.contains("d.csv:6") && msg.contains("\"c\""), "{msg}");
    // CRLF line ends, a UTF-8 byte order mark before the header, blank and space-only lines.
    assert_eq!(
        read(
            "\u{feff}label,title\r\na,one\r\n\r\n   \r\nb,\"two\r\nlines\"\r\n",
            &["title"]
        ),
        ok(&[(0, "one"), (1, "two\r\nlines")])
    );
    // A quote still open at the end of the file, on the last line or many lines up, in
    // the header or a record; a closed empty field at the end is no open quote.
    for (text, line) in [
        ("label,title\na,\"open\n", 2),
        ("label,title\na,\"open\nb,x\nb,y\n", 2),
        ("label,title\na,x\nb,\"", 3),
        ("label,\"title\n", 1),
    ] {
        let msg = read(text, &["title"]).unwrap_err();
        assert!(
            msg.contains(&format!("d.csv:{line}:")) && msg.contains("unterminated"),
            "{text:?}: {msg}"
        );
    }
    assert_eq!(
        read("label,title,body\na,x,\"\"", &["title", "body"]),
        ok(&[(0, "x")])
    );
    // A record with too few or too many fields, after a multi-line one.
    let msg = read("label,title\na,\"x\ny\"\nb\n", &["title"]).unwrap_err();
    assert!(
        msg.contains("d.csv:4") && msg.contains("1 fields, header has 2"),
        "{msg}"
    );
    // No header at all.
    let msg = read("", &["title"]).unwrap_err();
    assert!(msg.contains("d.csv"), "{msg}");
}
