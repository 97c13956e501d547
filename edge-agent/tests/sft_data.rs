//! Instruction (`kind = "sft"`) task files without the model: parsing, the shipped headline
//! task on the real AG News file, truncation hooks and the errors a config author sees.

use std::path::{Path, PathBuf};

use fwdllm_agent::data::{self, DataError, SftTaskConfig, TaskConfig, TaskFile};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// No model here: "truncation" keeps the first `n` words, which is enough to see where it is
/// applied.
fn words(text: &str, n: u32) -> String {
    text.split(' ')
        .take(n as usize)
        .collect::<Vec<_>>()
        .join(" ")
}

fn sft(path: &Path) -> SftTaskConfig {
    match TaskFile::from_file(path).unwrap() {
        TaskFile::Sft(t) => t,
        other => panic!("{} is not sft: {other:?}", path.display()),
    }
}

#[test]
fn shipped_headline_task_reads_ag_news_in_place() {
    let t = sft(&root().join("edge-agent/tasks/ag_news_headline.toml"));
    let ex = t.load_examples(&root(), &|s, _| s.to_string()).unwrap();
    assert_eq!(ex.len(), 7600);
    // Row 1 of the file: title "Fears for T N pension after talks".
    assert_eq!(ex[0].response, " Fears for T N pension after talks");
    assert!(ex[0]
        .prompt
        .starts_with("Article: Unions representing workers"));
    assert!(ex[0].prompt.ends_with("\nHeadline:"));
    let s = data::sft::split_sft(ex, &t);
    assert_eq!((s.heldout.len(), s.dev.len()), (200, 100));
    assert_eq!(s.train.len(), 7300);
    // The classification tasks still load through the same entry point, unchanged.
    for name in ["bbc", "ag_news"] {
        let p = root().join(format!("edge-agent/tasks/{name}.toml"));
        assert!(matches!(
            TaskFile::from_file(&p).unwrap(),
            TaskFile::Classification(_)
        ));
    }
}

#[test]
fn fields_and_responses_are_truncated_and_jsonl_is_read_by_key() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d.jsonl");
    std::fs::write(
        &data,
        "{\"q\": \"one two three four\", \"a\": \"x y z\", \"n\": 7}\n\n{\"q\": \"five\", \"a\": \"w\", \"n\": 8}\n",
    )
    .unwrap();
    let p = dir.path().join("t.toml");
    std::fs::write(
        &p,
        format!(
            "name='t'\nkind='sft'\nprompt=\"Q{{{{{{n}}}}}}: {{q}}\\nA:\"\nresponse=' {{a}}'\nmax_text_tokens=2\nmax_response_tokens=2\nheldout=0\ndev=0\n[source]\nformat='jsonl'\npath='{}'\n",
            data.display()
        ),
    )
    .unwrap();
    let t = sft(&p);
    let ex = t.load_examples(dir.path(), &words).unwrap();
    let got: Vec<(&str, &str)> = ex
        .iter()
        .map(|e| (e.prompt.as_str(), e.response.as_str()))
        .collect();
    // `{{` is a literal brace; numbers fill fields as text; the response " x y z" is cut to
    // two "tokens" (" x"), each prompt field to two.
    assert_eq!(got, [("Q{7}: one two\nA:", " x"), ("Q{8}: five\nA:", " w")]);
}

/// Writes a task file over `data` and returns the error of loading its examples.
fn load_err(dir: &Path, fields: &str, format: &str, data: &str) -> String {
    let d = dir.join(format!("data.{format}"));
    std::fs::write(&d, data).unwrap();
    let p = dir.join("t.toml");
    std::fs::write(
        &p,
        format!(
            "name='t'\nkind='sft'\n{fields}\n[source]\nformat='{format}'\npath='{}'\n",
            d.display()
        ),
    )
    .unwrap();
    match TaskFile::from_file(&p) {
        Err(e) => e.to_string(),
        Ok(TaskFile::Sft(t)) => t
            .load_examples(dir, &|s, _| s.to_string())
            .unwrap_err()
            .to_string(),
        Ok(other) => panic!("{other:?}"),
    }
}

#[test]
fn sft_task_errors_name_the_file_line_and_fix() {
    let dir = tempfile::tempdir().unwrap();
    let ok = "prompt='Article: {description}\\nHeadline:'\nresponse=' {title}'";
    // (what the file says, format, data, what the message must mention)
    let cases: &[(&str, &str, &str, &[&str])] = &[
        (
            ok,
            "csv",
            "label,headline,description\n1,a,b\n",
            &[
                "data.csv:1:",
                "no column \"title\"",
                "`response`",
                "{title}",
                "fix",
            ],
        ),
        (
            "prompt='Article: {body}\\nHeadline:'\nresponse=' {title}'",
            "csv",
            "title,description\na,b\n",
            &["no column \"body\"", "`prompt`"],
        ),
        (
            ok,
            "csv",
            "title,description\na,b\nc\n",
            &["data.csv:3:", "1 fields, header has 2"],
        ),
        (
            ok,
            "jsonl",
            "{\"title\":\"a\",\"description\":\"b\"}\n{\"description\":\"b\"}\n",
            &[
                "data.jsonl:2:",
                "missing string field \"title\"",
                "`response`",
            ],
        ),
        (
            ok,
            "csv",
            "title,description\n  ,b\n",
            &["data.csv:2:", "renders empty", "drop the row"],
        ),
        (
            "prompt='Article: {description'\nresponse=' {title}'",
            "csv",
            "",
            &["t.toml", "`prompt`", "unclosed"],
        ),
        (
            "prompt='Article: no fields'\nresponse=' {title}'",
            "csv",
            "",
            &["`prompt` names no field", "in braces"],
        ),
        (
            "prompt='{description}'\nresponse=' {title}'\nlabels=['a']",
            "csv",
            "",
            &["unknown field `labels`"],
        ),
    ];
    for (fields, format, data, needles) in cases {
        let msg = load_err(dir.path(), fields, format, data);
        for n in *needles {
            assert!(msg.contains(n), "{fields:?}: {msg:?} lacks {n:?}");
        }
    }
}

#[test]
fn kind_selects_the_task_type_and_classification_commands_refuse_sft() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.toml");
    std::fs::write(&p, "name='t'\nkind='regression'\n").unwrap();
    let msg = TaskFile::from_file(&p).unwrap_err().to_string();
    assert!(msg.contains("\"classification\" or \"sft\""), "{msg}");
    // An explicit classification kind is the default kind.
    std::fs::write(
        &p,
        "name='x'\nkind='classification'\nprompt='{text}'\nlabels=['a','b']\nwords=[' a',' b']\n[source]\nformat='jsonl'\npath='x.jsonl'\n",
    )
    .unwrap();
    assert!(matches!(
        TaskFile::from_file(&p).unwrap(),
        TaskFile::Classification(_)
    ));
    let headline = root().join("edge-agent/tasks/ag_news_headline.toml");
    let err = TaskConfig::from_file(&headline).unwrap_err();
    assert!(matches!(err, DataError::Config { .. }));
    assert!(err.to_string().contains("kind = \"sft\""), "{err}");
}
