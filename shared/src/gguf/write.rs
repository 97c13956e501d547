//! The GGUF writer: headers for tensors of any ggml type and whole files of F32 tensors, byte-exact to what llama.cpp's
//! `gguf_init_from_file` accepts.

use super::{GgufValue, GGML_TYPE_F32, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGUF_VERSION};

/// An f32 tensor to write: name, ggml `ne` (fastest-varying first) and data in that order.
#[derive(Debug, Clone, Copy)]
pub struct F32Tensor<'a> {
    pub name: &'a str,
    pub dims: &'a [u64],
    pub data: &'a [f32],
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &GgufValue) {
    match v {
        GgufValue::U8(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::Bool(x) => out.push(u8::from(*x)),
        GgufValue::String(s) => put_str(out, s),
        GgufValue::Array { elem_type, values } => {
            out.extend_from_slice(&elem_type.to_le_bytes());
            out.extend_from_slice(&(values.len() as u64).to_le_bytes());
            for e in values {
                put_value(out, e);
            }
        }
        GgufValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}

fn pad_to(out: &mut Vec<u8>, alignment: usize) {
    let padded = out.len().div_ceil(alignment) * alignment;
    out.resize(padded, 0);
}

/// The alignment `kv` asks for (`general.alignment` as a power-of-two u32), else 32.
fn kv_alignment(kv: &[(String, GgufValue)]) -> usize {
    kv.iter()
        .find_map(|(k, v)| match v {
            GgufValue::U32(a) if k == "general.alignment" && a.is_power_of_two() => {
                Some(*a as usize)
            }
            _ => None,
        })
        .unwrap_or(GGUF_DEFAULT_ALIGNMENT as usize)
}

/// One tensor of a header written by [`gguf_header`]: name, ggml `ne` (fastest-varying first),
/// ggml type, and the bytes of its data (for F32, 4 per value; for a block type, its rows'
/// `ggml_row_size`: the writer cannot know block sizes, so the caller states them).
#[derive(Debug, Clone, Copy)]
pub struct TensorInfo<'a> {
    pub name: &'a str,
    pub dims: &'a [u64],
    pub ggml_type: u32,
    pub n_bytes: u64,
}

/// The header of a GGUF v3 file whose tensors (of any ggml type) are stored back to back in
/// the given order, each padded to the alignment: magic, counts, `kv`, tensor infos, and the
/// padding up to the data section. Returns the header and the alignment; a writer then
/// appends each tensor's data followed by [`pad_len`] zero bytes.
pub fn gguf_header(kv: &[(String, GgufValue)], tensors: &[TensorInfo<'_>]) -> (Vec<u8>, usize) {
    let alignment = kv_alignment(kv);
    let mut out = Vec::with_capacity(4096);
    out.extend_from_slice(&GGUF_MAGIC);
    out.extend_from_slice(&GGUF_VERSION.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(kv.len() as u64).to_le_bytes());
    for (k, v) in kv {
        put_str(&mut out, k);
        out.extend_from_slice(&v.type_id().to_le_bytes());
        put_value(&mut out, v);
    }
    let mut offset = 0u64;
    for t in tensors {
        put_str(&mut out, t.name);
        out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in t.dims {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&t.ggml_type.to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        offset += t.n_bytes.div_ceil(alignment as u64) * alignment as u64;
    }
    if !tensors.is_empty() {
        pad_to(&mut out, alignment);
    }
    (out, alignment)
}

/// [`gguf_header`] for tensors that are all F32 (name, ggml `ne`).
pub fn f32_gguf_header(kv: &[(String, GgufValue)], tensors: &[(&str, &[u64])]) -> (Vec<u8>, usize) {
    let infos: Vec<TensorInfo<'_>> = tensors
        .iter()
        .map(|&(name, dims)| TensorInfo {
            name,
            dims,
            ggml_type: GGML_TYPE_F32,
            n_bytes: dims.iter().product::<u64>() * 4,
        })
        .collect();
    gguf_header(kv, &infos)
}

/// Zero bytes that follow `n_bytes` of tensor data to reach the alignment.
pub fn pad_len(n_bytes: usize, alignment: usize) -> usize {
    n_bytes.div_ceil(alignment) * alignment - n_bytes
}

/// Serialises a GGUF v3 file with the given metadata and F32 tensors, 32-byte alignment
/// (`general.alignment` is honoured if present in `kv` as a power-of-two u32).
///
/// # Panics
/// If a tensor's `data.len()` differs from the product of its `dims` (a caller bug).
pub fn write_gguf_f32(kv: &[(String, GgufValue)], tensors: &[F32Tensor<'_>]) -> Vec<u8> {
    for t in tensors {
        let n: u64 = t.dims.iter().product();
        assert_eq!(
            n,
            t.data.len() as u64,
            "tensor {} dims/data mismatch",
            t.name
        );
    }
    let infos: Vec<(&str, &[u64])> = tensors.iter().map(|t| (t.name, t.dims)).collect();
    let (mut out, alignment) = f32_gguf_header(kv, &infos);
    let data_bytes: usize = tensors
        .iter()
        .map(|t| (t.data.len() * 4).div_ceil(alignment) * alignment)
        .sum();
    out.reserve(data_bytes);
    for t in tensors {
        for v in t.data {
            out.extend_from_slice(&v.to_bits().to_le_bytes());
        }
        pad_to(&mut out, alignment);
    }
    out
}
