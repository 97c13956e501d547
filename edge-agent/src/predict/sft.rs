//! `predict` for an instruction (`kind = "sft"`) task: each input fills the task's prompt
//! template (a plain line fills a one-field template; a JSON object fills fields by key, or
//! its `--text-field` fills a one-field template), prompt fields cut to the task's
//! `max_text_tokens` like training data, and the greedy generation under the adapter is
//! written as `{"line", "text", "generation"}` (at most `max_response_tokens` tokens, up to
//! the first newline).

use std::io::Write;

use anyhow::{bail, Context};
use serde::Serialize;

use super::{open_out, read_inputs, set_adapter, Input, PredictArgs};
use crate::data::sft::Template;
use crate::data::SftTaskConfig;
use crate::engine::Engine;

#[derive(Debug, Serialize)]
struct Generated<'a> {
    /// 1-based line of the input.
    line: usize,
    /// The input: the field value of a one-field template, else the rendered prompt.
    text: &'a str,
    generation: &'a str,
}

/// Field values of one input for `template`, or an error naming the line and the fix.
fn fields(
    template: &Template,
    input: &Input,
    text_field: &str,
    line: usize,
) -> anyhow::Result<Vec<(String, String)>> {
    let names = template.fields();
    match input {
        Input::Line(l) if names.len() == 1 => Ok(vec![(names[0].to_string(), l.clone())]),
        Input::Line(_) => bail!(
            "line {line}: the task's prompt names {} fields ({names:?}); give JSONL objects with those keys",
            names.len()
        ),
        Input::Object(v) => names
            .iter()
            .map(|&f| {
                let value = v
                    .get(f)
                    .or_else(|| v.get(text_field).filter(|_| names.len() == 1))
                    .and_then(|x| x.as_str())
                    .with_context(|| {
                        format!("line {line}: no string field `{f}`, which the task's prompt names as {{{f}}} (add it, or for a one-field prompt set --text-field)")
                    })?;
                Ok((f.to_string(), value.to_string()))
            })
            .collect(),
    }
}

pub(super) fn run(args: PredictArgs, task: SftTaskConfig) -> anyhow::Result<()> {
    let (prompt, _) = task.validate(&args.task.task)?;
    let inputs = read_inputs(&args)?;
    let mut e = Engine::load(&args.engine.config())?;
    let which = set_adapter(&mut e, &args)?;
    log::info!(
        "predict: {} inputs, sft task {}, adapter {which}, {}",
        inputs.len(),
        task.name,
        e.describe_path()
    );
    let one_field = prompt.fields().len() == 1;
    let mut rows = Vec::with_capacity(inputs.len());
    for (line, input) in &inputs {
        let values = fields(&prompt, input, &args.text_field, *line)?;
        let rendered = prompt.render(|f| {
            let v = values.iter().find(|(k, _)| k == f).map(|(_, v)| v.as_str());
            e.truncate_text(v.unwrap_or_default(), task.max_text_tokens)
        });
        let text = if one_field {
            values[0].1.clone()
        } else {
            rendered.clone()
        };
        rows.push((*line, text, rendered));
    }
    let mut out = open_out(&args)?;
    let per = (args.engine.seqs_per_decode.max(1)) as usize;
    for chunk in rows.chunks(per) {
        let prompts: Vec<&str> = chunk.iter().map(|(_, _, p)| p.as_str()).collect();
        let gens = e.generate_greedy(&prompts, task.max_response_tokens)?;
        for ((line, text, _), g) in chunk.iter().zip(&gens) {
            let row = Generated {
                line: *line,
                text,
                generation: g.text.trim(),
            };
            writeln!(out, "{}", serde_json::to_string(&row)?)?;
        }
    }
    out.flush()?;
    Ok(())
}
