//! Setting the adapter: from weights ([`Engine::set_adapter`]: the GGUF adapter built in
//! memory, skipped when the weights are unchanged, kept when only the head rows changed), from
//! GGUF bytes or a file (an exported adapter, renumbered for the tail), and clearing it. Setting
//! an adapter also routes the engine to the path its layout needs.

use std::path::Path;

use fwdllm_shared::lora::LoraWeights;

use super::head::HeadParams;
use super::{tail, Engine, EngineError};

impl Engine {
    pub(super) fn check_shape(&self, weights: &LoraWeights) -> Result<(), EngineError> {
        let s = weights.layout().shape();
        if s.arch != self.shape.arch
            || s.n_layer != self.shape.n_layer
            || s.n_embd != self.shape.n_embd
            || s.n_head != self.shape.n_head
            || s.n_head_kv != self.shape.n_head_kv
            || (s.n_ff != self.shape.n_ff && self.shape.n_ff != 0)
        {
            return Err(EngineError::ShapeMismatch {
                adapter: Box::new(s.clone()),
                model: Box::new(self.shape.clone()),
            });
        }
        Ok(())
    }

    /// Builds the GGUF adapter for `weights` in memory and sets it (frees the previous one).
    /// Also picks the forward path for the weights' layout (see [`ForwardPath`](super::ForwardPath)).
    pub fn set_adapter(&mut self, weights: &LoraWeights) -> Result<(), EngineError> {
        self.check_shape(weights)?;
        let layout = weights.layout();
        let hash = weights.hash();
        self.route(self.layout_first_layer(layout), !layout.norms().is_empty())?;
        if self.current == Some(hash) {
            return Ok(());
        }
        self.current = None;
        if layout.head().is_some() && self.tail.is_none() {
            return Err(EngineError::HeadNeedsTail);
        }
        self.head = layout.head().map(|h| HeadParams::of(weights.params(), h));
        // Head rows sit after every LoRA tensor; a change to them alone keeps the adapter.
        let lora_end = layout.head().map_or(layout.total_len(), |h| h.delta.start);
        let lora_hash = fwdllm_shared::WeightsHash::compute(
            &layout.descriptor_bytes(),
            &weights.params()[..lora_end],
        );
        if self.current_lora != Some(lora_hash) {
            self.current_lora = None;
            if layout.tensors().is_empty() {
                self.clear_lora();
            } else {
                match &self.tail {
                    Some(t) => {
                        let bytes = fwdllm_shared::gguf::write_lora_adapter_params_from_layer(
                            layout,
                            weights.params(),
                            t.first_layer,
                        )?;
                        self.install_tail_adapter(bytes)?;
                    }
                    None => {
                        let bytes = fwdllm_shared::gguf::write_lora_adapter(weights);
                        self.llama
                            .set_adapter_bytes(&bytes)
                            .map_err(EngineError::Llama)?;
                    }
                }
            }
            self.set_norms(layout, weights.params())?;
            self.current_lora = Some(lora_hash);
        }
        self.current = Some(hash);
        Ok(())
    }

    /// Hands the layout's norm deltas to the tail ([`Engine::install_norms`]).
    fn set_norms(
        &mut self,
        layout: &fwdllm_shared::lora::LoraLayout,
        params: &[f32],
    ) -> Result<(), EngineError> {
        let norms = layout
            .norms()
            .iter()
            .map(|n| (n.layer, n.base_name(), params[n.delta.clone()].to_vec()))
            .collect();
        self.install_norms(norms)
    }

    /// Makes `norms` (layer, full-model tensor name, delta) the tail's trained gains: written
    /// into the live tail model at once, or kept for the next load (a tail loaded before any
    /// norms were trained is dropped, so that it is loaded again live).
    fn install_norms(&mut self, norms: Vec<(u32, String, Vec<f32>)>) -> Result<(), EngineError> {
        let Some(t) = &mut self.tail else {
            return match norms.is_empty() {
                true => Ok(()),
                false => Err(EngineError::NormsNeedTail),
            };
        };
        if norms.is_empty() && t.norms.is_empty() {
            return Ok(());
        }
        let first = t.first_layer;
        t.norms = norms
            .into_iter()
            .map(|(layer, name, delta)| {
                // The tail numbers its blocks from its first layer (`engine::tail`).
                let rest = name
                    .strip_prefix(&format!("blk.{layer}."))
                    .expect("norm names are blk.{layer}.…");
                (format!("blk.{}.{rest}", layer - first), delta)
            })
            .collect();
        match &mut t.live {
            Some(live) if t.model.is_some() => {
                live.set_norms(&t.norms)
                    .map_err(|problem| EngineError::Tail {
                        path: self.model_path.clone(),
                        problem,
                    })?;
            }
            _ if !t.norms.is_empty() => {
                t.live = None;
                t.model = None;
            }
            _ => {}
        }
        Ok(())
    }

    /// First layer of the tail a layout needs: its first adapted layer, or the last layer for a
    /// layout of head rows only (their features are the final hidden state).
    fn layout_first_layer(&self, layout: &fwdllm_shared::lora::LoraLayout) -> Option<u32> {
        layout
            .first_layer()
            .or_else(|| layout.head().map(|_| self.shape.n_layer.saturating_sub(1)))
    }

    /// Removes the LoRA tensors (keeps the head rows).
    fn clear_lora(&mut self) {
        self.llama.clear_adapter();
        if let Some(t) = &mut self.tail {
            t.adapter = None;
            if let Some((_, m)) = &mut t.model {
                m.clear_adapter();
            }
        }
    }

    fn install_tail_adapter(&mut self, bytes: Vec<u8>) -> Result<(), EngineError> {
        let t = self.tail.as_mut().expect("tail path");
        if let Some((_, m)) = &mut t.model {
            m.set_adapter_bytes(&bytes).map_err(EngineError::Llama)?;
        }
        t.adapter = Some(bytes);
        Ok(())
    }

    /// Sets an adapter from raw GGUF bytes (e.g. an exported file's contents). On a
    /// tail-capable config the adapter's lowest layer picks the path, as for [`Engine::set_adapter`].
    pub fn set_adapter_bytes(&mut self, bytes: &[u8]) -> Result<(), EngineError> {
        self.current = None;
        self.current_lora = None;
        let file = fwdllm_shared::gguf::read_gguf(bytes)
            .map_err(|e| EngineError::Llama(format!("LoRA adapter: {e}")))?;
        let head = fwdllm_shared::gguf::read_adapter_head(&file, self.shape.n_embd)
            .map_err(|e| EngineError::AdapterHead(e.to_string()))?;
        let norms = fwdllm_shared::gguf::read_adapter_norms(&file, self.shape.n_embd)
            .map_err(|e| EngineError::AdapterHead(e.to_string()))?;
        if let Some(n) = norms.iter().find(|n| n.layer >= self.shape.n_layer) {
            return Err(EngineError::AdapterHead(format!(
                "the adapter trains {}, but the model has {} layers; is this the adapter's base model?",
                n.name, self.shape.n_layer
            )));
        }
        if !norms.is_empty() && !self.config.tail_capable() {
            return Err(EngineError::NormsNeedTail);
        }
        if self.config.tail_capable() {
            let first = tail::adapter_first_layer(bytes)
                .or_else(|| head.as_ref().map(|_| self.shape.n_layer.saturating_sub(1)));
            let first = norms.iter().map(|n| n.layer).chain(first).min();
            self.route(first, !norms.is_empty())?;
        }
        if head.is_some() && self.tail.is_none() {
            return Err(EngineError::HeadNeedsTail);
        }
        self.head = head.map(|h| HeadParams {
            rows: h.rows,
            alpha: h.alpha,
            delta: h.delta,
            bias: h.bias,
        });
        self.install_norms(
            norms
                .into_iter()
                .map(|n| (n.layer, n.name, n.delta))
                .collect(),
        )?;
        if file.tensors.is_empty() {
            self.clear_lora();
            return Ok(());
        }
        match &self.tail {
            Some(t) => {
                let shifted = tail::shift_adapter(bytes, t.first_layer)
                    .map_err(|e| EngineError::Llama(format!("LoRA adapter: {e}")))?;
                self.install_tail_adapter(shifted)
            }
            None => self
                .llama
                .set_adapter_bytes(bytes)
                .map_err(EngineError::Llama),
        }
    }

    /// Sets an adapter from a GGUF file on disk (llama.cpp's own loader on the full path).
    pub fn set_adapter_file(&mut self, path: &Path) -> Result<(), EngineError> {
        self.current = None;
        let bytes = std::fs::read(path).map_err(|e| EngineError::io(path, e))?;
        if self.config.tail_capable() {
            return self.set_adapter_bytes(&bytes).map_err(|e| match e {
                EngineError::Llama(m) => EngineError::Llama(format!("{}: {m}", path.display())),
                other => other,
            });
        }
        // llama.cpp's loader would skip the norm gains without a word.
        let file = fwdllm_shared::gguf::read_gguf(&bytes)
            .map_err(|e| EngineError::Llama(format!("{}: {e}", path.display())))?;
        if !fwdllm_shared::gguf::read_adapter_norms(&file, self.shape.n_embd)
            .map_err(|e| EngineError::AdapterHead(e.to_string()))?
            .is_empty()
        {
            return Err(EngineError::NormsNeedTail);
        }
        self.llama
            .set_adapter_file(path)
            .map_err(EngineError::Llama)
    }

    /// Removes the adapter (base model).
    pub fn clear_adapter(&mut self) {
        self.current = None;
        self.current_lora = None;
        self.head = None;
        self.llama.clear_adapter();
        if let Some(t) = &mut self.tail {
            t.adapter = None;
            if let Some((_, m)) = &mut t.model {
                m.clear_adapter();
            }
            if !t.norms.is_empty() {
                t.norms.clear();
                // Restoring base gains only writes tensors read before; should it fail anyway,
                // the tail is loaded afresh from the untouched file.
                if t.live.as_mut().is_none_or(|l| l.set_norms(&[]).is_err()) {
                    t.live = None;
                    t.model = None;
                }
            }
        }
    }
}
