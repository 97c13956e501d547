//! Property tests: layout invariants, update math guarantees, perturbation chunking and
//! GGUF reader robustness.

use fwdllm_shared::gguf::{read_gguf, write_lora_adapter};
use fwdllm_shared::lora::{
    LoraConfig, LoraLayout, LoraModule, LoraWeights, ModelShape, Trainable, WeightsHash,
};
use fwdllm_shared::perturb::{direction, direction_at};
use fwdllm_shared::update::{add_direction, apply_commit, perturbed_params, SeedCoeff};
use proptest::prelude::*;

fn shape_strategy() -> impl Strategy<Value = ModelShape> {
    (1u32..5, 1u32..5, 1u32..5, 1u32..5, 1u32..40).prop_map(
        |(n_layer, head_dim, n_head, kv_div, n_ff)| {
            let n_head_kv = (n_head / kv_div).max(1);
            ModelShape {
                arch: "llama".into(),
                n_layer,
                n_embd: head_dim * n_head,
                n_head,
                n_head_kv,
                n_ff,
            }
        },
    )
}

fn layout_strategy() -> impl Strategy<Value = LoraLayout> {
    (
        shape_strategy(),
        Just(LoraModule::ALL.to_vec()).prop_shuffle(),
        1usize..=7,
        1u32..4,
        any::<bool>(),
        any::<u64>(),
        any::<(u32, u32)>(),
    )
        .prop_filter_map(
            "rank too large",
            |(shape, modules, n_mod, rank, ab, seed, (s, e))| {
                let start = s % shape.n_layer;
                let end = start + 1 + e % (shape.n_layer - start);
                let config = LoraConfig {
                    rank,
                    alpha: 1.5,
                    modules: modules[..n_mod].to_vec(),
                    layers: Some((start, end)),
                    trainable: if ab { Trainable::AB } else { Trainable::B },
                    init_seed: seed,
                    ..LoraConfig::default()
                };
                LoraLayout::new(&shape, &config).ok()
            },
        )
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn layout_tiles_params_and_trainable_ranges_are_consistent(layout in layout_strategy()) {
        let c = layout.config();
        let (start, end) = c.layers.unwrap();
        prop_assert_eq!(layout.tensors().len(), (end - start) as usize * c.modules.len());
        let mut off = 0;
        for t in layout.tensors() {
            prop_assert_eq!((t.in_dim, t.out_dim), layout.shape().module_dims(t.module));
            prop_assert_eq!(t.a.start, off);
            prop_assert_eq!(t.a.len(), (t.rank * t.in_dim) as usize);
            prop_assert_eq!(t.b.start, t.a.end);
            prop_assert_eq!(t.b.len(), (t.out_dim * t.rank) as usize);
            off = t.b.end;
        }
        prop_assert_eq!(off, layout.total_len());

        let ranges = layout.trainable_ranges();
        for w in ranges.windows(2) {
            prop_assert!(w[0].end < w[1].start, "sorted, disjoint and merged: {:?}", w);
        }
        let sum: usize = ranges.iter().map(|r| r.len()).sum();
        prop_assert_eq!(sum, layout.trainable_len());
        let expected: usize = match c.trainable {
            Trainable::AB => layout.total_len(),
            Trainable::B => layout.tensors().iter().map(|t| t.b.len()).sum(),
        };
        prop_assert_eq!(layout.trainable_len(), expected);
        if c.trainable == Trainable::B {
            for t in layout.tensors() {
                prop_assert!(ranges.iter().any(|r| r.start <= t.b.start && t.b.end <= r.end));
                prop_assert!(ranges.iter().all(|r| r.end <= t.a.start || t.a.end <= r.start));
            }
        }
    }

    #[test]
    fn direction_chunks_agree_with_full_direction(seed: u64, start in 0usize..500, len in 0usize..300) {
        let mut full = vec![0f32; start + len];
        direction(seed, &mut full);
        let mut part = vec![0f32; len];
        direction_at(seed, start as u64, &mut part);
        prop_assert_eq!(bits(&part), bits(&full[start..]));
    }

    #[test]
    fn perturbed_params_is_add_direction_on_a_copy(layout in layout_strategy(), seed: u64, eps in -1.0f32..1.0) {
        let mut w = LoraWeights::init(layout);
        apply_commit(&mut w, &[SeedCoeff { seed: seed ^ 1, coeff: 0.01 }]);
        let mut scratch = vec![7.0; 3];
        perturbed_params(&w, seed, eps, &mut scratch);
        let mut copy = w.clone();
        add_direction(&mut copy, seed, eps);
        prop_assert_eq!(bits(&scratch), bits(copy.params()));
    }

    /// Exact undo is guaranteed only when every sum is representable: params and coefficients
    /// on a dyadic grid (k / 1024, |k| < 2^12) never round, so (s, c), (s, -c) restores the bits.
    #[test]
    fn opposite_steps_restore_exact_bits_on_a_dyadic_grid(
        layout in layout_strategy(),
        seed: u64,
        ks in proptest::collection::vec(-4095i32..4096, 1..64),
        m in -4095i32..4096,
    ) {
        let n = layout.total_len();
        let params: Vec<f32> = (0..n).map(|i| ks[i % ks.len()] as f32 / 1024.0).collect();
        let mut w = LoraWeights::from_params(layout, params.clone()).unwrap();
        let c = m as f32 / 1024.0;
        apply_commit(&mut w, &[SeedCoeff { seed, coeff: c }, SeedCoeff { seed, coeff: -c }]);
        prop_assert_eq!(bits(w.params()), bits(&params));
    }

    /// In general f32 arithmetic the undo is only approximate: each element is off by at
    /// most two roundings of the intermediate sum.
    #[test]
    fn opposite_steps_restore_within_rounding(
        layout in layout_strategy(),
        seed: u64,
        c in -10.0f32..10.0,
    ) {
        let w0 = LoraWeights::init(layout);
        let mut w = w0.clone();
        apply_commit(&mut w, &[SeedCoeff { seed, coeff: c }, SeedCoeff { seed, coeff: -c }]);
        for (x, x0) in w.params().iter().zip(w0.params()) {
            let bound = f32::EPSILON * (x0.abs() + c.abs()) * 2.0;
            prop_assert!((x - x0).abs() <= bound, "{} vs {} (c = {})", x, x0, c);
        }
    }

    #[test]
    fn apply_commit_equals_sequential_add_direction(
        layout in layout_strategy(),
        pairs in proptest::collection::vec((any::<u64>(), -1.0f32..1.0), 1..6),
    ) {
        let pairs: Vec<SeedCoeff> = pairs.into_iter().map(|(seed, coeff)| SeedCoeff { seed, coeff }).collect();
        let mut a = LoraWeights::init(layout.clone());
        let mut b = LoraWeights::init(layout);
        apply_commit(&mut a, &pairs);
        for p in &pairs {
            add_direction(&mut b, p.seed, p.coeff);
        }
        prop_assert_eq!(a.hash(), b.hash());
    }

    #[test]
    fn weights_hash_hex_roundtrip(bytes: [u8; 32]) {
        let h = WeightsHash(bytes);
        prop_assert_eq!(h.to_string().parse::<WeightsHash>().unwrap(), h);
    }

    #[test]
    fn read_gguf_never_panics_on_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = read_gguf(&bytes);
        let mut with_magic = b"GGUF\x03\0\0\0".to_vec();
        with_magic.extend_from_slice(&bytes);
        let _ = read_gguf(&with_magic);
    }

    #[test]
    fn read_gguf_never_panics_on_corrupted_adapters(
        layout in layout_strategy(),
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        cut: usize,
    ) {
        let mut bytes = write_lora_adapter(&LoraWeights::init(layout));
        for (pos, val) in edits {
            let n = bytes.len();
            bytes[pos % n] = val;
        }
        let keep = cut % (bytes.len() + 1);
        if let Ok(f) = read_gguf(&bytes[..keep]) {
            for t in &f.tensors {
                // Whatever parsed must be internally consistent.
                if let Some(d) = f.tensor_data(&t.name) {
                    prop_assert_eq!(Some(d.len() as u64), t.n_bytes());
                }
            }
        }
    }
}
