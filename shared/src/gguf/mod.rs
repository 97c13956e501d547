//! GGUF v3: a writer for LoRA adapters that stock llama.cpp loads, and a small,
//! panic-free reader (for tests, for inspecting exported adapters and for reading a model's
//! [`ModelShape`] from its header).
//!
//! Layout facts, checked against the llama.cpp vendored by llama-cpp-sys-2 0.1.160
//! (`ggml/src/gguf.cpp`, `gguf_init_from_file_impl` / `gguf_write_to_buf`, and
//! `src/llama-adapter.cpp`, `llama_adapter_lora_init_impl`):
//! * header: magic `"GGUF"`, version u32 = 3, n_tensors u64, n_kv u64 (all little-endian);
//! * kv: key as string (u64 length + UTF-8 bytes, no NUL), value type u32, value; arrays are
//!   element type u32, count u64, elements; strings as above; bool is one byte 0/1;
//! * tensor info: name string (< 64 bytes, unique), n_dims u32 (<= 4), `ne[n_dims]` u64 with
//!   `ne[0]` the fastest-varying dimension, ggml type u32 (F32 = 0), offset u64 relative to
//!   the data section; offsets must be contiguous, each tensor padded to the alignment;
//! * data section starts at the header size padded to `general.alignment` (u32, power of two,
//!   default 32);
//! * adapters: `general.type = "adapter"`, `general.architecture` must equal the model's,
//!   `adapter.type = "lora"`, `adapter.lora.alpha` f32 (read with `gguf_get_val_f32`, which
//!   aborts on any other type); tensors `<base>.lora_a` / `<base>.lora_b` with
//!   `a.ne[0] == w.ne[0]` (in), `b.ne[1] == w.ne[1]` (out), `a.ne[1] == b.ne[0]` (rank).
//!   llama.cpp scales the product by `alpha / rank`.
//!
//! Hand-written rather than using a GGUF crate: we need only ~300 lines, exact control of the
//! bytes llama.cpp accepts, and a reader that returns typed errors on hostile input.
//!
//! Types and errors here; `read` parses, `write` serialises F32 tensors, `adapter` builds and
//! reads LoRA adapters (tensors plus the `fwdllm.head.*` metadata).

mod adapter;
mod merge;
mod read;
mod write;

use std::path::PathBuf;

use crate::lora::ModelShape;

/// `"GGUF"`.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// The GGUF version written and the highest one read.
pub const GGUF_VERSION: u32 = 3;
/// Alignment used when `general.alignment` is absent.
pub const GGUF_DEFAULT_ALIGNMENT: u64 = 32;
/// ggml type id of f32 tensors.
pub const GGML_TYPE_F32: u32 = 0;
/// llama.cpp's `GGML_MAX_NAME`: tensor names must be shorter than this.
pub const GGML_MAX_NAME: usize = 64;

/// GGUF value type ids.
mod ty {
    pub(super) const U8: u32 = 0;
    pub(super) const I8: u32 = 1;
    pub(super) const U16: u32 = 2;
    pub(super) const I16: u32 = 3;
    pub(super) const U32: u32 = 4;
    pub(super) const I32: u32 = 5;
    pub(super) const F32: u32 = 6;
    pub(super) const BOOL: u32 = 7;
    pub(super) const STRING: u32 = 8;
    pub(super) const ARRAY: u32 = 9;
    pub(super) const U64: u32 = 10;
    pub(super) const I64: u32 = 11;
    pub(super) const F64: u32 = 12;
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    /// Homogeneous array; `elem_type` is the GGUF type id of the elements.
    Array {
        elem_type: u32,
        values: Vec<GgufValue>,
    },
    U64(u64),
    I64(i64),
    F64(f64),
}

impl GgufValue {
    /// GGUF type id of this value.
    pub fn type_id(&self) -> u32 {
        match self {
            GgufValue::U8(_) => ty::U8,
            GgufValue::I8(_) => ty::I8,
            GgufValue::U16(_) => ty::U16,
            GgufValue::I16(_) => ty::I16,
            GgufValue::U32(_) => ty::U32,
            GgufValue::I32(_) => ty::I32,
            GgufValue::F32(_) => ty::F32,
            GgufValue::Bool(_) => ty::BOOL,
            GgufValue::String(_) => ty::STRING,
            GgufValue::Array { .. } => ty::ARRAY,
            GgufValue::U64(_) => ty::U64,
            GgufValue::I64(_) => ty::I64,
            GgufValue::F64(_) => ty::F64,
        }
    }

    fn type_name(&self) -> &'static str {
        match self {
            GgufValue::U8(_) => "u8",
            GgufValue::I8(_) => "i8",
            GgufValue::U16(_) => "u16",
            GgufValue::I16(_) => "i16",
            GgufValue::U32(_) => "u32",
            GgufValue::I32(_) => "i32",
            GgufValue::F32(_) => "f32",
            GgufValue::Bool(_) => "bool",
            GgufValue::String(_) => "string",
            GgufValue::Array { .. } => "array",
            GgufValue::U64(_) => "u64",
            GgufValue::I64(_) => "i64",
            GgufValue::F64(_) => "f64",
        }
    }

    /// The value as a u64 if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }
}

/// One tensor's header entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufTensorInfo {
    pub name: String,
    /// `ne[0..n_dims]`; `ne[0]` varies fastest.
    pub dims: Vec<u64>,
    /// ggml type id (0 = F32).
    pub ggml_type: u32,
    /// Offset of the tensor's data relative to the start of the data section.
    pub offset: u64,
}

impl GgufTensorInfo {
    pub fn n_elements(&self) -> Option<u64> {
        self.dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
    }

    /// Size of the data in bytes, if the ggml type is one this reader knows.
    pub fn n_bytes(&self) -> Option<u64> {
        let (block, size) = ggml_type_block(self.ggml_type)?;
        let n = self.n_elements()?;
        if self.dims.first().copied().unwrap_or(1) % block != 0 {
            return None;
        }
        (n / block).checked_mul(size)
    }
}

/// `(block size, bytes per block)` of common ggml types (from ggml.c `type_traits`).
fn ggml_type_block(t: u32) -> Option<(u64, u64)> {
    Some(match t {
        0 => (1, 4),     // F32
        1 => (1, 2),     // F16
        2 => (32, 18),   // Q4_0
        3 => (32, 20),   // Q4_1
        6 => (32, 22),   // Q5_0
        7 => (32, 24),   // Q5_1
        8 => (32, 34),   // Q8_0
        9 => (32, 36),   // Q8_1
        10 => (256, 84), // Q2_K
        11 => (256, 110),
        12 => (256, 144),
        13 => (256, 176),
        14 => (256, 210),
        15 => (256, 292),
        24 => (1, 1), // I8
        25 => (1, 2), // I16
        26 => (1, 4), // I32
        27 => (1, 8), // I64
        28 => (1, 8), // F64
        30 => (1, 2), // BF16
        _ => return None,
    })
}

/// A parsed GGUF file (or only its header, see [`read_gguf_header`]).
#[derive(Debug, Clone, PartialEq)]
pub struct GgufFile {
    pub version: u32,
    /// Metadata in file order.
    pub kv: Vec<(String, GgufValue)>,
    pub tensors: Vec<GgufTensorInfo>,
    pub alignment: u64,
    /// Absolute offset of the data section in the file.
    pub data_offset: u64,
    /// The data section (empty when only the header was read).
    pub data: Vec<u8>,
}

impl GgufFile {
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.kv.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn tensor(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Bytes of tensor `name` (requires the data section and a known ggml type).
    pub fn tensor_data(&self, name: &str) -> Option<&[u8]> {
        let t = self.tensor(name)?;
        let start = usize::try_from(t.offset).ok()?;
        let len = usize::try_from(t.n_bytes()?).ok()?;
        self.data.get(start..start.checked_add(len)?)
    }

    /// F32 tensor `name` decoded from little-endian bytes.
    pub fn tensor_f32(&self, name: &str) -> Option<Vec<f32>> {
        if self.tensor(name)?.ggml_type != GGML_TYPE_F32 {
            return None;
        }
        let bytes = self.tensor_data(name)?;
        Some(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        )
    }

    fn required(&self, key: &str) -> Result<&GgufValue, GgufError> {
        self.get(key)
            .ok_or_else(|| GgufError::MissingKey(key.to_string()))
    }

    fn required_u32(&self, key: &str) -> Result<u32, GgufError> {
        let v = self.required(key)?;
        v.as_u64()
            .and_then(|x| u32::try_from(x).ok())
            .ok_or_else(|| GgufError::WrongType {
                key: key.to_string(),
                expected: "unsigned integer fitting u32",
                found: v.type_name(),
            })
    }

    /// The llama-family [`ModelShape`] from `{arch}.block_count`, `{arch}.embedding_length`,
    /// `{arch}.attention.head_count`, `{arch}.attention.head_count_kv` (defaults to
    /// head_count, as in llama.cpp) and `{arch}.feed_forward_length`.
    pub fn model_shape(&self) -> Result<ModelShape, GgufError> {
        let key = "general.architecture";
        let arch_v = self.required(key)?;
        let arch = arch_v
            .as_str()
            .ok_or_else(|| GgufError::WrongType {
                key: key.to_string(),
                expected: "string",
                found: arch_v.type_name(),
            })?
            .to_string();
        let n_head = self.required_u32(&format!("{arch}.attention.head_count"))?;
        let kv_key = format!("{arch}.attention.head_count_kv");
        let n_head_kv = if self.get(&kv_key).is_some() {
            self.required_u32(&kv_key)?
        } else {
            n_head
        };
        Ok(ModelShape {
            n_layer: self.required_u32(&format!("{arch}.block_count"))?,
            n_embd: self.required_u32(&format!("{arch}.embedding_length"))?,
            n_head,
            n_head_kv,
            n_ff: self.required_u32(&format!("{arch}.feed_forward_length"))?,
            arch,
        })
    }
}

/// Malformed, truncated or unexpected GGUF input.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot read GGUF file {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("I/O error while reading GGUF {what} at byte {offset}: {source}")]
    Io {
        what: &'static str,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "GGUF input ends inside the {what} at byte {offset}; the file is truncated or not GGUF"
    )]
    Truncated { what: &'static str, offset: u64 },
    #[error("not a GGUF file: magic is {0:02x?}, expected \"GGUF\"")]
    BadMagic([u8; 4]),
    #[error("GGUF version {0} is not supported (only 2 and 3); re-convert the file with a current llama.cpp")]
    UnsupportedVersion(u32),
    #[error("GGUF {what} is {value}, above the limit {max}; the file is corrupt")]
    LimitExceeded {
        what: &'static str,
        value: u64,
        max: u64,
    },
    #[error("GGUF {what} at byte {offset} is not valid UTF-8")]
    InvalidUtf8 { what: &'static str, offset: u64 },
    #[error("unknown GGUF value type {type_id} at byte {offset}")]
    UnknownValueType { type_id: u32, offset: u64 },
    #[error("GGUF bool at byte {offset} is {value}, expected 0 or 1")]
    InvalidBool { value: u8, offset: u64 },
    #[error("nested GGUF arrays are not supported (at byte {offset})")]
    NestedArray { offset: u64 },
    #[error("duplicate GGUF key `{0}`")]
    DuplicateKey(String),
    #[error("duplicate GGUF tensor `{0}`")]
    DuplicateTensor(String),
    #[error("general.alignment must be a u32 power of two, got {0}")]
    BadAlignment(String),
    #[error("GGUF tensor `{name}`: {reason}")]
    BadTensor { name: String, reason: String },
    #[error("GGUF metadata key `{0}` is missing; is this a llama-family model file?")]
    MissingKey(String),
    #[error(
        "GGUF metadata key `{key}` {problem}; the adapter is corrupt or was not written by fwdllm"
    )]
    BadMetadata { key: String, problem: String },
    #[error("GGUF metadata key `{key}` has type {found}, expected {expected}")]
    WrongType {
        key: String,
        expected: &'static str,
        found: &'static str,
    },
}

pub use adapter::{
    adapter_kv, read_adapter_head, read_adapter_norms, write_lora_adapter,
    write_lora_adapter_params, write_lora_adapter_params_from_layer, AdapterHead, AdapterNorm,
    NORMS_DELTA_KEY, NORMS_NAMES_KEY,
};
pub use merge::{merge_adapter_norms, merge_norms};
pub use read::{model_shape_from_gguf, read_gguf, read_gguf_header};
pub use write::{f32_gguf_header, gguf_header, pad_len, write_gguf_f32, F32Tensor, TensorInfo};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::{LoraConfig, LoraError, LoraLayout, LoraModule, LoraWeights, Trainable};
    use crate::update::{apply_commit, SeedCoeff};

    fn adapter_weights() -> LoraWeights {
        let shape = ModelShape {
            arch: "llama".into(),
            n_layer: 3,
            n_embd: 12,
            n_head: 4,
            n_head_kv: 2,
            n_ff: 20,
        };
        let config = LoraConfig {
            rank: 3,
            alpha: 6.0,
            modules: vec![LoraModule::AttnV, LoraModule::FfnDown, LoraModule::AttnQ],
            layers: Some((1, 3)),
            trainable: Trainable::AB,
            init_seed: 5,
            ..LoraConfig::default()
        };
        let mut w = LoraWeights::init(LoraLayout::new(&shape, &config).unwrap());
        apply_commit(
            &mut w,
            &[SeedCoeff {
                seed: 8,
                coeff: 0.01,
            }],
        );
        w
    }

    /// A layout of norm gains and one LoRA tensor on layers 1..3 of a 3-layer, n_embd-8 model.
    fn norm_weights() -> LoraWeights {
        let shape = crate::fixtures::small_llama(3, 8, 2, 1);
        let config = LoraConfig {
            modules: vec![LoraModule::FfnNorm, LoraModule::AttnV, LoraModule::AttnNorm],
            layers: Some((1, 3)),
            ..LoraConfig::default()
        };
        let mut w = LoraWeights::init(LoraLayout::new(&shape, &config).unwrap());
        apply_commit(
            &mut w,
            &[SeedCoeff {
                seed: 3,
                coeff: 0.5,
            }],
        );
        w
    }

    #[test]
    fn norm_deltas_round_trip_through_adapter_metadata_and_are_not_tensors() {
        let w = norm_weights();
        let f = read_gguf(&write_lora_adapter(&w)).unwrap();
        let norms = read_adapter_norms(&f, 8).unwrap();
        let names: Vec<&str> = norms.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "blk.1.ffn_norm.weight",
                "blk.1.attn_norm.weight",
                "blk.2.ffn_norm.weight",
                "blk.2.attn_norm.weight"
            ]
        );
        for (n, t) in norms.iter().zip(w.layout().norms()) {
            assert_eq!(n.layer, t.layer);
            assert_eq!(n.delta, w.params()[t.delta.clone()]);
            assert!(
                n.delta.iter().any(|&d| d != 0.0),
                "the commit moved every value"
            );
        }
        // Stock llama.cpp sees the LoRA pair only.
        assert_eq!(f.tensors.len(), 4);
        assert!(f.tensors.iter().all(|t| t.name.contains("attn_v")));
        // The wrong width names the key; an adapter without norms has none.
        let err = read_adapter_norms(&f, 9).unwrap_err();
        assert!(err.to_string().contains(NORMS_DELTA_KEY), "{err}");
        let plain = read_gguf(&write_lora_adapter(&adapter_weights())).unwrap();
        assert!(read_adapter_norms(&plain, 12).unwrap().is_empty());
    }

    #[test]
    fn a_header_of_mixed_types_places_each_tensor_at_its_aligned_offset() {
        // A Q8_0 row of 64 values is 2 blocks of 34 bytes: 68 bytes, padded to 96 at 32.
        let kv = vec![("general.alignment".to_string(), GgufValue::U32(32))];
        let (hdr, alignment) = gguf_header(
            &kv,
            &[
                TensorInfo {
                    name: "q",
                    dims: &[64, 1],
                    ggml_type: 8,
                    n_bytes: 68,
                },
                TensorInfo {
                    name: "f",
                    dims: &[3],
                    ggml_type: GGML_TYPE_F32,
                    n_bytes: 12,
                },
            ],
        );
        assert_eq!(alignment, 32);
        assert_eq!(hdr.len() % 32, 0);
        let f = read_gguf_header(&hdr[..]).unwrap();
        let q = f.tensor("q").unwrap();
        let t = f.tensor("f").unwrap();
        assert_eq!((q.ggml_type, q.offset), (8, 0));
        assert_eq!(
            (t.ggml_type, t.offset, t.dims.as_slice()),
            (0, 96, &[3u64][..])
        );
        assert_eq!(f.data_offset, hdr.len() as u64);
        // The F32 wrapper is the same header for F32 tensors.
        let (a, _) = f32_gguf_header(&kv, &[("f", &[3])]);
        let (b, _) = gguf_header(
            &kv,
            &[TensorInfo {
                name: "f",
                dims: &[3],
                ggml_type: GGML_TYPE_F32,
                n_bytes: 12,
            }],
        );
        assert_eq!(a, b);
    }

    #[test]
    fn a_checkpoint_of_norm_gains_crosses_the_wire_bit_for_bit() {
        let w = norm_weights();
        let c = crate::wire::Checkpoint::from_weights(3, &w);
        let back: crate::wire::Checkpoint = crate::wire::decode(&crate::wire::encode(&c)).unwrap();
        let w2 = back.to_weights().unwrap();
        assert_eq!(w2.layout().norms(), w.layout().norms());
        assert_eq!(w2.hash(), w.hash());
    }

    #[test]
    fn merge_norms_rewrites_exactly_the_gains_and_refuses_what_it_cannot_merge() {
        let dir = std::env::temp_dir().join(format!("fwdllm-merge-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let base: Vec<f32> = (0..8).map(|i| 0.1 * (i as f32 + 1.0)).collect();
        let other: Vec<f32> = (0..16).map(|i| i as f32).collect();
        let dims8 = [8u64];
        let dims16 = [8u64, 2];
        let model = dir.join("model.gguf");
        let tensors = [
            F32Tensor {
                name: "blk.0.attn_norm.weight",
                dims: &dims8,
                data: &base,
            },
            F32Tensor {
                name: "blk.0.attn_q.weight",
                dims: &dims16,
                data: &other,
            },
        ];
        let kv = [(
            "general.architecture".to_string(),
            GgufValue::String("llama".into()),
        )];
        std::fs::write(&model, write_gguf_f32(&kv, &tensors)).unwrap();
        let delta: Vec<f32> = (0..8).map(|i| 0.25 - 0.05 * i as f32).collect();
        let norms = [AdapterNorm {
            name: "blk.0.attn_norm.weight".into(),
            layer: 0,
            delta: delta.clone(),
        }];
        let out = dir.join("merged.gguf");
        merge_norms(&model, &norms, &out).unwrap();
        let (a, b) = (std::fs::read(&model).unwrap(), std::fs::read(&out).unwrap());
        let f = read_gguf(&b).unwrap();
        let at = (f.data_offset + f.tensor("blk.0.attn_norm.weight").unwrap().offset) as usize;
        let mut want = Vec::new();
        crate::lora::norm_gains(&base, &delta, &mut want);
        let got: Vec<f32> = b[at..at + 32]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(got, want);
        assert_ne!(got, base);
        // Every byte outside the gain is the model's.
        assert_eq!(a.len(), b.len());
        assert_eq!(a[..at], b[..at]);
        assert_eq!(a[at + 32..], b[at + 32..]);
        // A norm the model lacks is an error naming it, and leaves no file behind.
        let missing = [AdapterNorm {
            name: "blk.5.ffn_norm.weight".into(),
            layer: 5,
            delta,
        }];
        let out2 = dir.join("missing.gguf");
        let err = merge_norms(&model, &missing, &out2).unwrap_err();
        assert!(err.to_string().contains("blk.5.ffn_norm.weight"), "{err}");
        assert!(!out2.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn head_rows_round_trip_through_adapter_metadata() {
        let shape = crate::fixtures::small_llama(4, 8, 2, 1);
        let config = LoraConfig {
            layers: Some((2, 4)),
            head_rows: 3,
            head_alpha: 0.25,
            ..LoraConfig::default()
        };
        let mut w = LoraWeights::init(LoraLayout::new(&shape, &config).unwrap());
        apply_commit(
            &mut w,
            &[SeedCoeff {
                seed: 11,
                coeff: 0.5,
            }],
        );
        let bytes = write_lora_adapter(&w);
        let f = read_gguf(&bytes).unwrap();
        let head = read_adapter_head(&f, 8).unwrap().unwrap();
        let block = w.layout().head().unwrap();
        assert_eq!(head.rows, 3);
        assert_eq!(head.alpha, 0.25);
        assert_eq!(head.delta, w.params()[block.delta.clone()]);
        assert_eq!(head.bias, w.params()[block.bias.clone()]);
        // Only the LoRA tensors are tensors, so stock llama.cpp's loader sees a plain adapter.
        assert!(f
            .tensors
            .iter()
            .all(|t| t.name.ends_with(".lora_a") || t.name.ends_with(".lora_b")));
        // The wrong model width is an error naming the key, not a silent misread.
        let err = read_adapter_head(&f, 9).unwrap_err();
        assert!(err.to_string().contains("fwdllm.head.delta"), "{err}");
        // Adapters without head rows have none.
        assert_eq!(
            read_adapter_head(
                &read_gguf(&write_lora_adapter(&adapter_weights())).unwrap(),
                8
            )
            .unwrap(),
            None
        );
    }

    #[test]
    fn adapter_roundtrips_every_kv_shape_dtype_and_byte() {
        let w = adapter_weights();
        let bytes = write_lora_adapter(&w);
        let f = read_gguf(&bytes).unwrap();
        assert_eq!(f.version, 3);
        assert_eq!(f.alignment, 32);
        assert_eq!(f.data_offset % 32, 0);
        assert_eq!(f.kv, adapter_kv(&w));
        let s = |k: &str| f.get(k).and_then(GgufValue::as_str).map(str::to_string);
        assert_eq!(s("general.architecture").as_deref(), Some("llama"));
        assert_eq!(s("general.type").as_deref(), Some("adapter"));
        assert_eq!(s("adapter.type").as_deref(), Some("lora"));
        assert_eq!(f.get("adapter.lora.alpha"), Some(&GgufValue::F32(6.0)));
        assert_eq!(s("fwdllm.weights_hash"), Some(w.hash().to_string()));

        let layout = w.layout();
        assert_eq!(f.tensors.len(), 2 * layout.tensors().len());
        let mut expected_offset = 0u64;
        for (i, t) in layout.tensors().iter().enumerate() {
            for (j, (suffix, dims, range)) in [
                ("lora_a", [t.in_dim, t.rank], t.a.clone()),
                ("lora_b", [t.rank, t.out_dim], t.b.clone()),
            ]
            .into_iter()
            .enumerate()
            {
                let info = &f.tensors[2 * i + j];
                let name = format!("blk.{}.{}.weight.{suffix}", t.layer, t.module.gguf_name());
                assert_eq!(info.name, name);
                assert_eq!(info.dims, dims.map(u64::from));
                assert_eq!(info.ggml_type, GGML_TYPE_F32);
                assert_eq!(info.offset, expected_offset, "{name}: contiguous, padded");
                expected_offset += (range.len() as u64 * 4).div_ceil(32) * 32;
                let got = f.tensor_f32(&name).unwrap();
                let want = &w.params()[range];
                assert_eq!(
                    got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                    want.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
                );
            }
        }
        assert_eq!(f.data.len() as u64, expected_offset);
        assert_eq!(bytes.len() as u64, f.data_offset + expected_offset);
    }

    #[test]
    fn params_writer_matches_weights_writer_minus_hash_key() {
        let w = adapter_weights();
        let a = read_gguf(&write_lora_adapter(&w)).unwrap();
        let b = read_gguf(&write_lora_adapter_params(w.layout(), w.params()).unwrap()).unwrap();
        assert_eq!(a.kv[..a.kv.len() - 1], b.kv[..]);
        assert_eq!(a.kv.last().unwrap().0, "fwdllm.weights_hash");
        assert_eq!(
            a.tensors
                .iter()
                .map(|t| (&t.name, &t.dims))
                .collect::<Vec<_>>(),
            b.tensors
                .iter()
                .map(|t| (&t.name, &t.dims))
                .collect::<Vec<_>>()
        );
        for t in &a.tensors {
            assert_eq!(a.tensor_data(&t.name), b.tensor_data(&t.name));
        }
        assert!(matches!(
            write_lora_adapter_params(w.layout(), &w.params()[1..]),
            Err(LoraError::ParamLenMismatch { .. })
        ));
    }

    #[test]
    fn header_bytes_are_exactly_gguf_v3() {
        let w = adapter_weights();
        let bytes = write_lora_adapter(&w);
        assert_eq!(&bytes[..4], b"GGUF");
        assert_eq!(u32::from_le_bytes(bytes[4..8].try_into().unwrap()), 3);
        let n_tensors = u64::from_le_bytes(bytes[8..16].try_into().unwrap());
        let n_kv = u64::from_le_bytes(bytes[16..24].try_into().unwrap());
        assert_eq!((n_tensors, n_kv), (12, 7));
        // First key: u64 length, bytes, then value type u32 = 8 (string).
        assert_eq!(u64::from_le_bytes(bytes[24..32].try_into().unwrap()), 20);
        assert_eq!(&bytes[32..52], b"general.architecture");
        assert_eq!(u32::from_le_bytes(bytes[52..56].try_into().unwrap()), 8);
    }

    #[test]
    fn writer_handles_every_value_type() {
        let kv: Vec<(String, GgufValue)> = vec![
            ("a.u8".into(), GgufValue::U8(250)),
            ("a.i8".into(), GgufValue::I8(-3)),
            ("a.u16".into(), GgufValue::U16(65000)),
            ("a.i16".into(), GgufValue::I16(-30000)),
            ("a.u32".into(), GgufValue::U32(4_000_000_000)),
            ("a.i32".into(), GgufValue::I32(-2_000_000_000)),
            ("a.f32".into(), GgufValue::F32(-0.0)),
            ("a.bool".into(), GgufValue::Bool(true)),
            ("a.str".into(), GgufValue::String("héllo".into())),
            (
                "a.arr".into(),
                GgufValue::Array {
                    elem_type: 8,
                    values: vec![GgufValue::String("x".into()), GgufValue::String("".into())],
                },
            ),
            (
                "a.empty".into(),
                GgufValue::Array {
                    elem_type: 4,
                    values: vec![],
                },
            ),
            ("a.u64".into(), GgufValue::U64(u64::MAX)),
            ("a.i64".into(), GgufValue::I64(i64::MIN)),
            ("a.f64".into(), GgufValue::F64(1e300)),
        ];
        let data = [1.0f32, -2.0, 3.5];
        let t = F32Tensor {
            name: "t",
            dims: &[3, 1],
            data: &data,
        };
        let f = read_gguf(&write_gguf_f32(&kv, &[t])).unwrap();
        assert_eq!(f.kv, kv);
        assert_eq!(f.tensor_f32("t").unwrap(), data);
        // No tensors: no padding, empty data.
        let f = read_gguf(&write_gguf_f32(&kv, &[])).unwrap();
        assert!(f.tensors.is_empty() && f.data.is_empty());
    }

    #[test]
    fn every_truncation_is_a_typed_error() {
        let bytes = write_lora_adapter(&adapter_weights());
        for cut in 0..bytes.len() {
            match read_gguf(&bytes[..cut]) {
                Err(GgufError::Truncated { .. }) | Err(GgufError::BadTensor { .. }) => {}
                other => panic!("cut at {cut}: {:?}", other.map(|f| f.tensors.len())),
            }
        }
    }

    #[test]
    fn bad_headers_are_typed_errors() {
        let mut bytes = write_lora_adapter(&adapter_weights());
        let mut bad = bytes.clone();
        bad[0] = b'X';
        assert!(matches!(read_gguf(&bad), Err(GgufError::BadMagic(m)) if &m == b"XGUF"));
        bad = bytes.clone();
        bad[4] = 9;
        assert!(matches!(
            read_gguf(&bad),
            Err(GgufError::UnsupportedVersion(9))
        ));
        bad = bytes.clone();
        bad[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            read_gguf(&bad),
            Err(GgufError::LimitExceeded { .. })
        ));
        // Value type of the first kv -> unknown.
        bytes[52] = 99;
        assert!(matches!(
            read_gguf(&bytes),
            Err(GgufError::UnknownValueType { type_id: 99, .. })
        ));
    }

    #[test]
    fn model_shape_errors_name_the_key() {
        let kv = vec![
            (
                "general.architecture".to_string(),
                GgufValue::String("llama".into()),
            ),
            (
                "llama.block_count".to_string(),
                GgufValue::String("30".into()),
            ),
        ];
        let f = read_gguf(&write_gguf_f32(&kv, &[])).unwrap();
        let err = f.model_shape().unwrap_err();
        assert!(
            err.to_string().contains("llama.attention.head_count"),
            "{err}"
        );
        let kv = vec![
            (
                "general.architecture".to_string(),
                GgufValue::String("llama".into()),
            ),
            ("llama.attention.head_count".to_string(), GgufValue::U32(4)),
            (
                "llama.block_count".to_string(),
                GgufValue::String("30".into()),
            ),
        ];
        let err = read_gguf(&write_gguf_f32(&kv, &[]))
            .unwrap()
            .model_shape()
            .unwrap_err();
        assert!(matches!(err, GgufError::WrongType { ref key, .. } if key == "llama.block_count"));
        let err = model_shape_from_gguf("/nonexistent/model.gguf").unwrap_err();
        assert!(err.to_string().contains("/nonexistent/model.gguf"), "{err}");
    }
}
