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
//! 3. `batch` was allocated by `llama_batch_init(cap, 0, 1)`; we never write more than `cap`
//!    tokens into it and each token has exactly one sequence id.
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
    to_f16: bool,
    threads: u32,
) -> Result<(), String> {
    init_backend();
    let inp = path_cstring(input)?;
    let out = path_cstring(output)?;
    // SAFETY: default params are plain data; the pointers inside stay null.
    let mut params = unsafe { sys::llama_model_quantize_default_params() };
    params.nthread = threads as i32;
    params.ftype = if to_f16 {
        sys::LLAMA_FTYPE_MOSTLY_F16
    } else {
        sys::LLAMA_FTYPE_ALL_F32
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
        // SAFETY: allocates `cap` token slots with one seq id each (invariant 3).
        let batch = unsafe { sys::llama_batch_init(cap as i32, 0, 1) };
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
        })
    }

    pub fn n_vocab(&self) -> usize {
        self.n_vocab
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
        let mut out = vec![0 as Token; text.len() + 8];
        // SAFETY: text pointer/len describe a valid buffer (not NUL-terminated, len given);
        // out has out.len() slots. A negative return is the needed size.
        let mut n = unsafe {
            sys::llama_tokenize(
                vocab,
                text.as_ptr().cast(),
                text.len() as i32,
                out.as_mut_ptr(),
                out.len() as i32,
                add_bos,
                false,
            )
        };
        if n < 0 {
            out.resize((-n) as usize, 0);
            // SAFETY: as above with the enlarged buffer.
            n = unsafe {
                sys::llama_tokenize(
                    vocab,
                    text.as_ptr().cast(),
                    text.len() as i32,
                    out.as_mut_ptr(),
                    out.len() as i32,
                    add_bos,
                    false,
                )
            };
        }
        out.truncate(n.max(0) as usize);
        out
    }

    /// The text of one token.
    pub fn token_piece(&self, token: Token) -> String {
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
            return String::new();
        }
        String::from_utf8_lossy(&buf[..n as usize]).into_owned()
    }

    /// Clears the KV memory, decodes `seqs` (sequence i gets seq id i) in one batch, and calls
    /// `on_logits(seq, pos, logits)` for every position `pos >= first_output[seq]`.
    /// Only those positions request logits from llama.cpp.
    pub fn decode(
        &mut self,
        seqs: &[&[Token]],
        first_output: &[usize],
        mut on_logits: impl FnMut(usize, usize, &[f32]),
    ) -> Result<(), String> {
        let total: usize = seqs.iter().map(|s| s.len()).sum();
        if total > self.batch_cap {
            return Err(format!(
                "batch of {total} tokens exceeds n_batch {} (raise n_batch/n_ctx or shorten inputs)",
                self.batch_cap
            ));
        }
        if seqs.iter().any(|s| s.is_empty()) {
            return Err("empty sequence".into());
        }
        if seqs.len() > self.seq_max {
            return Err(format!(
                "{} sequences in one decode exceed n_seq_max {}",
                seqs.len(),
                self.seq_max
            ));
        }
        if let Some(long) = seqs.iter().find(|s| s.len() > self.seq_cap) {
            return Err(format!(
                "a prompt of {} tokens exceeds the {} tokens each sequence gets (n_ctx / seqs_per_decode); raise n_ctx or lower max_text_tokens",
                long.len(),
                self.seq_cap
            ));
        }
        // SAFETY: ctx valid; clearing memory (with data) has no preconditions.
        unsafe { sys::llama_memory_clear(sys::llama_get_memory(self.ctx.as_ptr()), true) };
        let b = &mut self.batch;
        let mut i = 0usize;
        let mut outputs = Vec::new();
        for (s, toks) in seqs.iter().enumerate() {
            for (pos, &t) in toks.iter().enumerate() {
                let want = pos >= first_output[s];
                // SAFETY: i < total <= batch_cap (invariant 3); seq_id[i] points to one slot.
                unsafe {
                    *b.token.add(i) = t;
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
        b.n_tokens = i as i32;
        // SAFETY: ctx valid; batch filled consistently above.
        let rc = unsafe { sys::llama_decode(self.ctx.as_ptr(), *b) };
        if rc != 0 {
            return Err(format!("llama_decode returned {rc}"));
        }
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
