//! A model's own tokenizer, rebuilt from the vocabulary and merges embedded in its GGUF header,
//! so that data preparation, token counts and prompt truncation run where llama.cpp and the
//! weights are not (the aggregator, a laptop). Only the header is read, never tensor data.
//!
//! Supported: `tokenizer.ggml.model = "gpt2"` (byte-level BPE) with the pre-tokenizers whose
//! llama.cpp splitting rules are reproduced below. Everything else (SentencePiece `"llama"`,
//! WordPiece `"bert"`, unknown `pre` types) is a [`TokenizerError`], never a guess.
//!
//! Parity with llama.cpp (vendored by llama-cpp-sys-2 0.1.160, `src/llama-vocab.cpp`,
//! `src/unicode.cpp`) is what matters, not with Hugging Face: `edge-agent/tests/
//! tokenizer_parity.rs` compares token ids on the BBC and AG News corpora. Facts relied on:
//! * token id = index in `tokenizer.ggml.tokens`; a merge rule `"a b"` splits at the first
//!   space after byte 0 (`word.find(' ', 1)`), its rank is its index;
//! * pre-tokenizer `"smollm"` = the regexes `\p{N}` then the GPT-2 pattern
//!   (`unicode_regex_split_custom_gpt2`), i.e. Hugging Face's `Digits(individual)` followed by
//!   `ByteLevel(use_regex)`; `"gpt2"` is the GPT-2 pattern alone;
//! * CONTROL and UNKNOWN tokens are matched in the text only when special parsing is asked for
//!   (`parse_special`); USER_DEFINED tokens are always matched;
//! * `add_special` adds BOS / EOS only if `tokenizer.ggml.add_bos_token` /
//!   `add_eos_token` say so (both default to false for `gpt2`).

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper, Tokenizer};

use crate::gguf::{read_gguf_header, GgufError, GgufFile, GgufValue};

/// `llama_token_type` values stored in `tokenizer.ggml.token_type`.
mod token_type {
    pub(super) const UNKNOWN: i64 = 2;
    pub(super) const CONTROL: i64 = 3;
    pub(super) const USER_DEFINED: i64 = 4;
}

/// llama.cpp's BOS/EOS defaults for `gpt2` vocabularies when the ids are not in the file.
const GPT2_DEFAULT_BOS_EOS: u32 = 11;

/// Why a GGUF's tokenizer could not be built or used. Each variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{path}: {source}")]
    Gguf {
        path: PathBuf,
        #[source]
        source: GgufError,
    },
    #[error("{path}: metadata key `{key}` is missing; the file has no embedded tokenizer (re-convert it with llama.cpp's convert_hf_to_gguf.py)")]
    MissingKey { path: PathBuf, key: &'static str },
    #[error("{path}: metadata key `{key}` should be {expected}")]
    WrongType {
        path: PathBuf,
        key: &'static str,
        expected: &'static str,
    },
    #[error("{path}: tokenizer model {model:?} is not supported; only byte-level BPE (\"gpt2\") is (SentencePiece \"llama\" and others need llama.cpp itself)")]
    UnsupportedModel { path: PathBuf, model: String },
    #[error("{path}: pre-tokenizer {pre:?} is not supported (supported: {supported:?}); add its llama.cpp split rules to fwdllm_shared::tokenizer and a parity test first")]
    UnsupportedPre {
        path: PathBuf,
        pre: String,
        supported: &'static [&'static str],
    },
    #[error("{path}: invalid vocabulary: {problem}")]
    BadVocab { path: PathBuf, problem: String },
    #[error("{path}: tokenizer: {message}")]
    Tokenizers { path: PathBuf, message: String },
}

/// Pre-tokenizers (`tokenizer.ggml.pre`) reproduced here.
const SUPPORTED_PRE: &[&str] = &["smollm", "gpt2"];

/// A byte-level BPE tokenizer equivalent to llama.cpp's for the same GGUF.
#[derive(Clone)]
pub struct GgufTokenizer {
    path: PathBuf,
    /// Control tokens in the text are plain text (llama.cpp `parse_special = false`).
    plain: Tokenizer,
    /// Control tokens in the text become their ids (`parse_special = true`, chat templates).
    special: Tokenizer,
    n_vocab: usize,
    pre: String,
    bos: u32,
    eos: u32,
    add_bos: bool,
    add_eos: bool,
}

impl std::fmt::Debug for GgufTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufTokenizer")
            .field("path", &self.path)
            .field("n_vocab", &self.n_vocab)
            .field("pre", &self.pre)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("add_bos", &self.add_bos)
            .field("add_eos", &self.add_eos)
            .finish_non_exhaustive()
    }
}

impl GgufTokenizer {
    /// Builds the tokenizer from the header of the GGUF model at `path` (tensor data is never
    /// read, so this is cheap even for large models).
    pub fn from_gguf(path: impl AsRef<Path>) -> Result<GgufTokenizer, TokenizerError> {
        let path = path.as_ref();
        let gguf_err = |source| TokenizerError::Gguf {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(|source| {
            gguf_err(GgufError::Open {
                path: path.to_path_buf(),
                source,
            })
        })?;
        let header = read_gguf_header(BufReader::with_capacity(1 << 16, file)).map_err(gguf_err)?;
        Self::from_header(path, &header)
    }

    /// Builds the tokenizer from an already parsed header; `path` is only used in errors.
    pub fn from_header(path: &Path, gguf: &GgufFile) -> Result<GgufTokenizer, TokenizerError> {
        let meta = Meta { path, gguf };
        let model = meta.str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(TokenizerError::UnsupportedModel {
                path: path.to_path_buf(),
                model: model.to_string(),
            });
        }
        let pre = meta.str("tokenizer.ggml.pre")?;
        let pre_tokenizer = pre_tokenizer(pre).ok_or_else(|| TokenizerError::UnsupportedPre {
            path: path.to_path_buf(),
            pre: pre.to_string(),
            supported: SUPPORTED_PRE,
        })?;
        let tokens = meta.strings("tokenizer.ggml.tokens")?;
        let merges = meta.strings("tokenizer.ggml.merges")?;
        let types = meta.ints("tokenizer.ggml.token_type")?;
        let bad = |problem: String| TokenizerError::BadVocab {
            path: path.to_path_buf(),
            problem,
        };
        if types.len() != tokens.len() {
            return Err(bad(format!(
                "{} token types for {} tokens",
                types.len(),
                tokens.len()
            )));
        }
        let n_vocab = tokens.len();
        let mut vocab = tokenizers::models::bpe::Vocab::with_capacity(n_vocab);
        for (id, t) in tokens.iter().enumerate() {
            if vocab.insert((*t).to_string(), id as u32).is_some() {
                return Err(bad(format!(
                    "token {t:?} appears twice (second at id {id})"
                )));
            }
        }
        // SmolLM2's vocabulary lacks the symbols of a few control bytes (e.g. 0x1D). Like
        // llama.cpp, the BPE model then drops such a byte from the output (no unknown token).
        let merges = merges
            .iter()
            .enumerate()
            .map(|(rank, m)| {
                // llama.cpp: `word.find(' ', 1)`, so a merge may start with a literal space.
                m.char_indices()
                    .skip(1)
                    .find(|&(_, c)| c == ' ')
                    .map(|(i, _)| (m[..i].to_string(), m[i + 1..].to_string()))
                    .ok_or_else(|| bad(format!("merge {rank} {m:?} is not \"left right\"")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| bad(format!("BPE: {e}")))?;

        let mut specials = Vec::new();
        let mut user_defined = Vec::new();
        for (t, &ty) in tokens.iter().zip(&types) {
            match ty {
                token_type::CONTROL | token_type::UNKNOWN => {
                    specials.push(AddedToken::from(*t, true).normalized(false))
                }
                token_type::USER_DEFINED => {
                    user_defined.push(AddedToken::from(*t, false).normalized(false))
                }
                _ => {}
            }
        }
        let mut plain = Tokenizer::new(bpe);
        plain
            .with_pre_tokenizer(Some(pre_tokenizer))
            .with_decoder(Some(ByteLevelDecoder::default()));
        plain.add_special_tokens(&specials);
        plain.add_tokens(&user_defined);
        let mut special = plain.clone();
        plain.set_encode_special_tokens(true);
        special.set_encode_special_tokens(false);

        let id = |key: &'static str| -> Result<u32, TokenizerError> {
            let v = match meta.opt(key) {
                None => return Ok(GPT2_DEFAULT_BOS_EOS),
                Some(v) => v,
            };
            v.as_u64()
                .and_then(|i| u32::try_from(i).ok())
                .filter(|&i| (i as usize) < n_vocab)
                .ok_or_else(|| TokenizerError::WrongType {
                    path: path.to_path_buf(),
                    key,
                    expected: "a token id below the vocabulary size",
                })
        };
        let flag = |key: &'static str| -> Result<bool, TokenizerError> {
            match meta.opt(key) {
                None => Ok(false),
                Some(GgufValue::Bool(b)) => Ok(*b),
                Some(_) => Err(TokenizerError::WrongType {
                    path: path.to_path_buf(),
                    key,
                    expected: "a bool",
                }),
            }
        };
        Ok(GgufTokenizer {
            path: path.to_path_buf(),
            plain,
            special,
            n_vocab,
            pre: pre.to_string(),
            bos: id("tokenizer.ggml.bos_token_id")?,
            eos: id("tokenizer.ggml.eos_token_id")?,
            add_bos: flag("tokenizer.ggml.add_bos_token")?,
            add_eos: flag("tokenizer.ggml.add_eos_token")?,
        })
    }

    /// Token ids of `text`, like `llama_tokenize(text, add_special, parse_special = false)`:
    /// control tokens written in the text (`<|im_start|>`) are tokenized as plain text.
    /// `add_special` adds BOS/EOS only where the model's metadata asks for them.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, TokenizerError> {
        self.encode_with(&self.plain, text, add_special)
    }

    /// Like [`encode`](Self::encode) but control tokens written in the text become their ids
    /// (`parse_special = true`), as chat templates need.
    pub fn encode_special(
        &self,
        text: &str,
        add_special: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        self.encode_with(&self.special, text, add_special)
    }

    fn encode_with(
        &self,
        tok: &Tokenizer,
        text: &str,
        add_special: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        let enc = tok.encode_fast(text, false).map_err(|e| self.err(e))?;
        let ids = enc.get_ids();
        let mut out = Vec::with_capacity(ids.len() + 2);
        if add_special && self.add_bos {
            out.push(self.bos);
        }
        out.extend_from_slice(ids);
        if add_special && self.add_eos {
            out.push(self.eos);
        }
        Ok(out)
    }

    /// Number of tokens of `text` (no BOS/EOS, control tokens as plain text).
    pub fn count(&self, text: &str) -> Result<usize, TokenizerError> {
        Ok(self.encode(text, false)?.len())
    }

    /// The longest prefix of `text` that ends where a token of `text`'s encoding starts and
    /// that encodes to at most `max_tokens` tokens (no BOS/EOS). Usually its encoding is the
    /// first `max_tokens` tokens of `text`'s; BPE is not prefix-stable, so when re-encoding the
    /// cut gives more tokens the cut moves back one token at a time. `text` itself if it fits.
    pub fn truncate_to_tokens<'t>(
        &self,
        text: &'t str,
        max_tokens: usize,
    ) -> Result<&'t str, TokenizerError> {
        let enc = self.plain.encode(text, false).map_err(|e| self.err(e))?;
        let offsets = enc.get_offsets();
        if offsets.len() <= max_tokens {
            return Ok(text);
        }
        let mut k = max_tokens;
        loop {
            // A token that starts inside a multi-byte character reports the character's start,
            // so the cut never splits a character (checked anyway).
            let cut = offsets[k].0;
            let prefix = text.get(..cut).ok_or_else(|| TokenizerError::Tokenizers {
                path: self.path.clone(),
                message: format!("token offset {cut} is not a character boundary"),
            })?;
            if k == 0 || self.count(prefix)? <= max_tokens {
                return Ok(prefix);
            }
            k -= 1;
        }
    }

    /// The text of `ids` (control tokens included), like llama.cpp's detokenizer with
    /// `clean_spaces = false`; invalid UTF-8 from partial characters becomes U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.plain.decode(ids, false).map_err(|e| self.err(e))
    }

    /// Number of tokens in the vocabulary (`tokenizer.ggml.tokens`).
    pub fn vocab_size(&self) -> usize {
        self.n_vocab
    }

    /// The `tokenizer.ggml.pre` name this tokenizer reproduces.
    pub fn pre(&self) -> &str {
        &self.pre
    }

    /// The BOS id and whether [`encode`](Self::encode) adds it when asked for special tokens.
    pub fn bos(&self) -> (u32, bool) {
        (self.bos, self.add_bos)
    }

    /// The EOS id and whether [`encode`](Self::encode) adds it when asked for special tokens.
    pub fn eos(&self) -> (u32, bool) {
        (self.eos, self.add_eos)
    }

    /// The id of a token string, if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.plain.token_to_id(token)
    }

    fn err(&self, e: tokenizers::Error) -> TokenizerError {
        TokenizerError::Tokenizers {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }
}

/// The pre-tokenizer reproducing llama.cpp's split rules for `pre`.
fn pre_tokenizer(pre: &str) -> Option<PreTokenizerWrapper> {
    // No prefix space; `use_regex` is the GPT-2 pattern that llama.cpp implements by hand in
    // `unicode_regex_split_custom_gpt2` (including the trailing `\s+` alternative).
    let byte_level = ByteLevel::new(false, false, true);
    Some(match pre {
        "smollm" => PreTokenizerWrapper::Sequence(Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            PreTokenizerWrapper::ByteLevel(byte_level),
        ])),
        "gpt2" => PreTokenizerWrapper::ByteLevel(byte_level),
        _ => return None,
    })
}

/// Typed access to the header's metadata with errors naming the file.
struct Meta<'a> {
    path: &'a Path,
    gguf: &'a GgufFile,
}

impl<'a> Meta<'a> {
    fn opt(&self, key: &str) -> Option<&'a GgufValue> {
        self.gguf.get(key)
    }

    fn get(&self, key: &'static str) -> Result<&'a GgufValue, TokenizerError> {
        self.gguf
            .get(key)
            .ok_or_else(|| TokenizerError::MissingKey {
                path: self.path.to_path_buf(),
                key,
            })
    }

    fn wrong(&self, key: &'static str, expected: &'static str) -> TokenizerError {
        TokenizerError::WrongType {
            path: self.path.to_path_buf(),
            key,
            expected,
        }
    }

    fn str(&self, key: &'static str) -> Result<&'a str, TokenizerError> {
        self.get(key)?
            .as_str()
            .ok_or_else(|| self.wrong(key, "a string"))
    }

    fn array(&self, key: &'static str) -> Result<&'a [GgufValue], TokenizerError> {
        match self.get(key)? {
            GgufValue::Array { values, .. } => Ok(values),
            _ => Err(self.wrong(key, "an array")),
        }
    }

    fn strings(&self, key: &'static str) -> Result<Vec<&'a str>, TokenizerError> {
        self.array(key)?
            .iter()
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| self.wrong(key, "an array of strings"))
            })
            .collect()
    }

    fn ints(&self, key: &'static str) -> Result<Vec<i64>, TokenizerError> {
        self.array(key)?
            .iter()
            .map(|v| match *v {
                GgufValue::I32(i) => Ok(i64::from(i)),
                GgufValue::U32(i) => Ok(i64::from(i)),
                _ => Err(self.wrong(key, "an array of 32-bit integers")),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::write_gguf_f32;

    /// A tiny byte-level vocabulary: the 256 byte symbols, then merged tokens and specials.
    fn kv(pre: &str, extra: &[(&str, i32)], merges: &[&str]) -> Vec<(String, GgufValue)> {
        let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
        alphabet.sort_unstable();
        let mut tokens: Vec<String> = alphabet.iter().map(|c| c.to_string()).collect();
        let mut types = vec![1i32; tokens.len()];
        for (t, ty) in extra {
            tokens.push((*t).to_string());
            types.push(*ty);
        }
        let strings = |v: Vec<String>| GgufValue::Array {
            elem_type: 8,
            values: v.into_iter().map(GgufValue::String).collect(),
        };
        vec![
            (
                "tokenizer.ggml.model".into(),
                GgufValue::String("gpt2".into()),
            ),
            ("tokenizer.ggml.pre".into(), GgufValue::String(pre.into())),
            ("tokenizer.ggml.tokens".into(), strings(tokens)),
            (
                "tokenizer.ggml.token_type".into(),
                GgufValue::Array {
                    elem_type: 5,
                    values: types.into_iter().map(GgufValue::I32).collect(),
                },
            ),
            (
                "tokenizer.ggml.merges".into(),
                strings(merges.iter().map(|m| (*m).to_string()).collect()),
            ),
            ("tokenizer.ggml.bos_token_id".into(), GgufValue::U32(256)),
            ("tokenizer.ggml.add_bos_token".into(), GgufValue::Bool(true)),
        ]
    }

    fn build(kv: &[(String, GgufValue)]) -> Result<GgufTokenizer, TokenizerError> {
        let bytes = write_gguf_f32(kv, &[]);
        let header = read_gguf_header(bytes.as_slice()).unwrap();
        GgufTokenizer::from_header(Path::new("test.gguf"), &header)
    }

    fn tiny() -> GgufTokenizer {
        build(&kv(
            "smollm",
            &[("<s>", 3), ("he", 1), ("ll", 1), ("hell", 1), ("Ġhe", 1)],
            &["h e", "l l", "he ll", "Ġ he"],
        ))
        .unwrap()
    }

    fn id(t: &GgufTokenizer, s: &str) -> u32 {
        t.token_to_id(s).unwrap()
    }

    #[test]
    fn merges_apply_by_rank_and_digits_split_individually() {
        let t = tiny();
        let ids = t.encode("hello he 42", false).unwrap();
        let want = [
            id(&t, "hell"),
            id(&t, "o"),
            id(&t, "Ġhe"),
            id(&t, "Ġ"),
            id(&t, "4"),
            id(&t, "2"),
        ];
        assert_eq!(ids, want);
        assert_eq!(t.decode(&ids).unwrap(), "hello he 42");
    }

    #[test]
    fn bos_is_added_only_when_asked_and_the_model_wants_it() {
        let t = tiny();
        assert_eq!(t.encode("he", true).unwrap(), [256, id(&t, "he")]);
        assert_eq!(t.encode("he", false).unwrap(), [id(&t, "he")]);
        assert_eq!(t.bos(), (256, true));
    }

    #[test]
    fn control_tokens_are_text_unless_special_parsing_is_asked_for() {
        let t = tiny();
        let s = id(&t, "<s>");
        assert!(!t.encode("<s>he", false).unwrap().contains(&s));
        assert_eq!(t.encode_special("<s>he", false).unwrap(), [s, id(&t, "he")]);
    }

    #[test]
    fn truncation_cuts_at_a_token_boundary_and_never_splits_a_character() {
        let t = tiny();
        assert_eq!(t.truncate_to_tokens("hello he", 2).unwrap(), "hello");
        assert_eq!(t.truncate_to_tokens("hello he", 9).unwrap(), "hello he");
        assert_eq!(t.truncate_to_tokens("hello he", 0).unwrap(), "");
        // "é" is two byte tokens; one token of budget cannot hold half of it.
        assert_eq!(t.truncate_to_tokens("aé", 2).unwrap(), "a");
        assert_eq!(t.truncate_to_tokens("aé", 3).unwrap(), "aé");
    }

    #[test]
    fn unsupported_models_and_pre_tokenizers_are_errors() {
        let mut spm = kv("smollm", &[], &[]);
        spm[0].1 = GgufValue::String("llama".into());
        let e = build(&spm).unwrap_err();
        assert!(
            matches!(&e, TokenizerError::UnsupportedModel { model, .. } if model == "llama"),
            "{e}"
        );
        let e = build(&kv("qwen2", &[], &[])).unwrap_err();
        assert!(
            matches!(&e, TokenizerError::UnsupportedPre { pre, .. } if pre == "qwen2"),
            "{e}"
        );
    }

    #[test]
    fn malformed_vocabularies_are_errors() {
        let check = |kv: Vec<(String, GgufValue)>, needle: &str| {
            let e = build(&kv).unwrap_err();
            assert!(matches!(e, TokenizerError::BadVocab { .. }), "{e}");
            assert!(e.to_string().contains(needle), "{e}");
        };
        check(kv("smollm", &[("a", 1)], &[]), "appears twice");
        check(kv("smollm", &[], &["x y"]), "BPE");
        check(kv("smollm", &[], &["xy"]), "is not \"left right\"");
        let mut short = kv("smollm", &[], &[]);
        short[3].1 = GgufValue::Array {
            elem_type: 5,
            values: vec![GgufValue::I32(1)],
        };
        check(short, "token types");
    }

    #[test]
    fn missing_keys_and_files_name_the_problem() {
        let mut no_merges = kv("smollm", &[], &[]);
        no_merges.retain(|(k, _)| k != "tokenizer.ggml.merges");
        let e = build(&no_merges).unwrap_err();
        assert!(
            matches!(
                e,
                TokenizerError::MissingKey {
                    key: "tokenizer.ggml.merges",
                    ..
                }
            ),
            "{e}"
        );
        let e = GgufTokenizer::from_gguf("/nonexistent/model.gguf").unwrap_err();
        assert!(
            matches!(
                &e,
                TokenizerError::Gguf {
                    source: GgufError::Open { .. },
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("/nonexistent/model.gguf"), "{e}");
    }
}
