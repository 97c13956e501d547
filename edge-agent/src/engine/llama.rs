//! The engine's only `unsafe` code: a small owner of one llama.cpp model, one context, one
//! batch and at most one LoRA adapter, called through `llama-cpp-sys-2`.
//!
//! Why raw FFI: the safe `llama-cpp-2` API loads adapters only from a path and hides the raw
//! model/context pointers, so an in-memory adapter swap (`llama_adapter_lora_init_from_file_ptr`
//! on an `fmemopen` `FILE*`) and explicit `llama_adapter_lora_free` are impossible through it.
//!
//! Invariants (upheld by [`Llama`], which is the only owner of these pointers):
//! 1. `model`, `ctx` are non-null from construction until `Drop`; `ctx` was created from `model`.
//! 2. `adapter`, when `Some`, was created from `model` and is the only adapter set on `ctx`.
//!    A new adapter is set on `ctx` *before* the old one is freed, so `ctx` never refers to
//!    freed memory; `Drop` detaches adapters from `ctx`, then frees adapter, context, batch,
//!    model in that order (adapters and contexts must not outlive their model).
//! 3. `batch` was allocated by `llama_batch_init(cap, embd, 1)` (`embd` = 0 for token input,
//!    `n_embd` for hidden-state input); we never write more than `cap` positions into it and
//!    each has exactly one sequence id.
//! 4. `Llama` is `Send` but not `Sync`: llama.cpp contexts are not safe for concurrent use, and
//!    `&mut self` on every call that touches the context serialises access.
//! 5. Logit slices returned to callers borrow `self`, so they cannot outlive the next decode.

use std::ffi::{c_char, c_void, CStr, CString};
use std::path::Path;
use std::ptr::NonNull;
use std::sync::Once;

use llama_cpp_sys_2 as sys;

/// Token id as llama.cpp defines it.
pub type Token = i32;

/// Context settings for [`Llama::load`].
#[derive(Debug, Clone)]
pub struct LlamaParams {
    pub threads: u32,
    pub n_ctx: u32,
    pub n_batch: u32,
    pub n_seq_max: u32,
    pub flash_attn: bool,
    /// f32 K/V cache (f16 otherwise); f16 adds noise to forward gradients.
    pub kv_f32: bool,
    /// Decode takes hidden states (`n_embd` floats per token) instead of token ids: the tail
    /// model of the tail engine (`engine::tail`).
    pub embd_input: bool,
    /// Also return the input of this layer (the residual stream after layer `lid - 1`) for
    /// every token of a decode: the frozen prefix of the tail engine.
    pub layer_input: Option<u32>,
}

// From llama.cpp's `src/llama-ext.h` (in libllama, but not in the `llama.h` that
// llama-cpp-sys-2 generates bindings from): per-layer input capture, the route llama.cpp itself
// uses to hand hidden states to a draft model. Rows come back in batch order
// (`llama_context::output_reorder`). That header declares them without `extern "C"`, so they
// have C++ linkage: the names below are their Itanium C++ ABI manglings, the ABI of every
// target we build (x86-64 and aarch64 Linux, gcc and clang); a changed signature fails to link
// rather than misbehaving.
extern "C" {
    #[link_name = "_Z30llama_set_embeddings_layer_inpP13llama_contextjb"]
    fn llama_set_embeddings_layer_inp(ctx: *mut sys::llama_context, lid: u32, value: bool);
    #[link_name = "_Z30llama_get_embeddings_layer_inpP13llama_contextj"]
    fn llama_get_embeddings_layer_inp(ctx: *mut sys::llama_context, lid: u32) -> *mut f32;
}

static BACKEND: Once = Once::new();

/// Initialises llama.cpp once per process and routes its log output to the `log` facade.
/// llama.cpp's INFO chatter goes to `debug` so that a default-level logger stays quiet.
pub fn init_backend() {
    BACKEND.call_once(|| {
        // SAFETY: the callback is a plain `extern "C"` fn with no user data; backend init has
        // no preconditions and runs exactly once.
        unsafe {
            sys::llama_log_set(Some(log_callback), std::ptr::null_mut());
            sys::ggml_log_set(Some(log_callback), std::ptr::null_mut());
            sys::llama_backend_init();
        }
    });
}

unsafe extern "C" fn log_callback(level: sys::ggml_log_level, text: *const c_char, _: *mut c_void) {
    if text.is_null() {
        return;
    }
    // SAFETY: llama.cpp passes a NUL-terminated string valid for the duration of the call.
    let text = unsafe { CStr::from_ptr(text) }.to_string_lossy();
    let text = text.trim_end();
    if text.is_empty() {
        return;
    }
    match level {
        sys::GGML_LOG_LEVEL_ERROR => log::error!(target: "llama.cpp", "{text}"),
        sys::GGML_LOG_LEVEL_WARN => log::warn!(target: "llama.cpp", "{text}"),
        sys::GGML_LOG_LEVEL_INFO => log::debug!(target: "llama.cpp", "{text}"),
        _ => log::trace!(target: "llama.cpp", "{text}"),
    }
}

/// Dequantises / converts a GGUF model file with `llama_model_quantize`
/// (`allow_requantize` + `pure`, so every tensor ends up in `ftype`).
pub fn convert_model(
    input: &Path,
    output: &Path,
    to: super::Precision,
    threads: u32,
) -> Result<(), String> {
    init_backend();
    let inp = path_cstring(input)?;
    let out = path_cstring(output)?;
    // SAFETY: default params are plain data; the pointers inside stay null.
    let mut params = unsafe { sys::llama_model_quantize_default_params() };
    params.nthread = threads as i32;
    params.ftype = match to {
        super::Precision::F32 => sys::LLAMA_FTYPE_ALL_F32,
        super::Precision::F16 => sys::LLAMA_FTYPE_MOSTLY_F16,
        super::Precision::Q8_0 => sys::LLAMA_FTYPE_MOSTLY_Q8_0,
        super::Precision::Q4_0 => sys::LLAMA_FTYPE_MOSTLY_Q4_0,
        super::Precision::Quantized => return Err("the quantised file is used as is".into()),
    };
    params.allow_requantize = true;
    params.pure_ = true;
    params.quantize_output_tensor = true;
    // SAFETY: both strings are NUL-terminated and live across the call; params is valid.
    let rc = unsafe { sys::llama_model_quantize(inp.as_ptr(), out.as_ptr(), &params) };
    if rc != 0 {
        return Err(format!("llama_model_quantize returned {rc}"));
    }
    Ok(())
}

fn path_cstring(p: &Path) -> Result<CString, String> {
    let s = p
        .to_str()
        .ok_or_else(|| format!("path {} is not UTF-8", p.display()))?;
    CString::new(s).map_err(|_| format!("path {} contains a NUL byte", p.display()))
}

/// One model + context (+ batch, + current adapter). See the module invariants.
pub struct Llama {
    model: NonNull<sys::llama_model>,
    ctx: NonNull<sys::llama_context>,
    batch: sys::llama_batch,
    batch_cap: usize,
    /// Tokens one sequence may hold (its KV stream: n_ctx / n_seq_max).
    seq_cap: usize,
    /// Sequences per decode (KV streams).
    seq_max: usize,
    adapter: Option<NonNull<sys::llama_adapter_lora>>,
    n_vocab: usize,
    n_embd: usize,
    embd_input: bool,
    layer_input: Option<u32>,
    /// Tokens of the last decode (rows of the captured layer input).
    last_tokens: usize,
}

// SAFETY: the pointers are owned exclusively by this value and llama.cpp objects may move
// between threads; concurrent access is prevented by `&mut self` (invariant 4).
unsafe impl Send for Llama {}

impl Llama {
    /// Loads `path` and creates a context.
    pub fn load(path: &Path, p: &LlamaParams) -> Result<Llama, String> {
        init_backend();
        let cpath = path_cstring(path)?;
        // SAFETY: default params are plain data.
        let mut mp = unsafe { sys::llama_model_default_params() };
        mp.n_gpu_layers = 0;
        // Repacked (AMX/extra) buffers crashed quantised models in a native build (issue 3).
        mp.use_extra_bufts = false;
        // SAFETY: cpath is NUL-terminated; returns null on failure.
        let model = NonNull::new(unsafe { sys::llama_model_load_from_file(cpath.as_ptr(), mp) })
            .ok_or_else(|| "llama.cpp could not load the model (see log)".to_string())?;
        // SAFETY: plain data.
        let mut cp = unsafe { sys::llama_context_default_params() };
        cp.n_ctx = p.n_ctx;
        cp.n_batch = p.n_batch;
        cp.n_ubatch = p.n_batch;
        cp.n_seq_max = p.n_seq_max.max(1);
        cp.n_threads = p.threads as i32;
        cp.n_threads_batch = p.threads as i32;
        cp.flash_attn_type = if p.flash_attn {
            sys::LLAMA_FLASH_ATTN_TYPE_ENABLED
        } else {
            sys::LLAMA_FLASH_ATTN_TYPE_DISABLED
        };
        if p.kv_f32 {
            cp.type_k = sys::GGML_TYPE_F32;
            cp.type_v = sys::GGML_TYPE_F32;
        }
        cp.no_perf = true;
        // One KV stream per sequence (n_ctx / n_seq_max cells each): attention then spans only
        // a sequence's own tokens. A unified stream made every token attend over the whole
        // multi-prompt batch (masked), 10-20% slower per loss evaluation here (measured with
        // `fwdllm-agent eval --limit 64`).
        cp.kv_unified = false;
        // SAFETY: model is a valid model pointer (invariant 1).
        let ctx = match NonNull::new(unsafe { sys::llama_init_from_model(model.as_ptr(), cp) }) {
            Some(c) => c,
            None => {
                // SAFETY: model was created above and is not referenced elsewhere.
                unsafe { sys::llama_model_free(model.as_ptr()) };
                return Err("llama.cpp could not create a context (see log)".into());
            }
        };
        let cap = p.n_batch.max(1) as usize;
        // SAFETY: model valid (invariant 1); pure getter.
        let n_embd = unsafe { sys::llama_model_n_embd(model.as_ptr()) } as usize;
        if let Some(lid) = p.layer_input {
            // SAFETY: model valid; pure getter.
            let n_layer = unsafe { sys::llama_model_n_layer(model.as_ptr()) } as u32;
            if lid > n_layer {
                // SAFETY: ctx and model created above, referenced nowhere else.
                unsafe {
                    sys::llama_free(ctx.as_ptr());
                    sys::llama_model_free(model.as_ptr());
                }
                return Err(format!(
                    "layer input {lid} requested but the model has {n_layer} layers"
                ));
            }
            // SAFETY: ctx valid; lid <= n_layer as llama.cpp asserts.
            unsafe { llama_set_embeddings_layer_inp(ctx.as_ptr(), lid, true) };
        }
        // SAFETY: allocates `cap` slots with one seq id each, token ids or (embd_input)
        // `n_embd` floats per slot (invariant 3).
        let batch = unsafe {
            sys::llama_batch_init(cap as i32, if p.embd_input { n_embd as i32 } else { 0 }, 1)
        };
        // SAFETY: model valid; the vocab pointer is owned by the model.
        let n_vocab =
            unsafe { sys::llama_vocab_n_tokens(sys::llama_model_get_vocab(model.as_ptr())) }
                as usize;
        Ok(Llama {
            model,
            ctx,
            batch,
            batch_cap: cap,
            seq_cap: (p.n_ctx / p.n_seq_max.max(1)).max(1) as usize,
            seq_max: p.n_seq_max.max(1) as usize,
            adapter: None,
            n_vocab,
            n_embd,
            embd_input: p.embd_input,
            layer_input: p.layer_input,
            last_tokens: 0,
        })
    }

    pub fn n_vocab(&self) -> usize {
        self.n_vocab
    }

    pub fn n_embd(&self) -> usize {
        self.n_embd
    }

    pub fn batch_capacity(&self) -> usize {
        self.batch_cap
    }

    /// (n_layer, n_embd, n_head, n_head_kv) from the loaded model.
    pub fn dims(&self) -> (u32, u32, u32, u32) {
        let m = self.model.as_ptr();
        // SAFETY: model valid (invariant 1); these are pure getters.
        unsafe {
            (
                sys::llama_model_n_layer(m) as u32,
                sys::llama_model_n_embd(m) as u32,
                sys::llama_model_n_head(m) as u32,
                sys::llama_model_n_head_kv(m) as u32,
            )
        }
    }

    /// A GGUF metadata value of the model as a string.
    pub fn meta(&self, key: &str) -> Option<String> {
        let key = CString::new(key).ok()?;
        let mut buf = vec![0u8; 256];
        // SAFETY: buf has buf.len() writable bytes; llama.cpp NUL-terminates within it.
        let n = unsafe {
            sys::llama_model_meta_val_str(
                self.model.as_ptr(),
                key.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n < 0 {
            return None;
        }
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        Some(String::from_utf8_lossy(&buf[..end]).into_owned())
    }

    pub fn set_threads(&mut self, threads: u32) {
        // SAFETY: ctx valid (invariant 1).
        unsafe { sys::llama_set_n_threads(self.ctx.as_ptr(), threads as i32, threads as i32) };
    }

    /// Tokenizes `text` (no special-token parsing; `add_bos` adds the model's BOS if it wants one).
    pub fn tokenize(&self, text: &str, add_bos: bool) -> Vec<Token> {
        // SAFETY: model valid; vocab owned by model.
        let vocab = unsafe { sys::llama_model_get_vocab(self.model.as_ptr()) };
        let tokenize_into = |out: &mut Vec<Token>| {
            // SAFETY: text pointer/len describe a valid buffer (not NUL-terminated, len given);
            // out has out.len() slots. A negative return is the needed size.
            unsafe {
                sys::llama_tokenize(
                    vocab,
                    text.as_ptr().cast(),
                    text.len() as i32,
                    out.as_mut_ptr(),
                    out.len() as i32,
                    add_bos,
                    false,
                )
            }
        };
        let mut out = vec![0 as Token; text.len() + 8];
        let mut n = tokenize_into(&mut out);
        if n < 0 {
            out.resize((-n) as usize, 0);
            n = tokenize_into(&mut out);
        }
        out.truncate(n.max(0) as usize);
        out
    }

    /// The text of one token.
    pub fn token_piece(&self, token: Token) -> String {
        String::from_utf8_lossy(&self.token_bytes(token)).into_owned()
    }

    /// The bytes of one token. A byte-level BPE token may hold part of a UTF-8 character, so
    /// generated text is assembled from bytes and decoded once (see `engine::generate`).
    pub fn token_bytes(&self, token: Token) -> Vec<u8> {
        // SAFETY: model valid; vocab owned by model.
        let vocab = unsafe { sys::llama_model_get_vocab(self.model.as_ptr()) };
        let mut buf = vec![0u8; 64];
        // SAFETY: buf has buf.len() writable bytes; returns bytes written or -needed.
        let n = unsafe {
            sys::llama_token_to_piece(
                vocab,
                token,
                buf.as_mut_ptr().cast(),
                buf.len() as i32,
                0,
                false,
            )
        };
        if n < 0 {
            return Vec::new();
        }
        buf.truncate(n as usize);
        buf
    }

    /// Whether `token` ends a generation (EOS, EOT and the like, per the model's vocabulary).
    pub fn is_eog(&self, token: Token) -> bool {
        // SAFETY: model valid; vocab owned by model; pure look-up.
        unsafe { sys::llama_vocab_is_eog(sys::llama_model_get_vocab(self.model.as_ptr()), token) }
    }

    /// Appends one token per listed sequence to the KV memory *without clearing it* (the
    /// incremental step of generation, after a [`Llama::decode`] of the prompts): item
    /// `(seq, pos, token)` puts `token` at position `pos` of sequence `seq`, and
    /// `on_logits(item, logits)` receives every item's next-token logits.
    pub fn decode_step(
        &mut self,
        items: &[(usize, usize, Token)],
        mut on_logits: impl FnMut(usize, &[f32]),
    ) -> Result<(), String> {
        if self.embd_input {
            return Err("this model takes hidden states (decode_embd_step), not tokens".into());
        }
        let b = self.batch;
        let at: Vec<(usize, usize)> = items.iter().map(|&(s, p, _)| (s, p)).collect();
        self.decode_at(&at, &mut on_logits, |i| {
            // SAFETY: i < items.len() <= batch_cap (checked by decode_at).
            unsafe { *b.token.add(i) = items[i].2 };
        })
    }

    /// As [`Llama::decode_step`] for a model loaded with `embd_input`: item `i` is
    /// `rows[i * n_embd..(i + 1) * n_embd]` at `(seq, pos) = at[i]`.
    pub fn decode_embd_step(
        &mut self,
        at: &[(usize, usize)],
        rows: &[f32],
        mut on_logits: impl FnMut(usize, &[f32]),
    ) -> Result<(), String> {
        if !self.embd_input {
            return Err("this model takes tokens (decode_step), not hidden states".into());
        }
        let d = self.n_embd;
        if rows.len() != at.len() * d {
            return Err(format!(
                "{} floats for {} rows of n_embd {d}",
                rows.len(),
                at.len()
            ));
        }
        let b = self.batch;
        self.decode_at(at, &mut on_logits, |i| {
            // SAFETY: i < at.len() <= batch_cap; `embd` has cap * n_embd floats (embd_input).
            unsafe { std::ptr::copy_nonoverlapping(rows[i * d..].as_ptr(), b.embd.add(i * d), d) };
        })
    }

    fn decode_at(
        &mut self,
        at: &[(usize, usize)],
        on_logits: &mut dyn FnMut(usize, &[f32]),
        mut put: impl FnMut(usize),
    ) -> Result<(), String> {
        self.last_tokens = 0;
        if at.is_empty() || at.len() > self.batch_cap {
            return Err(format!(
                "a step of {} tokens (need 1..={})",
                at.len(),
                self.batch_cap
            ));
        }
        if let Some(&(s, p)) = at
            .iter()
            .find(|&&(s, p)| s >= self.seq_max || p >= self.seq_cap)
        {
            return Err(format!(
                "position {p} of sequence {s} is outside the context ({} sequences of {} tokens; raise n_ctx or lower the token budget)",
                self.seq_max, self.seq_cap
            ));
        }
        for (i, &(s, pos)) in at.iter().enumerate() {
            put(i);
            let b = &mut self.batch;
            // SAFETY: i < at.len() <= batch_cap (invariant 3); seq_id[i] points to one slot.
            unsafe {
                *b.pos.add(i) = pos as i32;
                *b.n_seq_id.add(i) = 1;
                *(*b.seq_id.add(i)) = s as i32;
                *b.logits.add(i) = 1;
            }
        }
        self.batch.n_tokens = at.len() as i32;
        // SAFETY: ctx valid; batch filled consistently above; the KV memory holds positions
        // 0..pos of each listed sequence from earlier decodes (llama.cpp checks continuity).
        let rc = unsafe { sys::llama_decode(self.ctx.as_ptr(), self.batch) };
        if rc != 0 {
            return Err(format!("llama_decode returned {rc}"));
        }
        self.last_tokens = at.len();
        for i in 0..at.len() {
            // SAFETY: every item requested logits; n_vocab floats owned by ctx, valid until
            // the next decode, which cannot happen while this borrow lives.
            let p = unsafe { sys::llama_get_logits_ith(self.ctx.as_ptr(), i as i32) };
            if p.is_null() {
                return Err(format!("no logits for batch index {i}"));
            }
            // SAFETY: see above.
            on_logits(i, unsafe { std::slice::from_raw_parts(p, self.n_vocab) });
        }
        Ok(())
    }

    /// Clears the KV memory, decodes `seqs` (sequence i gets seq id i) in one batch, and calls
    /// `on_logits(seq, pos, logits)` for every position `pos >= first_output[seq]`.
    /// Only those positions request logits from llama.cpp (none when `first_output[seq]` is
    /// the sequence's length).
    pub fn decode(
        &mut self,
        seqs: &[&[Token]],
        first_output: &[usize],
        on_logits: impl FnMut(usize, usize, &[f32]),
    ) -> Result<(), String> {
        if self.embd_input {
            return Err("this model takes hidden states (decode_embd), not tokens".into());
        }
        let lens: Vec<usize> = seqs.iter().map(|s| s.len()).collect();
        let b = self.batch;
        self.decode_with(&lens, first_output, on_logits, |i, s, pos| {
            // SAFETY: i < total <= batch_cap (checked by decode_with); `token` has cap slots.
            unsafe { *b.token.add(i) = seqs[s][pos] };
        })
    }

    /// As [`Llama::decode`] for a model loaded with `embd_input`: sequence `s` is
    /// `seqs[s].len() / n_embd` positions of hidden states, row-major.
    pub fn decode_embd(
        &mut self,
        seqs: &[&[f32]],
        first_output: &[usize],
        on_logits: impl FnMut(usize, usize, &[f32]),
    ) -> Result<(), String> {
        if !self.embd_input {
            return Err("this model takes tokens (decode), not hidden states".into());
        }
        let d = self.n_embd;
        if let Some(s) = seqs.iter().find(|s| s.len() % d != 0) {
            return Err(format!(
                "hidden states of {} floats are not whole rows of n_embd {d}",
                s.len()
            ));
        }
        let lens: Vec<usize> = seqs.iter().map(|s| s.len() / d).collect();
        let b = self.batch;
        self.decode_with(&lens, first_output, on_logits, |i, s, pos| {
            let row = &seqs[s][pos * d..(pos + 1) * d];
            // SAFETY: i < total <= batch_cap; `embd` has cap * n_embd floats (embd_input).
            unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), b.embd.add(i * d), d) };
        })
    }

    /// Captures the input of layer `lid` (or nothing) from the next decode on.
    pub fn capture_layer_input(&mut self, lid: Option<u32>) -> Result<(), String> {
        let n_layer = self.dims().0;
        if let Some(l) = lid {
            if l > n_layer {
                return Err(format!(
                    "layer input {l} requested but the model has {n_layer} layers"
                ));
            }
        }
        if let Some(old) = self.layer_input {
            // SAFETY: ctx valid; old <= n_layer (checked when it was set).
            unsafe { llama_set_embeddings_layer_inp(self.ctx.as_ptr(), old, false) };
        }
        if let Some(l) = lid {
            // SAFETY: ctx valid; l <= n_layer checked above.
            unsafe { llama_set_embeddings_layer_inp(self.ctx.as_ptr(), l, true) };
        }
        self.layer_input = lid;
        self.last_tokens = 0;
        Ok(())
    }

    /// The input of the `layer_input` layer for every token of the last decode, in batch
    /// order (`n_embd` floats per token), or `None` if this model does not capture one.
    pub fn layer_input(&mut self) -> Option<&[f32]> {
        let lid = self.layer_input?;
        if self.last_tokens == 0 {
            return None;
        }
        // SAFETY: ctx valid; capture was enabled at load for `lid` and a decode has run, so
        // llama.cpp holds `n_tokens * n_embd` floats owned by ctx, valid until the next decode
        // (which needs `&mut self`, excluded while this borrow lives).
        let p = unsafe { llama_get_embeddings_layer_inp(self.ctx.as_ptr(), lid) };
        if p.is_null() {
            return None;
        }
        // SAFETY: see above.
        Some(unsafe { std::slice::from_raw_parts(p, self.last_tokens * self.n_embd) })
    }

    fn decode_with(
        &mut self,
        lens: &[usize],
        first_output: &[usize],
        mut on_logits: impl FnMut(usize, usize, &[f32]),
        mut put: impl FnMut(usize, usize, usize),
    ) -> Result<(), String> {
        let total: usize = lens.iter().sum();
        self.last_tokens = 0;
        if total > self.batch_cap {
            return Err(format!(
                "batch of {total} tokens exceeds n_batch {} (raise n_batch/n_ctx or shorten inputs)",
                self.batch_cap
            ));
        }
        if lens.contains(&0) {
            return Err("empty sequence".into());
        }
        if first_output.len() != lens.len() {
            return Err(format!(
                "{} output offsets for {} sequences",
                first_output.len(),
                lens.len()
            ));
        }
        if lens.len() > self.seq_max {
            return Err(format!(
                "{} sequences in one decode exceed n_seq_max {}",
                lens.len(),
                self.seq_max
            ));
        }
        if let Some(long) = lens.iter().find(|&&n| n > self.seq_cap) {
            return Err(format!(
                "a prompt of {long} tokens exceeds the {} tokens each sequence gets (n_ctx / seqs_per_decode); raise n_ctx or lower max_text_tokens",
                self.seq_cap
            ));
        }
        // SAFETY: ctx valid; clearing memory (with data) has no preconditions.
        unsafe { sys::llama_memory_clear(sys::llama_get_memory(self.ctx.as_ptr()), true) };
        let mut i = 0usize;
        let mut outputs = Vec::new();
        for (s, &n) in lens.iter().enumerate() {
            for pos in 0..n {
                let want = pos >= first_output[s];
                put(i, s, pos);
                let b = &mut self.batch;
                // SAFETY: i < total <= batch_cap (invariant 3); seq_id[i] points to one slot.
                unsafe {
                    *b.pos.add(i) = pos as i32;
                    *b.n_seq_id.add(i) = 1;
                    *(*b.seq_id.add(i)) = s as i32;
                    *b.logits.add(i) = want as i8;
                }
                if want {
                    outputs.push((s, pos, i));
                }
                i += 1;
            }
        }
        self.batch.n_tokens = i as i32;
        // SAFETY: ctx valid; batch filled consistently above.
        let rc = unsafe { sys::llama_decode(self.ctx.as_ptr(), self.batch) };
        if rc != 0 {
            return Err(format!("llama_decode returned {rc}"));
        }
        self.last_tokens = total;
        for (s, pos, idx) in outputs {
            // SAFETY: idx had logits requested; llama.cpp returns n_vocab floats owned by ctx,
            // valid until the next decode, which cannot happen while this borrow lives.
            let p = unsafe { sys::llama_get_logits_ith(self.ctx.as_ptr(), idx as i32) };
            if p.is_null() {
                return Err(format!("no logits for batch index {idx}"));
            }
            // SAFETY: see above.
            let logits = unsafe { std::slice::from_raw_parts(p, self.n_vocab) };
            on_logits(s, pos, logits);
        }
        Ok(())
    }

    /// Loads a GGUF LoRA adapter from memory (via `fmemopen`, no file system), sets it on the
    /// context with scale 1 and frees the previous adapter.
    pub fn set_adapter_bytes(&mut self, bytes: &[u8]) -> Result<(), String> {
        if bytes.is_empty() {
            return Err("empty adapter".into());
        }
        // SAFETY: fmemopen in read mode never writes to the buffer; the buffer outlives the
        // FILE, which is closed before returning.
        let file =
            unsafe { libc::fmemopen(bytes.as_ptr() as *mut c_void, bytes.len(), c"rb".as_ptr()) };
        if file.is_null() {
            return Err(format!(
                "fmemopen failed: {}",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: model valid; file is a valid open FILE*.
        let adapter =
            unsafe { sys::llama_adapter_lora_init_from_file_ptr(self.model.as_ptr(), file.cast()) };
        // SAFETY: file was opened above and is not used afterwards.
        unsafe { libc::fclose(file) };
        let adapter = NonNull::new(adapter)
            .ok_or_else(|| "llama.cpp rejected the LoRA adapter (see log)".to_string())?;
        self.install(adapter)
    }

    /// Loads a GGUF LoRA adapter from a file (tests compare it against the in-memory path).
    pub fn set_adapter_file(&mut self, path: &Path) -> Result<(), String> {
        let c = path_cstring(path)?;
        // SAFETY: model valid; c NUL-terminated.
        let adapter = unsafe { sys::llama_adapter_lora_init(self.model.as_ptr(), c.as_ptr()) };
        let adapter = NonNull::new(adapter)
            .ok_or_else(|| format!("llama.cpp rejected the LoRA adapter {}", path.display()))?;
        self.install(adapter)
    }

    fn install(&mut self, adapter: NonNull<sys::llama_adapter_lora>) -> Result<(), String> {
        let mut ptrs = [adapter.as_ptr()];
        let mut scales = [1.0f32];
        // SAFETY: ctx valid; adapter was created from our model (invariant 2).
        let rc = unsafe {
            sys::llama_set_adapters_lora(
                self.ctx.as_ptr(),
                ptrs.as_mut_ptr(),
                1,
                scales.as_mut_ptr(),
            )
        };
        if rc != 0 {
            // SAFETY: not set on ctx, owned only here.
            unsafe { sys::llama_adapter_lora_free(adapter.as_ptr()) };
            return Err(format!("llama_set_adapters_lora returned {rc}"));
        }
        if let Some(old) = self.adapter.replace(adapter) {
            // SAFETY: ctx now refers to the new adapter only (invariant 2).
            unsafe { sys::llama_adapter_lora_free(old.as_ptr()) };
        }
        Ok(())
    }

    /// Detaches and frees the current adapter (base model only).
    pub fn clear_adapter(&mut self) {
        if let Some(old) = self.adapter.take() {
            // SAFETY: ctx valid; detach first, then free (invariant 2).
            unsafe {
                sys::llama_set_adapters_lora(
                    self.ctx.as_ptr(),
                    std::ptr::null_mut(),
                    0,
                    std::ptr::null_mut(),
                );
                sys::llama_adapter_lora_free(old.as_ptr());
            }
        }
    }
}

impl Drop for Llama {
    fn drop(&mut self) {
        self.clear_adapter();
        // SAFETY: invariant 1 and 3; order: context, batch, then model (invariant 2).
        unsafe {
            sys::llama_free(self.ctx.as_ptr());
            sys::llama_batch_free(self.batch);
            sys::llama_model_free(self.model.as_ptr());
        }
    }
}
