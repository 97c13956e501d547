//! Instruction-tuning tasks (`kind = "sft"`): a prompt template and a response template over
//! the fields of CSV rows or JSON Lines objects, token truncation of each field, the same
//! fixed-seed held-out / dev / train split as classification, and JSONL shards of rendered
//! `{"prompt", "response"}` pairs for agents.
//!
//! Templates name fields in braces: `prompt = "Article: {description}\nHeadline:"`,
//! `response = " {title}"`. Everything outside braces is literal; `{{` and `}}` are literal
//! braces. Truncation needs the model's tokenizer, which this module does not own (it runs
//! without weights), so callers pass a [`Truncate`] (the engine's, or the identity in tests).

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{
    config_err, io_err, non_empty, resolve, row_err, CsvFile, DataError, SftExample, Split,
    TaskConfig,
};

/// Which loss a task file describes; `classification` when the key is absent, so the
/// classification tasks written before SFT existed keep working unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskKind {
    #[default]
    Classification,
    Sft,
}

/// Where an SFT task's rows come from. Relative paths resolve against the root passed to
/// [`SftTaskConfig::load_examples`], as for classification.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "format", rename_all = "snake_case", deny_unknown_fields)]
pub enum SftSource {
    /// CSV with a header; template fields name columns.
    Csv { path: PathBuf },
    /// JSON Lines objects; template fields name keys (strings, or numbers/booleans as text).
    Jsonl { path: PathBuf },
}

impl SftSource {
    pub fn path(&self) -> &Path {
        match self {
            SftSource::Csv { path } | SftSource::Jsonl { path } => path,
        }
    }
}

/// An instruction-tuning task. Shipped example: `edge-agent/tasks/ag_news_headline.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SftTaskConfig {
    pub name: String,
    /// Always [`TaskKind::Sft`] (kept so that the file round-trips).
    pub kind: TaskKind,
    /// Prompt template (context only; not scored), e.g. `"Article: {description}\nHeadline:"`.
    pub prompt: String,
    /// Response template (the scored tokens), e.g. `" {title}"`: the leading space makes the
    /// first response token the word-initial token the model would emit after the prompt.
    pub response: String,
    /// Each prompt field is cut to this many tokens before it goes into the template.
    #[serde(default = "default_max_text_tokens")]
    pub max_text_tokens: u32,
    /// The rendered response is cut to this many tokens; it is also the generation budget.
    #[serde(default = "default_max_response_tokens")]
    pub max_response_tokens: u32,
    pub source: SftSource,
    #[serde(default = "super::default_heldout")]
    pub heldout: usize,
    #[serde(default = "super::default_dev")]
    pub dev: usize,
    #[serde(default)]
    pub split_seed: u64,
}

fn default_max_text_tokens() -> u32 {
    96
}
fn default_max_response_tokens() -> u32 {
    32
}

/// Cuts `text` to at most `max_tokens` tokens of the model's vocabulary.
pub type Truncate<'a> = dyn Fn(&str, u32) -> String + 'a;

/// One piece of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Literal(String),
    Field(String),
}

/// A parsed `{field}` template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pieces: Vec<Piece>,
}

impl Template {
    /// Parses a template; the error says what is wrong in words a config author can act on.
    pub fn parse(s: &str) -> Result<Template, String> {
        let mut pieces = Vec::new();
        let mut lit = String::new();
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    lit.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    lit.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) if c.is_alphanumeric() || c == '_' || c == '-' => name.push(c),
                            Some(c) => {
                                return Err(format!(
                                    "character {c:?} inside {{{name}…}}: field names are letters, digits, '_' or '-' (write {{{{ for a literal brace)"
                                ))
                            }
                            None => {
                                return Err(format!(
                                    "unclosed {{{name}: close the field with }} (or write {{{{ for a literal brace)"
                                ))
                            }
                        }
                    }
                    if name.is_empty() {
                        return Err("empty field {}: name a column or JSON key".into());
                    }
                    if !lit.is_empty() {
                        pieces.push(Piece::Literal(std::mem::take(&mut lit)));
                    }
                    pieces.push(Piece::Field(name));
                }
                '}' => return Err("stray '}': write }} for a literal brace".into()),
                c => lit.push(c),
            }
        }
        if !lit.is_empty() {
            pieces.push(Piece::Literal(lit));
        }
        Ok(Template { pieces })
    }

    pub fn pieces(&self) -> &[Piece] {
        &self.pieces
    }

    /// Field names in order of first use.
    pub fn fields(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for p in &self.pieces {
            if let Piece::Field(f) = p {
                if !out.contains(&f.as_str()) {
                    out.push(f);
                }
            }
        }
        out
    }

    /// The template with each field replaced by `value(field)`.
    pub fn render(&self, mut value: impl FnMut(&str) -> String) -> String {
        let mut out = String::new();
        for p in &self.pieces {
            match p {
                Piece::Literal(l) => out.push_str(l),
                Piece::Field(f) => out.push_str(&value(f)),
            }
        }
        out
    }
}

impl SftTaskConfig {
    /// Checks the templates and limits; `path` names the file in errors.
    pub fn validate(&self, path: &Path) -> Result<(Template, Template), DataError> {
        let bad = config_err(path);
        if self.kind != TaskKind::Sft {
            return Err(bad("an SFT task needs kind = \"sft\"".into()));
        }
        let prompt = Template::parse(&self.prompt).map_err(|e| bad(format!("`prompt`: {e}")))?;
        let response =
            Template::parse(&self.response).map_err(|e| bad(format!("`response`: {e}")))?;
        if prompt.fields().is_empty() {
            return Err(bad(
                "`prompt` names no field; put the input column in braces, e.g. \"Article: {description}\\nHeadline:\"".into(),
            ));
        }
        if response.fields().is_empty() {
            return Err(bad(
                "`response` names no field; put the target column in braces, e.g. \" {title}\""
                    .into(),
            ));
        }
        if self.max_text_tokens == 0 || self.max_response_tokens == 0 {
            return Err(bad(
                "`max_text_tokens` and `max_response_tokens` must be > 0".into(),
            ));
        }
        Ok((prompt, response))
    }

    /// Reads every row of the source as an [`SftExample`], in file order: prompt fields cut
    /// to `max_text_tokens`, the rendered response to `max_response_tokens` (by `truncate`).
    pub fn load_examples(
        &self,
        root: &Path,
        truncate: &Truncate<'_>,
    ) -> Result<Vec<SftExample>, DataError> {
        let (prompt, response) = self.validate(Path::new(&self.name))?;
        let path = resolve(root, self.source.path(), "source.path")?;
        let rows = match &self.source {
            SftSource::Csv { .. } => read_csv_rows(&path, &prompt, &response)?,
            SftSource::Jsonl { .. } => read_jsonl_rows(&path, &prompt, &response)?,
        };
        let mut out = Vec::with_capacity(rows.len());
        for (line, fields) in rows {
            let get = |f: &str| fields.iter().find(|(k, _)| k == f).map(|(_, v)| v.as_str());
            let p = prompt.render(|f| truncate(get(f).unwrap_or_default(), self.max_text_tokens));
            let r = response.render(|f| get(f).unwrap_or_default().to_string());
            let r = truncate(&r, self.max_response_tokens);
            if r.trim().is_empty() {
                return Err(row_err(&path, line)(format!(
                    "the response {:?} renders empty: instruction tuning needs response tokens to score (fill the field or drop the row)",
                    self.response
                )));
            }
            out.push(SftExample {
                prompt: p,
                response: r,
            });
        }
        non_empty(&path, out)
    }
}

/// `(line, [(field, value)])` for every non-empty row.
type Rows = Vec<(usize, Vec<(String, String)>)>;

fn wanted<'t>(prompt: &'t Template, response: &'t Template) -> Vec<(&'t str, &'static str)> {
    let mut w: Vec<(&str, &str)> = prompt.fields().into_iter().map(|f| (f, "prompt")).collect();
    for f in response.fields() {
        if !w.iter().any(|(x, _)| *x == f) {
            w.push((f, "response"));
        }
    }
    w
}

fn read_csv_rows(path: &Path, prompt: &Template, response: &Template) -> Result<Rows, DataError> {
    let csv = CsvFile::read(path)?;
    let mut cols = Vec::new();
    for (f, which) in wanted(prompt, response) {
        let c = csv.column(f, |header| {
            format!("header has no column {f:?}, which the task's `{which}` template names as {{{f}}} (columns: {header:?}); fix the template or the file")
        })?;
        cols.push((f.to_string(), c));
    }
    let mut out = Vec::new();
    for record in csv.records() {
        let (lineno, fields) = record?;
        let values = cols
            .iter()
            .map(|(f, c)| (f.clone(), super::csv_text(&fields[*c])))
            .collect();
        out.push((lineno, values));
    }
    Ok(out)
}

fn read_jsonl_rows(path: &Path, prompt: &Template, response: &Template) -> Result<Rows, DataError> {
    let want = wanted(prompt, response);
    let mut out = Vec::new();
    for (lineno, v) in super::jsonl_values(path)? {
        let row_err = row_err(path, lineno);
        let mut values = Vec::with_capacity(want.len());
        for &(f, which) in &want {
            let s = match v.get(f) {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(x @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_))) => {
                    x.to_string()
                }
                _ => {
                    return Err(row_err(format!(
                        "missing string field {f:?}, which the task's `{which}` template names as {{{f}}}; add it to every line or fix the template"
                    )))
                }
            };
            values.push((f.to_string(), s));
        }
        out.push((lineno, values));
    }
    Ok(out)
}

/// A task file of either kind, dispatched on its `kind` key.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskFile {
    Classification(TaskConfig),
    Sft(SftTaskConfig),
}

impl TaskFile {
    /// Reads and validates a task TOML file of either kind.
    pub fn from_file(path: &Path) -> Result<TaskFile, DataError> {
        let text = fs::read_to_string(path).map_err(io_err(path))?;
        let bad = config_err(path);
        let value: toml::Table = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let kind = match value.get("kind") {
            None => TaskKind::Classification,
            Some(k) => TaskKind::deserialize(k.clone()).map_err(|_| {
                bad(format!(
                    "kind = {k}: expected \"classification\" or \"sft\""
                ))
            })?,
        };
        match kind {
            TaskKind::Classification => TaskConfig::from_file(path).map(TaskFile::Classification),
            TaskKind::Sft => {
                let cfg: SftTaskConfig = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
                cfg.validate(path)?;
                Ok(TaskFile::Sft(cfg))
            }
        }
    }

    pub fn name(&self) -> &str {
        match self {
            TaskFile::Classification(t) => &t.name,
            TaskFile::Sft(t) => &t.name,
        }
    }
}

/// Fixed-seed split of SFT examples (the same shuffle as classification's [`super::split`]).
pub fn split_sft(examples: Vec<SftExample>, task: &SftTaskConfig) -> Split<SftExample> {
    super::split(examples, task.split_seed, task.heldout, task.dev)
}

/// Writes SFT shards as `<dir>/shard-<i>.jsonl` of rendered `{"prompt", "response"}` pairs,
/// which agents read back with [`super::read_sft_jsonl`].
pub fn write_sft_shards(dir: &Path, shards: &[Vec<SftExample>]) -> Result<Vec<PathBuf>, DataError> {
    super::write_jsonl_shards(
        dir,
        shards,
        |e| serde_json::json!({"prompt": e.prompt, "response": e.response}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_parse_fields_literals_and_escapes() {
        let cases: &[(&str, Result<Vec<Piece>, &str>)] = &[
            (
                "Article: {description}\nHeadline:",
                Ok(vec![
                    Piece::Literal("Article: ".into()),
                    Piece::Field("description".into()),
                    Piece::Literal("\nHeadline:".into()),
                ]),
            ),
            (
                "{{x}} {a_b}{c}",
                Ok(vec![
                    Piece::Literal("{x} ".into()),
                    Piece::Field("a_b".into()),
                    Piece::Field("c".into()),
                ]),
            ),
            ("open {field", Err("unclosed")),
            ("{}", Err("empty field")),
            ("a } b", Err("stray")),
            ("{a b}", Err("inside")),
        ];
        for (src, want) in cases {
            match (Template::parse(src), want) {
                (Ok(t), Ok(p)) => assert_eq!(t.pieces(), &p[..], "{src:?}"),
                (Err(e), Err(needle)) => assert!(e.contains(needle), "{src:?}: {e}"),
                (got, want) => panic!("{src:?}: got {got:?}, want {want:?}"),
            }
        }
        let t = Template::parse("{a} and {b} and {a}").unwrap();
        assert_eq!(t.fields(), ["a", "b"]);
        assert_eq!(t.render(|f| f.to_uppercase()), "A and B and A");
    }
}
