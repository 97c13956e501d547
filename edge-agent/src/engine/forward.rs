//! Running prompts through the model on the path in use, what every loss reads: on the full
//! path chunks of `seqs_per_decode` prompts through the loaded model; on the tail path the
//! prefix hidden states (from the cache, or the prefix model for the prompts it misses) through
//! the tail model serving the wanted head, loaded on demand.

use super::{llama, tail, Engine, EngineError};

/// Receives `(prompt, position, logits, hidden state if the path has it)` from a decode.
type OnLogits<'a> = dyn FnMut(usize, usize, &[f32], Option<&[f32]>) + 'a;

/// Which logits a decode hands back.
#[derive(Clone, Copy)]
pub(super) enum Want<'a> {
    /// Only these tokens' logits, in this order.
    Labels(&'a [llama::Token]),
    /// The whole vocabulary (indexed by token id).
    Vocab,
}

impl Engine {
    /// Makes sure the tail model serves `head`, building or loading it if needed.
    pub(super) fn ensure_tail_model(&mut self, head: &tail::TailHead) -> Result<(), EngineError> {
        let Some(t) = &mut self.tail else {
            return Ok(());
        };
        if t.model.as_ref().is_some_and(|(h, _)| h.serves(head)) {
            return Ok(());
        }
        t.model = None; // free the old tail before loading the new one
        let path = tail::prepare_tail(
            &self.config.model,
            t.first_layer,
            head,
            self.config.tail_matrices,
            &self.config.cache_dir,
        )?;
        let mut params = Self::llama_params(&self.config);
        params.embd_input = true;
        t.live = None;
        let mut live = if t.norms.is_empty() {
            None
        } else {
            Some(super::live::LiveModel::copy_of(&path)?)
        };
        let load_path = live.as_ref().map_or(path.clone(), |l| l.proc_path());
        let mut m = llama::Llama::load(&load_path, &params)
            .map_err(|e| EngineError::Llama(format!("{}: {e}", path.display())))?;
        if let Some(bytes) = &t.adapter {
            m.set_adapter_bytes(bytes).map_err(EngineError::Llama)?;
        }
        if let Some(l) = &mut live {
            l.set_norms(&t.norms).map_err(|e| EngineError::Tail {
                path: path.clone(),
                problem: e,
            })?;
        }
        t.live = live;
        t.model = Some((head.clone(), m));
        Ok(())
    }

    /// Hidden states at the tail's input for each prompt: from the cache, or by running the
    /// missing prompts through the prefix model (no logits requested).
    fn prefix_states(
        &mut self,
        prompts: &[Vec<llama::Token>],
    ) -> Result<Vec<std::sync::Arc<[f32]>>, EngineError> {
        let per = self.config.seqs_per_decode.max(1) as usize;
        let n_embd = self.llama.n_embd();
        let t = self.tail.as_mut().expect("tail path");
        let mut out: Vec<Option<std::sync::Arc<[f32]>>> =
            prompts.iter().map(|p| t.cache.get(p)).collect();
        let missing: Vec<usize> = (0..prompts.len()).filter(|&i| out[i].is_none()).collect();
        for chunk in missing.chunks(per) {
            let seqs: Vec<&[llama::Token]> = chunk.iter().map(|&i| prompts[i].as_slice()).collect();
            let none: Vec<usize> = seqs.iter().map(|s| s.len()).collect();
            self.llama
                .decode(&seqs, &none, |_, _, _| {})
                .map_err(EngineError::Llama)?;
            let states = self
                .llama
                .layer_input()
                .ok_or_else(|| EngineError::Llama("the prefix returned no layer input".into()))?;
            let mut at = 0;
            for &i in chunk {
                let n = prompts[i].len() * n_embd;
                let v: std::sync::Arc<[f32]> = std::sync::Arc::from(&states[at..at + n]);
                at += n;
                t.cache.insert(prompts[i].clone(), v.clone());
                out[i] = Some(v);
            }
        }
        Ok(out.into_iter().map(|v| v.expect("filled")).collect())
    }

    /// Runs `prompts` (in chunks of `seqs_per_decode`) and calls `on(prompt, pos, logits,
    /// hidden)` for every position `pos >= first[prompt]`, on whichever path is in use. `want`
    /// says which logits `on` receives; `hidden` is the final hidden state when the path has
    /// it (the tail with a label head), else `None`.
    pub(super) fn run_prompts(
        &mut self,
        prompts: &[Vec<llama::Token>],
        first: &[usize],
        want: Want<'_>,
        on: &mut OnLogits<'_>,
    ) -> Result<(), EngineError> {
        let per = self.config.seqs_per_decode.max(1) as usize;
        let mut gathered = Vec::new();
        // Hands `on` the logits it wants from a row indexed by token id.
        let mut by_token = |i: usize, pos: usize, logits: &[f32], on: &mut OnLogits<'_>| match want
        {
            Want::Labels(lt) => {
                gathered.clear();
                gathered.extend(lt.iter().map(|&t| logits[t as usize]));
                on(i, pos, &gathered, None);
            }
            Want::Vocab => on(i, pos, logits, None),
        };
        if self.tail.is_none() {
            for (c, chunk) in prompts.chunks(per).enumerate() {
                let seqs: Vec<&[llama::Token]> = chunk.iter().map(|p| p.as_slice()).collect();
                self.llama
                    .decode(
                        &seqs,
                        &first[c * per..c * per + chunk.len()],
                        |s, pos, l| by_token(c * per + s, pos, l, on),
                    )
                    .map_err(EngineError::Llama)?;
            }
            return Ok(());
        }
        let head = match want {
            Want::Labels(lt) => tail::TailHead::Labels(lt.to_vec()),
            Want::Vocab => tail::TailHead::Full,
        };
        self.ensure_tail_model(&head)?;
        let states = self.prefix_states(prompts)?;
        let t = self.tail.as_mut().expect("tail path");
        let (_, model) = t.model.as_mut().expect("tail model loaded");
        // A label head's rows are the K labels, then the unit rows (the hidden state).
        let n_label_rows = match want {
            Want::Labels(lt) => Some(lt.len()),
            Want::Vocab => None,
        };
        for (c, chunk) in states.chunks(per).enumerate() {
            let seqs: Vec<&[f32]> = chunk.iter().map(|s| &s[..]).collect();
            model
                .decode_embd(
                    &seqs,
                    &first[c * per..c * per + chunk.len()],
                    |s, pos, l| match n_label_rows {
                        Some(k) => on(c * per + s, pos, &l[..k], Some(&l[k..])),
                        None => on(c * per + s, pos, l, None),
                    },
                )
                .map_err(EngineError::Llama)?;
        }
        Ok(())
    }
}
