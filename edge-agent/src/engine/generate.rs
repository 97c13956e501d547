//! Greedy generation with the current adapter: what SFT evaluation scores and `predict`
//! writes for an instruction task.
//!
//! The prompts of a chunk (`seqs_per_decode` of them) are decoded once, each in its own KV
//! stream, then every step appends one token per unfinished sequence without clearing the KV
//! memory, so a token costs one incremental decode rather than a pass over the whole text.
//! On the tail path the frozen prefix model keeps its own KV memory and hands the tail the
//! new token's hidden state at the tail's first layer, and the tail (which carries the
//! adapter) keeps its own: the same split as training, one token at a time.
//!
//! Greedy = argmax of the full-vocabulary logits, the first maximum on ties; deterministic for
//! a fixed model, adapter and thread count. A sequence stops at an end-of-generation token
//! (not included), at the first newline (the text before it is kept: one-line responses such
//! as headlines end there), or after `max_new_tokens` tokens.

use super::{llama, tail, Engine, EngineError};

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The model emitted an end-of-generation token.
    EndOfGeneration,
    /// A token contained a newline.
    Newline,
    /// `max_new_tokens` tokens were generated.
    MaxTokens,
}

/// One greedy generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    /// The generated text (lossless bytes decoded once; a cut UTF-8 tail becomes U+FFFD).
    pub text: String,
    /// Tokens generated (the newline token that stopped it, if any, is not counted).
    pub tokens: Vec<llama::Token>,
    pub stop: StopReason,
}

/// First index of the largest value.
fn argmax(logits: &[f32]) -> llama::Token {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as llama::Token
}

/// Per-sequence state of a chunk being generated.
struct Seq {
    pos: usize,
    next: llama::Token,
    bytes: Vec<u8>,
    tokens: Vec<llama::Token>,
    stop: Option<StopReason>,
}

impl Seq {
    /// Takes the pending token; returns whether the sequence goes on.
    fn accept(&mut self, engine: &Engine, max_new_tokens: usize) -> bool {
        let t = self.next;
        if engine.llama.is_eog(t) {
            self.stop = Some(StopReason::EndOfGeneration);
            return false;
        }
        let piece = engine.llama.token_bytes(t);
        if let Some(nl) = piece.iter().position(|&b| b == b'\n') {
            self.bytes.extend_from_slice(&piece[..nl]);
            self.stop = Some(StopReason::Newline);
            return false;
        }
        self.bytes.extend_from_slice(&piece);
        self.tokens.push(t);
        if self.tokens.len() >= max_new_tokens {
            self.stop = Some(StopReason::MaxTokens);
            return false;
        }
        true
    }
}

impl Engine {
    /// Greedy continuations of `prompts` (tokenized with the model's BOS, no template) under
    /// the currently set adapter, at most `max_new_tokens` tokens each.
    pub fn generate_greedy(
        &mut self,
        prompts: &[&str],
        max_new_tokens: u32,
    ) -> Result<Vec<Generation>, EngineError> {
        let max_new = max_new_tokens.max(1) as usize;
        let per = self.config.seqs_per_decode.max(1) as usize;
        let mut out = Vec::with_capacity(prompts.len());
        for chunk in prompts.chunks(per) {
            let toks: Vec<Vec<llama::Token>> = chunk
                .iter()
                .map(|p| self.llama.tokenize(p, self.add_bos))
                .collect();
            if let Some(i) = toks.iter().position(|t| t.is_empty()) {
                return Err(EngineError::Task {
                    task: "generate".into(),
                    problem: format!("prompt {i} has no tokens"),
                });
            }
            out.extend(self.generate_chunk(&toks, max_new)?);
        }
        Ok(out)
    }

    fn generate_chunk(
        &mut self,
        toks: &[Vec<llama::Token>],
        max_new: usize,
    ) -> Result<Vec<Generation>, EngineError> {
        let mut seqs: Vec<Seq> = toks
            .iter()
            .map(|t| Seq {
                pos: t.len(),
                next: 0,
                bytes: Vec::new(),
                tokens: Vec::new(),
                stop: None,
            })
            .collect();
        let refs: Vec<&[llama::Token]> = toks.iter().map(|t| t.as_slice()).collect();
        let lens: Vec<usize> = toks.iter().map(|t| t.len()).collect();
        let last: Vec<usize> = lens.iter().map(|n| n - 1).collect();
        let err = EngineError::Llama;
        // Prompts: the first token of each continuation.
        if self.tail.is_none() {
            self.llama
                .decode(&refs, &last, |s, _, l| seqs[s].next = argmax(l))
                .map_err(err)?;
        } else {
            self.ensure_tail_model(&tail::TailHead::Full)?;
            self.llama.decode(&refs, &lens, |_, _, _| {}).map_err(err)?;
            let states = self
                .llama
                .layer_input()
                .ok_or_else(|| EngineError::Llama("the prefix returned no layer input".into()))?
                .to_vec();
            let d = self.llama.n_embd();
            let mut at = 0;
            let rows: Vec<&[f32]> = lens
                .iter()
                .map(|n| {
                    let r = &states[at * d..(at + n) * d];
                    at += n;
                    r
                })
                .collect();
            let model = self.tail_model()?;
            model
                .decode_embd(&rows, &last, |s, _, l| seqs[s].next = argmax(l))
                .map_err(err)?;
        }
        loop {
            let mut step: Vec<(usize, usize, llama::Token)> = Vec::new();
            for (s, q) in seqs.iter_mut().enumerate() {
                if q.stop.is_none() && q.accept(self, max_new) {
                    step.push((s, q.pos, q.next));
                    q.pos += 1;
                }
            }
            if step.is_empty() {
                break;
            }
            if self.tail.is_none() {
                self.llama
                    .decode_step(&step, |i, l| seqs[step[i].0].next = argmax(l))
                    .map_err(err)?;
            } else {
                self.llama.decode_step(&step, |_, _| {}).map_err(err)?;
                let rows = self
                    .llama
                    .layer_input()
                    .ok_or_else(|| EngineError::Llama("the prefix returned no layer input".into()))?
                    .to_vec();
                let at: Vec<(usize, usize)> = step.iter().map(|&(s, p, _)| (s, p)).collect();
                let model = self.tail_model()?;
                model
                    .decode_embd_step(&at, &rows, |i, l| seqs[step[i].0].next = argmax(l))
                    .map_err(err)?;
            }
        }
        Ok(seqs
            .into_iter()
            .map(|q| Generation {
                text: String::from_utf8_lossy(&q.bytes).into_owned(),
                tokens: q.tokens,
                stop: q.stop.expect("every sequence stopped"),
            })
            .collect())
    }

    /// The loaded tail model (tail path only).
    fn tail_model(&mut self) -> Result<&mut llama::Llama, EngineError> {
        self.tail
            .as_mut()
            .and_then(|t| t.model.as_mut())
            .map(|(_, m)| m)
            .ok_or_else(|| EngineError::Llama("tail model not loaded".into()))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn argmax_takes_the_first_maximum() {
        let cases: &[(&[f32], i32)] = &[
            (&[0.0, 1.0, 0.5], 1),
            (&[2.0, 2.0, 1.0], 0),
            (&[-3.0, -1.0, -1.0], 1),
            (&[f32::NEG_INFINITY, 0.0], 1),
        ];
        for (logits, want) in cases {
            assert_eq!(super::argmax(logits), *want, "{logits:?}");
        }
    }
}
