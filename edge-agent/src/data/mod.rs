//! Data pipeline: classification task configs (prompt template, labels, verbalizer words),
//! readers for BBC News, AG News CSV and generic JSONL/CSV files, the fixed-seed
//! train/dev/held-out split and IID / Dirichlet(α) client shards written as JSONL files.
//!
//! Everything here is deterministic given its seed and runs without loading model weights.
//! Instruction-tuning tasks (`kind = "sft"`) live in [`sft`].

pub mod sft;
mod shard;

pub use sft::{SftSource, SftTaskConfig, TaskFile, TaskKind};
pub(crate) use shard::write_jsonl_shards;
pub use shard::{shard, shard_iid, split, write_shards, Partition, Split, SplitMix64};

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One labelled example; `label` indexes [`TaskConfig::labels`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Example {
    pub text: String,
    pub label: usize,
}

/// Errors of the data pipeline; each names the file (and line) and what to fix.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {problem}")]
    Row {
        path: PathBuf,
        line: usize,
        problem: String,
    },
    #[error("{path}:{line}: unknown label {label:?}; the task's labels are {known:?} ({fix})")]
    UnknownLabel {
        path: PathBuf,
        line: usize,
        label: String,
        known: Vec<String>,
        fix: &'static str,
    },
    /// Boxed: it would double the size of every `DataError`.
    #[error("{0}")]
    MissingData(Box<MissingData>),
    #[error("task config {path}: {problem}")]
    Config { path: PathBuf, problem: String },
    #[error("{path}: no examples found")]
    Empty { path: PathBuf },
}

/// A task's data path that resolves to nothing ([`DataError::MissingData`]).
#[derive(Debug)]
pub struct MissingData {
    pub key: &'static str,
    pub given: PathBuf,
    pub resolved: PathBuf,
    pub root: PathBuf,
}

impl std::fmt::Display for MissingData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} does not exist: the task's `{}` is {:?}, and a relative path is resolved against {:?} (`--root`, by default the directory the command runs in); run it from the directory the path is relative to, pass `--root`, or write an absolute path",
            self.resolved.display(),
            self.key,
            self.given,
            self.root
        )
    }
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DataError + '_ {
    move |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The error of a problem on line `line` of `path`.
pub(crate) fn row_err(path: &Path, line: usize) -> impl Fn(String) -> DataError + '_ {
    move |problem| DataError::Row {
        path: path.to_path_buf(),
        line,
        problem,
    }
}

/// The error of a problem in the task config `path`.
pub(crate) fn config_err(path: &Path) -> impl Fn(String) -> DataError + '_ {
    move |problem| DataError::Config {
        path: path.to_path_buf(),
        problem,
    }
}

/// `examples`, or the error that `path` held none.
pub(crate) fn non_empty<T>(path: &Path, examples: Vec<T>) -> Result<Vec<T>, DataError> {
    if examples.is_empty() {
        return Err(DataError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(examples)
}

/// A data path of a task: relative paths resolve against `root`.
/// The task's data path `path` (its key `key`) resolved against `root`; an error naming the
/// key, the root and the fixes when nothing is there (a relative path in a task file written
/// elsewhere is the usual cause).
pub(crate) fn resolve(root: &Path, path: &Path, key: &'static str) -> Result<PathBuf, DataError> {
    let resolved = if path.is_absolute() {
        path.to_path_buf()
    } else {
        root.join(path)
    };
    if resolved.exists() {
        Ok(resolved)
    } else {
        Err(DataError::MissingData(Box::new(MissingData {
            key,
            given: path.to_path_buf(),
            resolved,
            root: root.to_path_buf(),
        })))
    }
}

/// Where a task's examples come from. Relative paths are resolved against the root passed to
/// [`TaskConfig::load_examples`] (the repository root for the shipped tasks).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "format", rename_all = "snake_case")]
pub enum DataSource {
    /// One directory per label (named like the label), one UTF-8 text file per example.
    LabelDirs { dir: PathBuf },
    /// CSV with a header; `label_column` holds label names, or indices into `labels` when
    /// `label_is_index` (1-based by default, as in AG News; `label_index_base = 0` for
    /// 0-based files). `text_columns` are joined with `joiner`.
    Csv {
        path: PathBuf,
        label_column: String,
        text_columns: Vec<String>,
        #[serde(default)]
        label_is_index: bool,
        #[serde(default = "default_label_index_base")]
        label_index_base: usize,
        #[serde(default = "default_joiner")]
        joiner: String,
    },
    /// JSON Lines `{"<text_field>": "...", "<label_field>": "<label name>"}`; with
    /// `label_is_index` the label is an index into `labels` (a JSON number or a numeric string,
    /// base `label_index_base` as for CSV).
    Jsonl {
        path: PathBuf,
        #[serde(default = "default_text_field")]
        text_field: String,
        #[serde(default = "default_label_field")]
        label_field: String,
        #[serde(default)]
        label_is_index: bool,
        #[serde(default = "default_label_index_base")]
        label_index_base: usize,
    },
}

/// How a data file writes its labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelCoding {
    /// The label names of the task, as they are.
    Names,
    /// Integer indices into the task's labels, the first label being `base` (0 or 1).
    Index { base: usize },
}

impl LabelCoding {
    fn of(label_is_index: bool, base: usize) -> LabelCoding {
        if label_is_index {
            LabelCoding::Index { base }
        } else {
            LabelCoding::Names
        }
    }

    /// The index into `labels` of the raw label `raw` on `line` of `path`.
    fn decode(
        self,
        raw: &str,
        labels: &[String],
        path: &Path,
        line: usize,
    ) -> Result<usize, DataError> {
        let raw = raw.trim();
        let found = match self {
            LabelCoding::Names => labels.iter().position(|l| l == raw),
            LabelCoding::Index { base } => raw
                .parse::<usize>()
                .ok()
                .and_then(|n| n.checked_sub(base))
                .filter(|&i| i < labels.len()),
        };
        found.ok_or_else(|| {
            let (known, fix) = match self {
                LabelCoding::Names => (
                    labels.to_vec(),
                    "fix the row or add the label to the task config",
                ),
                LabelCoding::Index { base } => {
                    // An index that is valid in the other base says which key to set.
                    let fits = |b: usize| {
                        raw.parse::<usize>()
                            .is_ok_and(|n| (b..b + labels.len()).contains(&n))
                    };
                    let fix = if base != 0 && fits(0) {
                        "indices counted from 0? set `label_index_base = 0` in [source]"
                    } else if base == 0 && fits(1) {
                        "indices counted from 1? set `label_index_base = 1` in [source]"
                    } else {
                        "fix the row, or list every label in the task config's `labels`"
                    };
                    (
                        (base..base + labels.len()).map(|n| n.to_string()).collect(),
                        fix,
                    )
                }
            };
            DataError::UnknownLabel {
                path: path.to_path_buf(),
                line,
                label: raw.to_string(),
                known,
                fix,
            }
        })
    }
}

fn default_label_index_base() -> usize {
    1
}

fn default_joiner() -> String {
    ". ".into()
}
fn default_text_field() -> String {
    "text".into()
}
fn default_label_field() -> String {
    "label".into()
}

/// A classification task: data, prompt and verbalizer. Shipped examples: `edge-agent/tasks/*.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskConfig {
    pub name: String,
    /// Prompt with one `{text}` placeholder; the loss reads the next-token logits after it.
    pub prompt: String,
    /// Label names as they appear in the data.
    pub labels: Vec<String>,
    /// One verbalizer word per label (its first token must differ between labels).
    pub words: Vec<String>,
    /// The example text is cut to this many tokens before it goes into the prompt.
    #[serde(default = "default_max_text_tokens")]
    pub max_text_tokens: u32,
    pub source: DataSource,
    /// Split: examples held out for evaluation (never trained on, never used for decisions).
    #[serde(default = "default_heldout")]
    pub heldout: usize,
    /// Split: dev examples (divergence detection, keeping the best adapter).
    #[serde(default = "default_dev")]
    pub dev: usize,
    #[serde(default)]
    pub split_seed: u64,
    /// Which final hidden state the verbalizer head rows read (layouts with `head_rows`).
    #[serde(default)]
    pub head_features: HeadFeatures,
}

/// The frozen feature the verbalizer head rows read from a prompt's final (normed) hidden
/// states. The label words' base logits always come from the last position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum HeadFeatures {
    /// The state at the prompt's last position (the one the base logits come from). The
    /// default: a linear probe on it scored higher on dev than on the mean, on BBC and AG
    /// News alike (`tests/bench/examples/probe_features.rs`; figures in docs/studies/head-rows.md).
    #[default]
    Last,
    /// The mean over every prompt position.
    Mean,
}

fn default_max_text_tokens() -> u32 {
    80
}
fn default_heldout() -> usize {
    200
}
fn default_dev() -> usize {
    100
}

impl TaskConfig {
    /// Reads and validates a task TOML file.
    pub fn from_file(path: &Path) -> Result<TaskConfig, DataError> {
        let text = fs::read_to_string(path).map_err(io_err(path))?;
        // An SFT file would otherwise fail on the first missing classification key.
        if toml::from_str::<toml::Table>(&text)
            .ok()
            .and_then(|t| t.get("kind").cloned())
            .is_some_and(|k| k.as_str() == Some("sft"))
        {
            return Err(config_err(path)(
                "this is an instruction-tuning task (kind = \"sft\") but this command needs a classification task (labels and words); use `train-local`, `predict` or the agent daemon, which take both kinds".into(),
            ));
        }
        let cfg: TaskConfig = toml::from_str(&text).map_err(|e| config_err(path)(e.to_string()))?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Checks the invariants the engine relies on.
    pub fn validate(&self, path: &Path) -> Result<(), DataError> {
        let bad = config_err(path);
        if self.labels.len() < 2 {
            return Err(bad("`labels` needs at least two labels".into()));
        }
        if self.words.len() != self.labels.len() {
            return Err(bad(format!(
                "`words` has {} entries but `labels` has {}; give one verbalizer word per label",
                self.words.len(),
                self.labels.len()
            )));
        }
        if self.prompt.matches("{text}").count() != 1 {
            return Err(bad("`prompt` must contain `{text}` exactly once".into()));
        }
        if self.max_text_tokens == 0 {
            return Err(bad("`max_text_tokens` must be > 0".into()));
        }
        if let DataSource::Csv {
            label_index_base, ..
        }
        | DataSource::Jsonl {
            label_index_base, ..
        } = &self.source
        {
            if *label_index_base > 1 {
                return Err(bad(format!(
                    "`label_index_base` is {label_index_base}; use 1 (the first label is index 1, the default) or 0"
                )));
            }
        }
        Ok(())
    }

    /// Index of a label name, if known.
    pub fn label_index(&self, name: &str) -> Option<usize> {
        self.labels.iter().position(|l| l == name)
    }

    /// Reads all examples of the task's source, in a deterministic order.
    pub fn load_examples(&self, root: &Path) -> Result<Vec<Example>, DataError> {
        match &self.source {
            DataSource::LabelDirs { dir } => {
                read_label_dirs(&resolve(root, dir, "source.dir")?, &self.labels)
            }
            DataSource::Csv {
                path,
                label_column,
                text_columns,
                label_is_index,
                label_index_base,
                joiner,
            } => read_csv(
                &resolve(root, path, "source.path")?,
                label_column,
                text_columns,
                LabelCoding::of(*label_is_index, *label_index_base),
                joiner,
                &self.labels,
            ),
            DataSource::Jsonl {
                path,
                text_field,
                label_field,
                label_is_index,
                label_index_base,
            } => read_jsonl(
                &resolve(root, path, "source.path")?,
                text_field,
                label_field,
                LabelCoding::of(*label_is_index, *label_index_base),
                &self.labels,
            ),
        }
    }
}

/// BBC-style corpus: `<dir>/<label>/*.txt`, files sorted by name.
pub fn read_label_dirs(dir: &Path, labels: &[String]) -> Result<Vec<Example>, DataError> {
    let mut out = Vec::new();
    for (label, name) in labels.iter().enumerate() {
        let sub = dir.join(name);
        let mut files: Vec<PathBuf> = fs::read_dir(&sub)
            .map_err(io_err(&sub))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "txt"))
            .collect();
        files.sort();
        for f in files {
            let bytes = fs::read(&f).map_err(io_err(&f))?;
            // Some BBC files carry stray Latin-1 bytes; replace rather than reject them.
            let text = String::from_utf8_lossy(&bytes).trim().to_string();
            if text.is_empty() {
                return Err(row_err(&f, 1)("empty text file".into()));
            }
            out.push(Example { text, label });
        }
    }
    non_empty(dir, out)
}

/// A CSV file with a header record, read whole and parsed by the `csv` crate: RFC 4180 quoted
/// fields with `""` escapes, line breaks inside quoted fields, LF or CRLF line ends, and a
/// UTF-8 byte order mark before the header. Errors name the file and the line a record
/// starts on.
pub(crate) struct CsvFile<'p> {
    path: &'p Path,
    text: String,
    header: Vec<String>,
    /// The line the header starts on (1 unless blank lines come first).
    header_line: usize,
}

/// The reader every CSV of a task goes through: a header, `,` between fields, and records
/// of any length (a short or long record is reported with the header's count).
fn csv_reader(text: &str) -> ::csv::Reader<&[u8]> {
    ::csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .from_reader(text.as_bytes())
}

/// The line a record starts on (1-based).
fn record_line(record: &::csv::StringRecord) -> usize {
    record.position().map_or(1, |p| p.line() as usize)
}

/// Whether `text` ends inside the quoted last field of its `last` record. The `csv` crate ends
/// such a field at the end of the file without an error (it runs on through every line
/// below); it is refused, as a truncated or mistyped file: the file then ends with a
/// delimiter or line start, the opening quote and the field's text (quotes doubled), and no
/// closing quote.
fn ends_in_open_quote(text: &str, last: &::csv::StringRecord) -> bool {
    let Some(field) = last.iter().next_back() else {
        return false;
    };
    let open = format!("\"{}", field.replace('"', "\"\""));
    let Some(before) = text.strip_suffix(open.as_str()) else {
        return false;
    };
    before.is_empty() || before.ends_with([',', '\n', '\r', '\u{feff}'])
}

impl<'p> CsvFile<'p> {
    /// Reads `path` and parses its header (a file without one is [`DataError::Empty`]).
    pub(crate) fn read(path: &'p Path) -> Result<CsvFile<'p>, DataError> {
        let text = fs::read_to_string(path).map_err(io_err(path))?;
        let mut reader = csv_reader(&text);
        let header = reader.headers().map_err(csv_err(path))?.clone();
        if header.is_empty() {
            return Err(DataError::Empty {
                path: path.to_path_buf(),
            });
        }
        let header_line = record_line(&header);
        if reader.records().next().is_none() && ends_in_open_quote(&text, &header) {
            return Err(row_err(path, header_line)(UNTERMINATED.into()));
        }
        let header = header.iter().map(str::to_owned).collect();
        Ok(CsvFile {
            path,
            text,
            header,
            header_line,
        })
    }

    /// The index of column `name`; if the header has none, an error on the header's line
    /// saying `missing(header)`.
    pub(crate) fn column(
        &self,
        name: &str,
        missing: impl FnOnce(&[String]) -> String,
    ) -> Result<usize, DataError> {
        self.header
            .iter()
            .position(|h| h.trim() == name)
            .ok_or_else(|| row_err(self.path, self.header_line)(missing(&self.header)))
    }

    /// The records after the header with the lines they start on. Blank lines are skipped;
    /// a record with more or fewer fields than the header is an error.
    pub(crate) fn records(
        &self,
    ) -> impl Iterator<Item = Result<(usize, Vec<String>), DataError>> + '_ {
        let n = self.header.len();
        let mut records = csv_reader(&self.text).into_records().peekable();
        std::iter::from_fn(move || loop {
            let record = match records.next()? {
                Ok(r) => r,
                Err(e) => return Some(Err(csv_err(self.path)(e))),
            };
            // A line of spaces is a one-field record to the csv crate: blank all the same.
            if record.len() == 1 && record[0].trim().is_empty() {
                continue;
            }
            let lineno = record_line(&record);
            let err = row_err(self.path, lineno);
            if records.peek().is_none() && ends_in_open_quote(&self.text, &record) {
                return Some(Err(err(UNTERMINATED.into())));
            }
            if record.len() != n {
                return Some(Err(err(format!("{} fields, header has {n}", record.len()))));
            }
            return Some(Ok((lineno, record.iter().map(str::to_owned).collect())));
        })
    }
}

const UNTERMINATED: &str = "unterminated quoted field";

/// A `csv` crate error as a row error of `path` (at the line it names).
fn csv_err(path: &Path) -> impl Fn(::csv::Error) -> DataError + '_ {
    move |e| {
        let line = e.position().map_or(1, |p| p.line() as usize);
        row_err(path, line)(e.to_string())
    }
}

/// A CSV field as text: trimmed, and AG News's backslashes (its line breaks inside fields)
/// turned into spaces.
pub(crate) fn csv_text(field: &str) -> String {
    field.trim().replace('\\', " ")
}

/// CSV reader for classification data (see [`DataSource::Csv`]).
pub fn read_csv(
    path: &Path,
    label_column: &str,
    text_columns: &[String],
    coding: LabelCoding,
    joiner: &str,
    labels: &[String],
) -> Result<Vec<Example>, DataError> {
    let csv = CsvFile::read(path)?;
    let col = |name: &str| {
        csv.column(name, |header| {
            format!("header has no column {name:?} (columns: {header:?})")
        })
    };
    let label_col = col(label_column)?;
    let text_cols = text_columns
        .iter()
        .map(|c| col(c))
        .collect::<Result<Vec<_>, _>>()?;
    let mut out = Vec::new();
    for record in csv.records() {
        let (lineno, fields) = record?;
        let label = coding.decode(&fields[label_col], labels, path, lineno)?;
        let text = text_cols
            .iter()
            .map(|&c| csv_text(&fields[c]))
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join(joiner);
        if text.is_empty() {
            return Err(row_err(path, lineno)("empty text".into()));
        }
        out.push(Example { text, label });
    }
    non_empty(path, out)
}

/// The JSON values of a JSON Lines file with their 1-based line numbers; blank lines are
/// skipped and a line that is not JSON is an error naming the file and line. Every JSONL reader
/// of this module goes through it.
pub(crate) fn jsonl_values(path: &Path) -> Result<Vec<(usize, serde_json::Value)>, DataError> {
    let text = fs::read_to_string(path).map_err(io_err(path))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v = serde_json::from_str(line)
            .map_err(|e| row_err(path, i + 1)(format!("invalid JSON: {e}")))?;
        out.push((i + 1, v));
    }
    Ok(out)
}

/// JSONL reader for classification data (see [`DataSource::Jsonl`]).
pub fn read_jsonl(
    path: &Path,
    text_field: &str,
    label_field: &str,
    coding: LabelCoding,
    labels: &[String],
) -> Result<Vec<Example>, DataError> {
    let mut out = Vec::new();
    for (lineno, v) in jsonl_values(path)? {
        let row_err = row_err(path, lineno);
        let t = v
            .get(text_field)
            .and_then(|x| x.as_str())
            .ok_or_else(|| row_err(format!("missing string field {text_field:?}")))?;
        let l = match v.get(label_field) {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => return Err(row_err(format!("missing field {label_field:?}"))),
        };
        let label = coding.decode(&l, labels, path, lineno)?;
        out.push(Example {
            text: t.to_string(),
            label,
        });
    }
    non_empty(path, out)
}

/// One instruction-tuning example: the loss is next-token cross-entropy over `response` only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SftExample {
    pub prompt: String,
    pub response: String,
}

/// JSONL instruction data, one `{"prompt": "...", "response": "..."}` object per line (other
/// fields are ignored). Blank lines are skipped; an empty response is an error, since it
/// carries no loss.
pub fn read_sft_jsonl(path: &Path) -> Result<Vec<SftExample>, DataError> {
    let mut out = Vec::new();
    for (lineno, v) in jsonl_values(path)? {
        let row_err = row_err(path, lineno);
        let field = |name: &str| {
            v.get(name)
                .and_then(|x| x.as_str())
                .map(str::to_owned)
                .ok_or_else(|| row_err(format!("missing string field {name:?}")))
        };
        let (prompt, response) = (field("prompt")?, field("response")?);
        if response.is_empty() {
            return Err(row_err(
                "empty \"response\": instruction tuning needs response tokens to score".into(),
            ));
        }
        out.push(SftExample { prompt, response });
    }
    non_empty(path, out)
}
