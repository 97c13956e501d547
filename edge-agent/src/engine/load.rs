//! Loading a model and choosing the forward path: [`Engine::load`] (the prepared copy at the
//! training precision, or on a tail-capable config the prefix model), [`Engine::load_file`],
//! the llama.cpp parameters of every model the engine loads, and `route`, which picks the tail
//! or the full path for a layout's first adapted layer (setting up the tail's caches, or
//! loading the F32 copy the first time a layout adapts layer 0).

use std::path::Path;

use fwdllm_shared::lora::ModelShape;

use super::head::{FeatureCache, FEATURE_CACHE_BYTES};
use super::{llama, prepare, tail, Engine, EngineConfig, EngineError, Precision, TailState};

impl Engine {
    /// Loads the model: on the full path at `config.precision` (converting it once via
    /// [`prepare::prepare`]); when the tail path is possible (see [`EngineConfig::tail_capable`])
    /// at `config.prefix_precision`, with the tail set up at once if `config.tail_layer` names
    /// a first adapted layer > 0 (otherwise when the first adapter arrives).
    pub fn load(config: &EngineConfig) -> Result<Engine, EngineError> {
        let threads = config.effective_threads();
        let base_precision = if config.tail_capable() && config.tail_layer != Some(0) {
            config.prefix_precision
        } else {
            config.precision
        };
        let path = prepare::prepare(&config.model, base_precision, &config.cache_dir, threads)?;
        if config.precision == Precision::Quantized {
            log::warn!(
                "using the quantised model as is: fine for inference and evaluation, but its forward gradients are noise (measured SNR < 1 at every eps: 8-bit activations); train with precision f32 or f16"
            );
        }
        // The prefix's K/V at f16 (llama.cpp's default): its rounding is part of the fixed
        // offset of the tail's input, and it halves the largest buffer of the prefix context.
        // An f32 prefix keeps f32 K/V so that it reproduces the full F32 model.
        let kv_f32 = base_precision == config.precision || base_precision == Precision::F32;
        let mut e = Self::load_file_kv(&path, config, kv_f32)?;
        e.base_precision = base_precision;
        e.base_kv_f32 = kv_f32;
        if let Some(l) = config.tail_layer.filter(|_| config.tail_capable()) {
            e.route(
                Some(l.min(e.shape.n_layer.saturating_sub(1))),
                config.trains_norms,
            )?;
        }
        Ok(e)
    }

    pub(super) fn llama_params(config: &EngineConfig) -> llama::LlamaParams {
        llama::LlamaParams {
            threads: config.effective_threads(),
            n_ctx: config.n_ctx,
            n_batch: config.n_batch.min(config.n_ctx),
            n_seq_max: config.seqs_per_decode.max(1),
            flash_attn: config.flash_attn,
            kv_f32: true,
            embd_input: false,
            layer_input: None,
        }
    }

    /// Loads `path` as is (no conversion, full path); `config.model`/`precision` are only
    /// recorded.
    pub fn load_file(path: &Path, config: &EngineConfig) -> Result<Engine, EngineError> {
        Self::load_file_kv(path, config, true)
    }

    fn load_file_kv(
        path: &Path,
        config: &EngineConfig,
        kv_f32: bool,
    ) -> Result<Engine, EngineError> {
        if !path.is_file() {
            return Err(EngineError::ModelNotFound(path.to_path_buf()));
        }
        let mut params = Self::llama_params(config);
        params.kv_f32 = kv_f32;
        let llama = llama::Llama::load(path, &params)
            .map_err(|e| EngineError::Llama(format!("{}: {e}", path.display())))?;
        let (n_layer, n_embd, n_head, n_head_kv) = llama.dims();
        let arch = llama
            .meta("general.architecture")
            .unwrap_or_else(|| "llama".into());
        let n_ff = llama
            .meta(&format!("{arch}.feed_forward_length"))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let shape = ModelShape {
            arch,
            n_layer,
            n_embd,
            n_head,
            n_head_kv,
            n_ff,
        };
        let add_bos = llama.meta("tokenizer.ggml.add_bos_token").as_deref() == Some("true");
        Ok(Engine {
            llama,
            base_precision: config.precision,
            base_kv_f32: kv_f32,
            prefix_id: None,
            tail: None,
            config: config.clone(),
            model_path: path.to_path_buf(),
            shape,
            task: None,
            add_bos,
            scratch: Vec::new(),
            prompt_memo: Default::default(),
            base_loss: None,
            current: None,
            current_lora: None,
            head: None,
        })
    }

    /// Picks the path for a layout whose first adapted layer is `first` (see [`ForwardPath`]):
    /// the tail from `first` if it is > 0 and the config allows it, else the full model at
    /// training precision (loaded now if the engine holds only the prefix). A layout that
    /// trains norm gains (`norms`) always takes the tail, from layer 0 if need be: only a tail
    /// model is loaded live (`engine::live`).
    pub(super) fn route(&mut self, first: Option<u32>, norms: bool) -> Result<(), EngineError> {
        if !self.config.tail_capable() {
            if norms {
                return Err(EngineError::NormsNeedTail);
            }
            return Ok(());
        }
        match first {
            Some(l) if (l > 0 || norms) && l < self.shape.n_layer => {
                if self.tail.as_ref().map(|t| t.first_layer) == Some(l) {
                    return Ok(());
                }
                self.llama
                    .capture_layer_input(Some(l))
                    .map_err(EngineError::Llama)?;
                log::info!(
                    "tail path: layers 0..{l} run once per batch on the {} prefix, perturbations run layers {l}..{} at f32",
                    self.base_precision.as_str(),
                    self.shape.n_layer
                );
                let dir = if self.config.prefix_cache_disk {
                    if self.prefix_id.is_none() {
                        let (_, h) = prepare::hash_file(&self.config.model)?;
                        self.prefix_id = Some(format!(
                            "{}-{}-kv{}",
                            &h[..16],
                            self.base_precision.as_str(),
                            if self.base_kv_f32 { "f32" } else { "f16" }
                        ));
                    }
                    let id = self.prefix_id.as_deref().expect("set above");
                    Some(tail::prefix_states_dir(&self.config.cache_dir, id, l))
                } else {
                    None
                };
                self.tail = Some(TailState {
                    first_layer: l,
                    model: None,
                    adapter: None,
                    norms: Vec::new(),
                    live: None,
                    cache: tail::PrefixCache::new(
                        self.config.prefix_cache_mib as usize * (1 << 20),
                    )
                    .with_dir(dir),
                    features: FeatureCache::new(FEATURE_CACHE_BYTES),
                });
                self.current = None;
                self.current_lora = None;
            }
            _ => {
                self.tail = None;
                if self.base_precision != self.config.precision {
                    let threads = self.config.effective_threads();
                    let path = prepare::prepare(
                        &self.config.model,
                        self.config.precision,
                        &self.config.cache_dir,
                        threads,
                    )?;
                    log::info!(
                        "full path: the layout adapts layer 0, loading {}",
                        path.display()
                    );
                    self.llama = llama::Llama::load(&path, &Self::llama_params(&self.config))
                        .map_err(|e| EngineError::Llama(format!("{}: {e}", path.display())))?;
                    self.model_path = path;
                    self.base_precision = self.config.precision;
                    self.base_kv_f32 = true;
                    self.prefix_id = None;
                    self.current = None;
                    self.current_lora = None;
                } else {
                    self.llama
                        .capture_layer_input(None)
                        .map_err(EngineError::Llama)?;
                }
            }
        }
        Ok(())
    }
}
