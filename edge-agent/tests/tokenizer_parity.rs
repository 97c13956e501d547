//! Parity of `fwdllm_shared::tokenizer::GgufTokenizer` (built from the GGUF header alone, no
//! llama.cpp) with llama.cpp's own tokenizer on the real SmolLM2 model (set-up cache): every
//! BBC article and every AG News row must give the same token ids.

mod real_model;

use std::path::{Path, PathBuf};

use fwdllm_agent::data::TaskConfig;
use fwdllm_agent::engine::llama::{Llama, LlamaParams};
use fwdllm_shared::gguf::{write_gguf_f32, F32Tensor, GgufValue};
use fwdllm_shared::tokenizer::{GgufTokenizer, TokenizerError};
use real_model::{model, root};

/// llama.cpp with the smallest context: only its tokenizer is used.
fn llama() -> Llama {
    let params = LlamaParams {
        threads: 1,
        n_ctx: 64,
        n_batch: 64,
        n_seq_max: 1,
        flash_attn: false,
        kv_f32: false,
        embd_input: false,
        layer_input: None,
    };
    Llama::load(&model(), &params).unwrap()
}

fn tokenizer() -> GgufTokenizer {
    GgufTokenizer::from_gguf(model()).unwrap()
}

fn theirs(llama: &Llama, text: &str, add_special: bool) -> Vec<u32> {
    llama
        .tokenize(text, add_special)
        .into_iter()
        .map(|t| u32::try_from(t).unwrap())
        .collect()
}

/// Compares every `(name, text)`; returns (compared, identical, descriptions of the first
/// differences). Also checks that our ids decode back to the text.
fn compare(
    llama: &Llama,
    tok: &GgufTokenizer,
    texts: &[(String, String)],
) -> (usize, usize, Vec<String>) {
    let mut identical = 0;
    let mut diffs = Vec::new();
    for (name, text) in texts {
        let ours = tok.encode(text, false).unwrap();
        let want = theirs(llama, text, false);
        if ours == want {
            identical += 1;
        } else if diffs.len() < 5 {
            let at = ours.iter().zip(&want).take_while(|(a, b)| a == b).count();
            diffs.push(format!(
                "{name}: first difference at token {at}: ours {:?} llama.cpp {:?}",
                &ours[at..(at + 4).min(ours.len())],
                &want[at..(at + 4).min(want.len())]
            ));
        }
        assert_eq!(tok.decode(&ours).unwrap(), *text, "{name}: round trip");
    }
    (texts.len(), identical, diffs)
}

/// Every BBC article as the raw file (not trimmed; stray Latin-1 bytes replaced as the data
/// module does, because both tokenizers take UTF-8 text).
fn bbc_raw() -> Vec<(String, String)> {
    let dir = root().join(".cache/data/bbcnews");
    let mut out = Vec::new();
    for topic in ["business", "entertainment", "politics", "sports", "tech"] {
        let sub = dir.join(topic);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&sub)
            .unwrap_or_else(|e| panic!("{}: {e}; run `make setup` first", sub.display()))
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "txt"))
            .collect();
        files.sort();
        for f in files {
            let text = String::from_utf8_lossy(&std::fs::read(&f).unwrap()).into_owned();
            out.push((f.display().to_string(), text));
        }
    }
    out
}

#[test]
fn every_bbc_article_tokenizes_exactly_as_llama_cpp() {
    let (llama, tok) = (llama(), tokenizer());
    let texts = bbc_raw();
    assert_eq!(texts.len(), 2225, "the BBC corpus has 2225 articles");
    let (compared, identical, diffs) = compare(&llama, &tok, &texts);
    println!("BBC raw articles: {identical}/{compared} identical");
    assert_eq!(identical, compared, "{diffs:#?}");
}

#[test]
fn every_ag_news_row_tokenizes_exactly_as_llama_cpp() {
    let (llama, tok) = (llama(), tokenizer());
    // The examples as the data pipeline builds them (title + description) ...
    let task = TaskConfig::from_file(&root().join("edge-agent/tasks/ag_news.toml")).unwrap();
    let examples = task.load_examples(&root()).unwrap();
    assert_eq!(examples.len(), 7600);
    let mut texts: Vec<(String, String)> = examples
        .into_iter()
        .enumerate()
        .map(|(i, e)| (format!("ag_news example {i}"), e.text))
        .collect();
    // ... and the raw CSV lines (quotes, backslashes, HTML entities left in).
    let csv = std::fs::read_to_string(root().join("../shared/data/ag_news/test.csv")).unwrap();
    texts.extend(
        csv.lines()
            .enumerate()
            .map(|(i, l)| (format!("test.csv line {}", i + 1), l.to_string())),
    );
    let (compared, identical, diffs) = compare(&llama, &tok, &texts);
    println!("AG News examples + raw lines: {identical}/{compared} identical");
    assert_eq!(compared, 7600 + 7601);
    assert_eq!(identical, compared, "{diffs:#?}");
}

#[test]
fn edge_cases_special_tokens_and_bos_match_llama_cpp() {
    let (llama, tok) = (llama(), tokenizer());
    assert_eq!(tok.vocab_size(), llama.n_vocab());
    assert_eq!(tok.pre(), "smollm");
    let cases = [
        "",
        " ",
        "   ",
        "\n",
        "\n\n\t \r\n",
        "  leading and trailing  ",
        "x  \n  y",
        "it's I'M we'll they've she'd don't 'quoted'",
        "1234567890 3.14159 -42 1,000,000 ١٢٣ ½ Ⅻ",
        "emoji 🦀👍🏽 and ZWJ 👩‍💻",
        "中文字符 日本語 한국어 Ελληνικά Русский",
        "a\u{a0}b\u{2009}c\u{3000}d",
        "tabs\tand\u{b}vertical\u{c}feeds",
        "<|im_start|>user\nnot parsed<|im_end|>",
        "<unk> <s> </s> <|endoftext|>",
        "https://example.invalid/path?q=1&x=%20 — “curly” ‘quotes’ … €£¥",
        "CamelCaseWords snake_case_words ALLCAPS",
        // Control bytes whose byte-level symbols SmolLM2's vocabulary lacks (dropped by both).
        "a\u{1d}b \u{1c}x\u{1f}",
    ];
    for text in cases {
        assert_eq!(
            tok.encode(text, false).unwrap(),
            theirs(&llama, text, false),
            "{text:?}"
        );
        // BOS/EOS as the model's metadata asks (llama.cpp's add_special).
        assert_eq!(
            tok.encode(text, true).unwrap(),
            theirs(&llama, text, true),
            "{text:?} with special tokens"
        );
    }

    // Parsed control tokens: llama.cpp splits the text at them and tokenizes the pieces.
    let start = tok.token_to_id("<|im_start|>").unwrap();
    let end = tok.token_to_id("<|im_end|>").unwrap();
    let chat = "<|im_start|>user\nHi there<|im_end|>\n";
    let mut want = vec![start];
    want.extend(theirs(&llama, "user\nHi there", false));
    want.push(end);
    want.extend(theirs(&llama, "\n", false));
    assert_eq!(tok.encode_special(chat, false).unwrap(), want);
    assert_ne!(tok.encode(chat, false).unwrap(), want);
}

#[test]
fn truncation_keeps_a_token_prefix_of_llama_cpps_encoding() {
    let (llama, tok) = (llama(), tokenizer());
    let texts = bbc_raw();
    let budget = 80;
    let mut exact = 0;
    for (name, text) in texts.iter().step_by(5) {
        let full = theirs(&llama, text, false);
        let cut = tok.truncate_to_tokens(text, budget).unwrap();
        assert!(text.starts_with(cut), "{name}");
        let kept = theirs(&llama, cut, false);
        assert!(kept.len() <= budget, "{name}: {} tokens", kept.len());
        assert_eq!(kept, full[..kept.len()], "{name}: not a prefix");
        exact += usize::from(kept.len() == budget);
    }
    println!(
        "truncation to {budget}: {exact}/{} cuts keep exactly {budget} tokens",
        texts.len().div_ceil(5)
    );
}

fn write(dir: &Path, name: &str, kv: &[(String, GgufValue)]) -> PathBuf {
    let data = [0f32; 4];
    let tensor = F32Tensor {
        name: "token_embd.weight",
        dims: &[4],
        data: &data,
    };
    let path = dir.join(name);
    std::fs::write(&path, write_gguf_f32(kv, &[tensor])).unwrap();
    path
}

#[test]
fn models_without_a_usable_tokenizer_are_clear_errors() {
    // (A missing file is covered by the unit tests in fwdllm_shared::tokenizer.)
    let dir = tempfile::tempdir().unwrap();
    let arch = (
        "general.architecture".to_string(),
        GgufValue::String("llama".into()),
    );
    let bare = write(dir.path(), "bare.gguf", std::slice::from_ref(&arch));
    let e = GgufTokenizer::from_gguf(&bare).unwrap_err();
    assert!(
        matches!(
            e,
            TokenizerError::MissingKey {
                key: "tokenizer.ggml.model",
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("bare.gguf"), "{e}");

    let spm = write(
        dir.path(),
        "spm.gguf",
        &[
            arch,
            (
                "tokenizer.ggml.model".into(),
                GgufValue::String("llama".into()),
            ),
        ],
    );
    let e = GgufTokenizer::from_gguf(&spm).unwrap_err();
    assert!(
        matches!(&e, TokenizerError::UnsupportedModel { model, .. } if model == "llama"),
        "{e}"
    );
}
