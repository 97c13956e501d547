//! ggml row conversions with ggml's own kernels: the byte size of a row of any type, any type
//! to f32 (bit-identical to llama.cpp's F32 conversion) and f32 to a storage type. The tail
//! model is built from these (`engine::tail`).

use llama_cpp_sys_2 as sys;

/// ggml's type ids for the matrix types the tail model can store (`tail::TailMatrices`).
pub(super) const GGML_TYPE_BF16: u32 = sys::GGML_TYPE_BF16;
pub(super) const GGML_TYPE_Q8_0: u32 = sys::GGML_TYPE_Q8_0;

/// Bytes of one row of `n` values of ggml type `ggml_type`, or `None` for a type this ggml
/// build does not know or `n` not a whole number of its blocks.
pub(super) fn ggml_row_bytes(ggml_type: u32, n: usize) -> Option<usize> {
    if ggml_type >= sys::GGML_TYPE_COUNT {
        return None;
    }
    // SAFETY: type < GGML_TYPE_COUNT; pure table look-ups.
    let block = unsafe { sys::ggml_blck_size(ggml_type) };
    if block <= 0 || n as i64 % block != 0 {
        return None;
    }
    // SAFETY: as above, and n is a whole number of blocks (ggml_row_size asserts it).
    Some(unsafe { sys::ggml_row_size(ggml_type, n as i64) })
}

/// Converts one row of `out.len()` values of ggml type `ggml_type` (F32, F16, BF16 or any
/// quantised type) to f32 with ggml's own kernels, exactly as `llama_model_quantize` does when
/// it writes an all-F32 copy (`llama_tensor_dequantize_impl`), so a tensor converted here is
/// bit-identical to the same tensor in the prepared F32 model.
pub(super) fn dequantize_row(ggml_type: u32, src: &[u8], out: &mut [f32]) -> Result<(), String> {
    let n = out.len();
    let bytes = ggml_row_bytes(ggml_type, n)
        .ok_or_else(|| format!("ggml type {ggml_type} with {n} values per row is not supported"))?;
    if src.len() != bytes {
        return Err(format!(
            "row of {n} values of ggml type {ggml_type} needs {bytes} bytes, got {}",
            src.len()
        ));
    }
    match ggml_type {
        sys::GGML_TYPE_F32 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        // SAFETY (all three arms): src holds exactly the bytes of n values of that type (checked
        // above), out has n writable floats, and ggml's converters read/write exactly those.
        sys::GGML_TYPE_F16 => unsafe {
            sys::ggml_fp16_to_fp32_row(src.as_ptr().cast(), out.as_mut_ptr(), n as i64)
        },
        sys::GGML_TYPE_BF16 => unsafe {
            sys::ggml_bf16_to_fp32_row(src.as_ptr().cast(), out.as_mut_ptr(), n as i64)
        },
        t => {
            // SAFETY: t < GGML_TYPE_COUNT (ggml_row_bytes); the traits table is static.
            let traits = unsafe { &*sys::ggml_get_type_traits(t) };
            // SAFETY: pure query on a known type.
            let quantized = unsafe { sys::ggml_is_quantized(t) };
            let f = traits
                .to_float
                .filter(|_| quantized)
                .ok_or_else(|| format!("ggml type {t} has no conversion to f32"))?;
            // SAFETY: see the arm comment above.
            unsafe { f(src.as_ptr().cast(), out.as_mut_ptr(), n as i64) };
        }
    }
    Ok(())
}

/// Converts `src` (whole rows of `n_per_row` values) to ggml type `ggml_type` with ggml's own
/// reference quantiser (`ggml_quantize_chunk`, what `llama_model_quantize` runs), appending the
/// bytes to `out`. Types that need an importance matrix are refused.
pub(super) fn quantize_rows(
    ggml_type: u32,
    src: &[f32],
    n_per_row: usize,
    out: &mut Vec<u8>,
) -> Result<(), String> {
    if n_per_row == 0 || src.len() % n_per_row != 0 {
        return Err(format!(
            "{} values are not whole rows of {n_per_row}",
            src.len()
        ));
    }
    let row_bytes = ggml_row_bytes(ggml_type, n_per_row).ok_or_else(|| {
        format!("ggml type {ggml_type} with {n_per_row} values per row is not supported")
    })?;
    // SAFETY: ggml_type < GGML_TYPE_COUNT (ggml_row_bytes checked it); pure query.
    if unsafe { sys::ggml_quantize_requires_imatrix(ggml_type) } {
        return Err(format!("ggml type {ggml_type} needs an importance matrix"));
    }
    let rows = src.len() / n_per_row;
    let at = out.len();
    out.resize(at + rows * row_bytes, 0);
    // SAFETY: src holds rows × n_per_row floats, out has rows × row_bytes writable bytes from
    // `at`, the type is known and needs no importance matrix (checked above).
    let written = unsafe {
        sys::ggml_quantize_chunk(
            ggml_type,
            src.as_ptr(),
            out[at..].as_mut_ptr().cast(),
            0,
            rows as i64,
            n_per_row as i64,
            std::ptr::null(),
        )
    };
    if written != rows * row_bytes {
        return Err(format!(
            "ggml_quantize_chunk wrote {written} bytes, expected {}",
            rows * row_bytes
        ));
    }
    Ok(())
}
