//! The GGUF reader: a position-tracking, panic-free parser with size caps on every count and
//! length, for whole files in memory and for headers streamed from disk.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use super::{
    ty, GgufError, GgufFile, GgufTensorInfo, GgufValue, GGML_MAX_NAME, GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC, GGUF_VERSION,
};
use crate::lora::ModelShape;

const MAX_STRING_LEN: u64 = 1 << 24;
const MAX_ARRAY_LEN: u64 = 1 << 22;
const MAX_KV: u64 = 1 << 16;
const MAX_TENSORS: u64 = 1 << 20;
const MAX_DIMS: u32 = 4;
const PREALLOC_CAP: usize = 4096;

/// Position-tracking reader that maps EOF to [`GgufError::Truncated`].
struct Reader<R> {
    inner: R,
    pos: u64,
}

impl<R: Read> Reader<R> {
    fn bytes<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], GgufError> {
        let mut buf = [0u8; N];
        self.exact(&mut buf, what)?;
        Ok(buf)
    }

    fn exact(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), GgufError> {
        match self.inner.read_exact(buf) {
            Ok(()) => {
                self.pos += buf.len() as u64;
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(GgufError::Truncated {
                what,
                offset: self.pos,
            }),
            Err(source) => Err(GgufError::Io {
                what,
                offset: self.pos,
                source,
            }),
        }
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.bytes(what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.bytes(what)?))
    }

    fn string(&mut self, what: &'static str) -> Result<String, GgufError> {
        let len = self.u64(what)?;
        if len > MAX_STRING_LEN {
            return Err(GgufError::LimitExceeded {
                what,
                value: len,
                max: MAX_STRING_LEN,
            });
        }
        let offset = self.pos;
        let mut buf = Vec::with_capacity((len as usize).min(PREALLOC_CAP));
        let got = (&mut self.inner)
            .take(len)
            .read_to_end(&mut buf)
            .map_err(|source| GgufError::Io {
                what,
                offset,
                source,
            })?;
        self.pos += got as u64;
        if got as u64 != len {
            return Err(GgufError::Truncated {
                what,
                offset: self.pos,
            });
        }
        String::from_utf8(buf).map_err(|_| GgufError::InvalidUtf8 { what, offset })
    }

    fn value(&mut self, type_id: u32, in_array: bool) -> Result<GgufValue, GgufError> {
        const W: &str = "metadata value";
        let offset = self.pos;
        Ok(match type_id {
            ty::U8 => GgufValue::U8(u8::from_le_bytes(self.bytes(W)?)),
            ty::I8 => GgufValue::I8(i8::from_le_bytes(self.bytes(W)?)),
            ty::U16 => GgufValue::U16(u16::from_le_bytes(self.bytes(W)?)),
            ty::I16 => GgufValue::I16(i16::from_le_bytes(self.bytes(W)?)),
            ty::U32 => GgufValue::U32(u32::from_le_bytes(self.bytes(W)?)),
            ty::I32 => GgufValue::I32(i32::from_le_bytes(self.bytes(W)?)),
            ty::F32 => GgufValue::F32(f32::from_le_bytes(self.bytes(W)?)),
            ty::U64 => GgufValue::U64(u64::from_le_bytes(self.bytes(W)?)),
            ty::I64 => GgufValue::I64(i64::from_le_bytes(self.bytes(W)?)),
            ty::F64 => GgufValue::F64(f64::from_le_bytes(self.bytes(W)?)),
            ty::BOOL => match self.bytes::<1>(W)?[0] {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                value => return Err(GgufError::InvalidBool { value, offset }),
            },
            ty::STRING => GgufValue::String(self.string("metadata string")?),
            ty::ARRAY => {
                if in_array {
                    return Err(GgufError::NestedArray { offset });
                }
                let elem_type = self.u32("array element type")?;
                if elem_type > ty::F64 {
                    return Err(GgufError::UnknownValueType {
                        type_id: elem_type,
                        offset,
                    });
                }
                if elem_type == ty::ARRAY {
                    return Err(GgufError::NestedArray { offset });
                }
                let n = self.u64("array length")?;
                if n > MAX_ARRAY_LEN {
                    return Err(GgufError::LimitExceeded {
                        what: "array length",
                        value: n,
                        max: MAX_ARRAY_LEN,
                    });
                }
                let mut values = Vec::with_capacity((n as usize).min(PREALLOC_CAP));
                for _ in 0..n {
                    values.push(self.value(elem_type, true)?);
                }
                GgufValue::Array { elem_type, values }
            }
            type_id => return Err(GgufError::UnknownValueType { type_id, offset }),
        })
    }
}

/// Parses the header (kv + tensor infos) from `reader`, leaving the data section unread
/// (`data` is empty). Reads exactly up to the end of the tensor infos.
pub fn read_gguf_header<R: Read>(reader: R) -> Result<GgufFile, GgufError> {
    let mut r = Reader {
        inner: reader,
        pos: 0,
    };
    let magic = r.bytes::<4>("magic")?;
    if magic != GGUF_MAGIC {
        return Err(GgufError::BadMagic(magic));
    }
    let version = r.u32("version")?;
    if !(2..=GGUF_VERSION).contains(&version) {
        return Err(GgufError::UnsupportedVersion(version));
    }
    let n_tensors = r.u64("tensor count")?;
    if n_tensors > MAX_TENSORS {
        return Err(GgufError::LimitExceeded {
            what: "tensor count",
            value: n_tensors,
            max: MAX_TENSORS,
        });
    }
    let n_kv = r.u64("kv count")?;
    if n_kv > MAX_KV {
        return Err(GgufError::LimitExceeded {
            what: "kv count",
            value: n_kv,
            max: MAX_KV,
        });
    }
    let mut kv: Vec<(String, GgufValue)> = Vec::with_capacity((n_kv as usize).min(PREALLOC_CAP));
    let mut keys = std::collections::HashSet::new();
    for _ in 0..n_kv {
        let key = r.string("metadata key")?;
        let type_id = r.u32("metadata value type")?;
        let value = r.value(type_id, false)?;
        if !keys.insert(key.clone()) {
            return Err(GgufError::DuplicateKey(key));
        }
        kv.push((key, value));
    }
    let alignment = match kv.iter().find(|(k, _)| k == "general.alignment") {
        None => GGUF_DEFAULT_ALIGNMENT,
        Some((_, GgufValue::U32(a))) if a.is_power_of_two() => u64::from(*a),
        Some((_, v)) => return Err(GgufError::BadAlignment(format!("{v:?}"))),
    };
    let mut tensors: Vec<GgufTensorInfo> =
        Vec::with_capacity((n_tensors as usize).min(PREALLOC_CAP));
    let mut names = std::collections::HashSet::new();
    for _ in 0..n_tensors {
        let name = r.string("tensor name")?;
        let bad = |name: &str, reason: String| GgufError::BadTensor {
            name: name.to_string(),
            reason,
        };
        if name.len() >= GGML_MAX_NAME {
            return Err(bad(
                &name,
                format!(
                    "name is {} bytes, llama.cpp allows < {GGML_MAX_NAME}",
                    name.len()
                ),
            ));
        }
        let n_dims = r.u32("tensor dimension count")?;
        if n_dims > MAX_DIMS {
            return Err(bad(
                &name,
                format!("{n_dims} dimensions, at most {MAX_DIMS}"),
            ));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(r.u64("tensor dimension")?);
        }
        let ggml_type = r.u32("tensor type")?;
        let offset = r.u64("tensor offset")?;
        let info = GgufTensorInfo {
            name,
            dims,
            ggml_type,
            offset,
        };
        if info.dims.iter().any(|&d| d > i64::MAX as u64) || info.n_elements().is_none() {
            return Err(bad(&info.name, format!("shape {:?} overflows", info.dims)));
        }
        if offset % alignment != 0 {
            return Err(bad(
                &info.name,
                format!("offset {offset} is not a multiple of the alignment {alignment}"),
            ));
        }
        if !names.insert(info.name.clone()) {
            return Err(GgufError::DuplicateTensor(info.name));
        }
        tensors.push(info);
    }
    let data_offset = if n_tensors > 0 {
        r.pos.div_ceil(alignment) * alignment
    } else {
        r.pos
    };
    Ok(GgufFile {
        version,
        kv,
        tensors,
        alignment,
        data_offset,
        data: Vec::new(),
    })
}

/// Parses a complete GGUF file held in memory. Checks that every tensor of a known ggml type
/// lies inside the data section. Never panics on any input.
pub fn read_gguf(bytes: &[u8]) -> Result<GgufFile, GgufError> {
    let mut file = read_gguf_header(bytes)?;
    let start = usize::try_from(file.data_offset)
        .ok()
        .filter(|&s| s <= bytes.len())
        .ok_or(GgufError::Truncated {
            what: "padding before the data section",
            offset: bytes.len() as u64,
        })?;
    let data_len = (bytes.len() - start) as u64;
    for t in &file.tensors {
        if let Some(n) = t.n_bytes() {
            // Padded size, as gguf.cpp requires when it loads the data blob.
            let padded = n.div_ceil(file.alignment).checked_mul(file.alignment);
            let end = padded.and_then(|p| t.offset.checked_add(p));
            if end.is_none_or(|end| end > data_len) {
                return Err(GgufError::BadTensor {
                    name: t.name.clone(),
                    reason: format!(
                        "data [{}, +{n}) lies outside the {data_len}-byte data section (truncated file?)",
                        t.offset
                    ),
                });
            }
        }
    }
    file.data = bytes[start..].to_vec();
    Ok(file)
}

/// Reads a model's [`ModelShape`] from the header of the GGUF file at `path` (reads the
/// metadata and tensor infos only, never the tensor data).
pub fn model_shape_from_gguf(path: impl AsRef<Path>) -> Result<ModelShape, GgufError> {
    let path = path.as_ref();
    let file = File::open(path).map_err(|source| GgufError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    read_gguf_header(BufReader::with_capacity(1 << 16, file))?.model_shape()
}
