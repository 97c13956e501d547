//! One-time, cached, verified conversion of a (quantised) GGUF model to the training
//! precision. The converted copy lives in the cache directory next to a JSON stamp that records
//! the source's size and BLAKE3 hash and the copy's size and hash; a copy whose stamp does not
//! match is rebuilt, never trusted.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{llama, EngineError, Precision};

/// What a cached file was derived from (`identity`, compared as a whole) and what it is.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Stamp {
    identity: serde_json::Value,
    size: u64,
    blake3: String,
}

/// Size and BLAKE3 (hex) of a file.
pub(crate) fn hash_file(path: &Path) -> Result<(u64, String), EngineError> {
    let mut f = fs::File::open(path).map_err(|e| EngineError::io(path, e))?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf).map_err(|e| EngineError::io(path, e))?;
        if k == 0 {
            break;
        }
        n += k as u64;
        h.update(&buf[..k]);
    }
    Ok((n, h.finalize().to_hex().to_string()))
}

/// Returns `out` if its stamp records `identity` and the file still has the recorded size and
/// hash; otherwise runs `build` into a temporary file, then renames it and its new stamp into
/// place (so a crash leaves either the old verified pair or none). Used for the prepared F32
/// copy and for tail models.
pub(crate) fn cached_derivation(
    out: &Path,
    identity: serde_json::Value,
    build: impl FnOnce(&Path) -> Result<(), EngineError>,
) -> Result<PathBuf, EngineError> {
    let stamp_path = out.with_extension("gguf.stamp.json");
    if let Ok(text) = fs::read_to_string(&stamp_path) {
        if let Ok(stamp) = serde_json::from_str::<Stamp>(&text) {
            if stamp.identity == identity && out.is_file() {
                let (size, hash) = hash_file(out)?;
                if size == stamp.size && hash == stamp.blake3 {
                    log::debug!("using verified {}", out.display());
                    return Ok(out.to_path_buf());
                }
                log::warn!("{} does not match its stamp; rebuilding it", out.display());
            }
        }
    }
    if let Some(dir) = out.parent() {
        fs::create_dir_all(dir).map_err(|e| EngineError::io(dir, e))?;
    }
    // Unique per process and call: parallel tests may build the same file at once.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let unique = format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let tmp = out.with_extension(format!("tmp{unique}"));
    if let Err(e) = build(&tmp) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    let (size, blake3) = hash_file(&tmp)?;
    fs::rename(&tmp, out).map_err(|e| EngineError::io(out, e))?;
    let stamp = Stamp {
        identity,
        size,
        blake3,
    };
    let stamp_tmp = stamp_path.with_extension(format!("tmp{unique}"));
    fs::write(
        &stamp_tmp,
        serde_json::to_vec_pretty(&stamp).expect("stamp serialises"),
    )
    .map_err(|e| EngineError::io(&stamp_tmp, e))?;
    fs::rename(&stamp_tmp, &stamp_path).map_err(|e| EngineError::io(&stamp_path, e))?;
    Ok(out.to_path_buf())
}

/// Path of the converted copy of `model` at `precision` inside `cache_dir`.
pub fn prepared_path(model: &Path, precision: Precision, cache_dir: &Path) -> PathBuf {
    let stem = model
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    cache_dir.join(format!("{stem}.{}.gguf", precision.as_str()))
}

/// Returns a verified copy of `model` at `precision`, converting it if needed.
/// `Precision::Quantized` returns `model` itself (after checking it exists).
pub fn prepare(
    model: &Path,
    precision: Precision,
    cache_dir: &Path,
    threads: u32,
) -> Result<PathBuf, EngineError> {
    if !model.is_file() {
        return Err(EngineError::ModelNotFound(model.to_path_buf()));
    }
    if precision == Precision::Quantized {
        return Ok(model.to_path_buf());
    }
    let out = prepared_path(model, precision, cache_dir);
    let (source_size, source_blake3) = hash_file(model)?;
    let identity = serde_json::json!({
        "source_size": source_size,
        "source_blake3": source_blake3,
        "precision": precision,
    });
    cached_derivation(&out, identity, |tmp| {
        log::info!(
            "converting {} to {} (one time) -> {}",
            model.display(),
            precision.as_str(),
            out.display()
        );
        llama::convert_model(model, tmp, precision, threads)
            .map_err(|e| EngineError::Llama(format!("converting {}: {e}", model.display())))
    })
}
