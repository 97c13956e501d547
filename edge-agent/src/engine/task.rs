//! A task prepared for the loaded model ([`Task`]: prompt pieces and label words as token
//! ids) and tokenization: [`Engine::prepare_task`], [`Engine::set_task`], the prompt of one
//! text ([`Engine::prompt_tokens`]), and the tokenizer helpers (`tokenize`, `truncate_text`,
//! `token_piece`).

use std::path::Path;

use super::{llama, Engine, EngineError};
use crate::data::TaskConfig;

/// A task prepared for one model: prompt pieces and label tokens as token ids.
#[derive(Debug, Clone)]
pub struct Task {
    pub config: TaskConfig,
    pub(super) prefix: Vec<llama::Token>,
    pub(super) suffix: Vec<llama::Token>,
    pub(super) label_tokens: Vec<llama::Token>,
}

/// Prompt tokens per text, for the task whose prefix, suffix and text budget form `key`.
/// Daemons ask for one direction at a time (`gradient.seeds_per_chunk` = 1), so each batch's
/// prompts were tokenized once per direction: with head rows (hundreds of directions on cached
/// features) llama.cpp's BPE took over half of a federated round's CPU (perf, 2026-12-05).
/// Bounded by entries; past the bound new texts are tokenized but not kept.
#[derive(Debug, Default)]
pub(super) struct PromptMemo {
    key: (Vec<llama::Token>, Vec<llama::Token>, u32),
    map: std::collections::HashMap<String, Vec<llama::Token>>,
}

/// Texts a [`PromptMemo`] keeps (a few MiB for short classification texts).
const PROMPT_MEMO_ENTRIES: usize = 1 << 16;

impl PromptMemo {
    fn key_of(task: &Task) -> (Vec<llama::Token>, Vec<llama::Token>, u32) {
        (
            task.prefix.clone(),
            task.suffix.clone(),
            task.config.max_text_tokens,
        )
    }

    /// The tokens of `text` for `task`, from the memo or from `tokenize`.
    pub(super) fn get_or_tokenize(
        &mut self,
        task: &Task,
        text: &str,
        tokenize: impl FnOnce() -> Vec<llama::Token>,
    ) -> Vec<llama::Token> {
        if self.key.0 != task.prefix
            || self.key.1 != task.suffix
            || self.key.2 != task.config.max_text_tokens
        {
            self.key = Self::key_of(task);
            self.map.clear();
        }
        if let Some(t) = self.map.get(text) {
            return t.clone();
        }
        let t = tokenize();
        if self.map.len() < PROMPT_MEMO_ENTRIES {
            self.map.insert(text.to_string(), t.clone());
        }
        t
    }
}

impl Task {
    pub fn label_tokens(&self) -> &[llama::Token] {
        &self.label_tokens
    }
    pub fn n_labels(&self) -> usize {
        self.label_tokens.len()
    }
}

impl Engine {
    /// Tokenizes text with the model's vocabulary (no BOS).
    pub fn tokenize(&self, text: &str) -> Vec<llama::Token> {
        self.llama.tokenize(text, false)
    }

    /// `text` cut to its first `max_tokens` tokens (unchanged if it has no more): the
    /// truncation SFT tasks apply to prompt fields and responses
    /// (`data::sft::SftTaskConfig::load_examples`).
    pub fn truncate_text(&self, text: &str, max_tokens: u32) -> String {
        let t = self.llama.tokenize(text, false);
        if t.len() <= max_tokens as usize {
            return text.to_string();
        }
        let bytes: Vec<u8> = t[..max_tokens as usize]
            .iter()
            .flat_map(|&x| self.llama.token_bytes(x))
            .collect();
        // A cut can split a UTF-8 character across tokens: drop the incomplete tail.
        match std::str::from_utf8(&bytes) {
            Ok(s) => s.to_string(),
            Err(e) => String::from_utf8_lossy(&bytes[..e.valid_up_to()]).into_owned(),
        }
    }

    pub fn token_piece(&self, t: llama::Token) -> String {
        self.llama.token_piece(t)
    }

    /// Prepares `config` for this model (token ids of prompt pieces and label words).
    pub fn prepare_task(&self, config: &TaskConfig) -> Result<Task, EngineError> {
        let err = |problem: String| EngineError::Task {
            task: config.name.clone(),
            problem,
        };
        config
            .validate(Path::new(&config.name))
            .map_err(|e| err(e.to_string()))?;
        let (pre, post) = config
            .prompt
            .split_once("{text}")
            .ok_or_else(|| err("prompt lacks {text}".into()))?;
        let mut prefix = self.llama.tokenize(pre, self.add_bos);
        if prefix.is_empty() && self.add_bos {
            prefix = self.llama.tokenize("", true);
        }
        let suffix = self.llama.tokenize(post, false);
        let mut label_tokens = Vec::new();
        for w in &config.words {
            let t = self.llama.tokenize(w, false);
            let first = *t
                .first()
                .ok_or_else(|| err(format!("label word {w:?} has no tokens")))?;
            if let Some(i) = label_tokens.iter().position(|&x| x == first) {
                return Err(err(format!(
                    "label words {:?} and {w:?} start with the same token {:?}; choose words whose first tokens differ",
                    config.words[i],
                    self.llama.token_piece(first)
                )));
            }
            label_tokens.push(first);
        }
        Ok(Task {
            config: config.clone(),
            prefix,
            suffix,
            label_tokens,
        })
    }

    /// Prepares and activates a task for [`Engine::forward_gradients`] and [`Engine::evaluate`].
    pub fn set_task(&mut self, config: &TaskConfig) -> Result<(), EngineError> {
        self.task = Some(self.prepare_task(config)?);
        // A memoised L(θ) was measured with the previous task's prompt and label words.
        self.base_loss = None;
        Ok(())
    }

    pub fn task(&self) -> Option<&Task> {
        self.task.as_ref()
    }

    pub(super) fn active_task(&self) -> Result<Task, EngineError> {
        self.task.clone().ok_or(EngineError::NoTask)
    }

    /// [`Engine::prompt_tokens`] through the engine's memo (the training hot path).
    pub(super) fn prompt_tokens_memo(&mut self, task: &Task, text: &str) -> Vec<llama::Token> {
        let mut memo = std::mem::take(&mut self.prompt_memo);
        let t = memo.get_or_tokenize(task, text, || self.prompt_tokens(task, text));
        self.prompt_memo = memo;
        t
    }

    /// Token ids of one prompt: prefix + text cut to `max_text_tokens` + suffix.
    pub fn prompt_tokens(&self, task: &Task, text: &str) -> Vec<llama::Token> {
        let max = task.config.max_text_tokens as usize;
        // Tokenize only a generous prefix of long texts (tokens average > 2 bytes).
        let mut cut = text.len().min(max * 12 + 64);
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        let mut body = self.llama.tokenize(&text[..cut], false);
        body.truncate(max);
        let mut out = Vec::with_capacity(task.prefix.len() + body.len() + task.suffix.len());
        out.extend_from_slice(&task.prefix);
        out.extend_from_slice(&body);
        out.extend_from_slice(&task.suffix);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(suffix: &[llama::Token], max_text_tokens: u32) -> Task {
        let mut config: TaskConfig = toml::from_str(
            "name = \"t\"\nprompt = \"{text}\"\nlabels = [\"a\", \"b\"]\nwords = [\" a\", \" b\"]\n[source]\nformat = \"csv\"\npath = \"x.csv\"\nlabel_column = \"label\"\ntext_columns = [\"text\"]\n",
        )
        .expect("task toml");
        config.max_text_tokens = max_text_tokens;
        Task {
            config,
            prefix: vec![1],
            suffix: suffix.to_vec(),
            label_tokens: vec![7, 8],
        }
    }

    #[test]
    fn prompt_memo_tokenizes_a_text_once_per_task() {
        let mut memo = PromptMemo::default();
        let t = task(&[9], 64);
        assert_eq!(
            memo.get_or_tokenize(&t, "x", || vec![1, 2, 9]),
            vec![1, 2, 9]
        );
        // A second request for the same text is served from the memo.
        let again = memo.get_or_tokenize(&t, "x", || panic!("tokenized twice"));
        assert_eq!(again, vec![1, 2, 9]);
        // Another task (suffix or text budget) must not see the first task's tokens.
        let other = task(&[10], 64);
        assert_eq!(
            memo.get_or_tokenize(&other, "x", || vec![1, 2, 10]),
            vec![1, 2, 10]
        );
        let shorter = task(&[10], 8);
        assert_eq!(
            memo.get_or_tokenize(&shorter, "x", || vec![1, 10]),
            vec![1, 10]
        );
    }
}
