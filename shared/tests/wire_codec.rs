//! Wire codec: property round-trips for every message, and every malformed-input class
//! (truncated, oversized, trailing garbage, unknown version, wrong kind, garbage body)
//! rejected with its typed error.

use fwdllm_shared::lora::{
    LoraConfig, LoraError, LoraLayout, LoraModule, LoraWeights, ModelShape, WeightsHash,
};
use fwdllm_shared::update::SeedCoeff;
use fwdllm_shared::wire::*;
use proptest::prelude::*;

fn tiny_shape() -> ModelShape {
    ModelShape {
        arch: "llama".into(),
        n_layer: 2,
        n_embd: 16,
        n_head: 4,
        n_head_kv: 2,
        n_ff: 32,
    }
}

fn tiny_config() -> LoraConfig {
    LoraConfig {
        rank: 2,
        alpha: 4.0,
        modules: vec![LoraModule::AttnQ, LoraModule::AttnV],
        ..LoraConfig::default()
    }
}

fn arb_hash() -> impl Strategy<Value = WeightsHash> {
    any::<[u8; 32]>().prop_map(WeightsHash)
}

fn arb_selection() -> impl Strategy<Value = ClientSelection> {
    prop_oneof![
        Just(ClientSelection::All),
        prop::collection::vec("[a-z0-9-]{1,12}", 0..8).prop_map(ClientSelection::Clients),
        (0.0f32..=1.0, any::<u32>())
            .prop_map(|(fraction, min)| ClientSelection::Fraction { fraction, min }),
    ]
}

fn arb_task() -> impl Strategy<Value = TaskParams> {
    (
        any::<u32>(),
        any::<bool>(),
        any::<u32>(),
        prop::collection::vec(("[a-z_]{1,8}", ".{0,8}"), 0..4),
    )
        .prop_map(|(batch_size, one_sided, max_tokens, extra)| TaskParams {
            batch_size,
            one_sided,
            max_tokens,
            extra,
        })
}

prop_compose! {
    fn arb_announce()(
        job in "[a-z0-9-]{1,16}",
        round in any::<u64>(),
        model_version in any::<u64>(),
        weights_hash in arb_hash(),
        perturbations_per_client in any::<u32>(),
        eps in any::<f32>().prop_filter("NaN != NaN", |x| !x.is_nan()),
        deadline_unix_ms in any::<u64>(),
        selection in arb_selection(),
        task in arb_task(),
        seed_base in any::<u64>(),
        extend in any::<u32>(),
    ) -> RoundAnnounce {
        RoundAnnounce { job, round, model_version, weights_hash, perturbations_per_client, eps,
            deadline_unix_ms, selection, task, seed_base, extend }
    }
}

fn finite() -> impl Strategy<Value = f32> {
    any::<f32>().prop_filter("NaN != NaN", |x| !x.is_nan())
}

prop_compose! {
    fn arb_update()(
        client_id in "[a-z0-9._-]{1,24}",
        round in any::<u64>(),
        base_version in any::<u64>(),
        seq in any::<u32>(),
        pairs in prop::collection::vec((any::<u64>(), finite()).prop_map(|(seed, g)| SeedScalar { seed, g }), 0..64),
        samples in any::<u32>(),
        loss_mean in finite(),
        loss_m2 in finite(),
    ) -> ClientUpdate {
        ClientUpdate { client_id, round, base_version, seq, pairs, samples, loss_mean, loss_m2 }
    }
}

prop_compose! {
    fn arb_commit()(
        round in any::<u64>(),
        base_version in any::<u64>(),
        new_version in any::<u64>(),
        pairs in prop::collection::vec((any::<u64>(), finite()).prop_map(|(seed, coeff)| SeedCoeff { seed, coeff }), 0..64),
        dense in prop::option::of(prop::collection::vec(finite(), 0..64)),
        weights_hash in arb_hash(),
    ) -> RoundCommit {
        let step = match dense {
            Some(values) => CommitStep::Dense(values),
            None => CommitStep::Pairs(pairs),
        };
        RoundCommit { round, base_version, new_version, step, weights_hash }
    }
}

prop_compose! {
    fn arb_eval()(
        client_id in "[a-z0-9-]{1,16}",
        model_version in any::<u64>(),
        weights_hash in arb_hash(),
        examples in any::<u32>(),
        correct in any::<u32>(),
        loss_sum in any::<f64>().prop_filter("finite", |x| x.is_finite()),
    ) -> EvalReport {
        EvalReport { client_id, model_version, weights_hash, examples, correct, loss_sum }
    }
}

prop_compose! {
    fn arb_checkpoint()(model_version in any::<u64>(), salt in any::<u64>()) -> Checkpoint {
        let layout = LoraLayout::new(&tiny_shape(), &LoraConfig { init_seed: salt, ..tiny_config() }).unwrap();
        let w = LoraWeights::init(layout);
        Checkpoint::from_weights(model_version, &w)
    }
}

/// Every strict prefix is Truncated, every extension is TrailingBytes, and a copy of the
/// message with another version or kind byte is rejected as such.
fn check_malformed<T: WireMessage + std::fmt::Debug + PartialEq>(msg: &T, extra: &[u8]) {
    let bytes = encode(msg);
    assert_eq!(&decode::<T>(&bytes).unwrap(), msg);
    for cut in 0..bytes.len() {
        assert_eq!(
            decode::<T>(&bytes[..cut]).unwrap_err(),
            WireError::Truncated,
            "prefix {cut}"
        );
    }
    let mut longer = bytes.clone();
    longer.extend_from_slice(extra);
    if longer.len() <= T::MAX_BYTES && !extra.is_empty() {
        assert_eq!(
            decode::<T>(&longer).unwrap_err(),
            WireError::TrailingBytes(extra.len())
        );
    }
    let mut v1 = bytes.clone();
    v1[0] = 1;
    v1[1] = 0;
    assert_eq!(decode::<T>(&v1).unwrap_err(), WireError::UnknownVersion(1));
    let mut vbig = bytes.clone();
    vbig[0] = 0x34;
    vbig[1] = 0x12;
    assert_eq!(
        decode::<T>(&vbig).unwrap_err(),
        WireError::UnknownVersion(0x1234)
    );
    for kind in [0u8, 1, 2, 3, 4, 5, 255] {
        if kind == T::KIND as u8 {
            continue;
        }
        let mut k = bytes.clone();
        k[2] = kind;
        assert_eq!(
            decode::<T>(&k).unwrap_err(),
            WireError::WrongKind {
                expected: T::KIND,
                got: kind
            }
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn announce_round_trips(msg in arb_announce(), extra in prop::collection::vec(any::<u8>(), 1..8)) {
        check_malformed(&msg, &extra);
        prop_assert_eq!(peek_kind(&encode(&msg)), Ok(MessageKind::RoundAnnounce));
    }

    #[test]
    fn update_round_trips(msg in arb_update(), extra in prop::collection::vec(any::<u8>(), 1..8)) {
        check_malformed(&msg, &extra);
    }

    #[test]
    fn commit_round_trips(msg in arb_commit(), extra in prop::collection::vec(any::<u8>(), 1..8)) {
        check_malformed(&msg, &extra);
    }

    #[test]
    fn eval_report_round_trips(msg in arb_eval(), extra in prop::collection::vec(any::<u8>(), 1..8)) {
        check_malformed(&msg, &extra);
        prop_assert_eq!(peek_kind(&encode(&msg)), Ok(MessageKind::EvalReport));
    }

    #[test]
    fn checkpoint_round_trips(msg in arb_checkpoint()) {
        let bytes = encode(&msg);
        let back: Checkpoint = decode(&bytes).unwrap();
        prop_assert_eq!(&back, &msg);
        prop_assert_eq!(back.to_weights().unwrap().hash(), msg.weights_hash);
        prop_assert_eq!(decode::<Checkpoint>(&bytes[..bytes.len() - 1]).unwrap_err(), WireError::Truncated);
    }

    /// Arbitrary bytes never panic the decoder; whatever it accepts re-encodes to a message
    /// that decodes again.
    #[test]
    fn random_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..256), kind in 1u8..=4) {
        let mut bytes = PROTOCOL_VERSION.to_le_bytes().to_vec();
        bytes.push(kind);
        bytes.extend_from_slice(&body);
        if let Ok(m) = decode::<ClientUpdate>(&bytes) { prop_assert!(decode::<ClientUpdate>(&encode(&m)).is_ok()); }
        if let Ok(m) = decode::<RoundAnnounce>(&bytes) { prop_assert!(decode::<RoundAnnounce>(&encode(&m)).is_ok()); }
        if let Ok(m) = decode::<RoundCommit>(&bytes) { prop_assert!(decode::<RoundCommit>(&encode(&m)).is_ok()); }
        let _ = decode::<Checkpoint>(&bytes);
    }
}

fn sample_update(n: usize) -> ClientUpdate {
    ClientUpdate {
        client_id: "pi-01".into(),
        round: 12,
        base_version: 11,
        seq: 0,
        pairs: (0..n as u64)
            .map(|i| SeedScalar {
                seed: u64::MAX - i.wrapping_mul(0x9E37_79B9_7F4A_7C15),
                g: i as f32 * -0.5,
            })
            .collect(),
        samples: 64,
        loss_mean: 1.25,
        loss_m2: 0.5,
    }
}

#[test]
fn update_costs_at_most_16_bytes_per_pair() {
    for n in [1usize, 16, 256] {
        let len = encode(&sample_update(n)).len();
        assert!(len <= 16 * n + 32, "{n} pairs: {len} bytes");
    }
    // The marginal cost of one pair is exactly 12 bytes (fixed-width seed + f32).
    assert_eq!(
        encode(&sample_update(257)).len() - encode(&sample_update(256)).len(),
        12
    );
}

#[test]
fn oversized_input_is_rejected_before_parsing() {
    let big = vec![0u8; MAX_UPDATE_BYTES + 1];
    assert_eq!(
        decode::<ClientUpdate>(&big).unwrap_err(),
        WireError::TooLarge {
            len: MAX_UPDATE_BYTES + 1,
            max: MAX_UPDATE_BYTES
        }
    );
    // A valid message padded past the limit is rejected for size, not for trailing bytes.
    let mut bytes = encode(&sample_update(4));
    bytes.resize(MAX_UPDATE_BYTES + 10, 0);
    assert!(matches!(
        decode::<ClientUpdate>(&bytes),
        Err(WireError::TooLarge { .. })
    ));
    let big_json = vec![b' '; MAX_JSON_BYTES + 1];
    assert!(matches!(
        decode_json::<AgentStatus>(&big_json),
        Err(WireError::TooLarge { .. })
    ));
}

#[test]
fn garbage_body_is_malformed_not_a_panic() {
    // A bool field (one_sided) with value 7 and an enum discriminant out of range.
    let mut bytes = PROTOCOL_VERSION.to_le_bytes().to_vec();
    bytes.push(MessageKind::ClientUpdate as u8);
    bytes.extend_from_slice(&[0x02, 0xff, 0xfe]); // client_id: 2 bytes, invalid UTF-8
    assert!(matches!(
        decode::<ClientUpdate>(&bytes),
        Err(WireError::Malformed(_))
    ));
    // A length prefix far beyond the input is truncation, and must not allocate it.
    let mut bytes = PROTOCOL_VERSION.to_le_bytes().to_vec();
    bytes.push(MessageKind::Checkpoint as u8);
    bytes.extend_from_slice(&[0, 0xff, 0xff, 0xff, 0xff, 0x0f]);
    assert!(decode::<Checkpoint>(&bytes).is_err());
}

#[test]
fn peek_kind_checks_header() {
    assert_eq!(peek_kind(&[1]), Err(WireError::Truncated));
    assert_eq!(peek_kind(&[9, 0, 1]), Err(WireError::UnknownVersion(9)));
    assert!(matches!(
        peek_kind(&[3, 0, 77]),
        Err(WireError::Malformed(_))
    ));
    // Protocol 2 (commits always pairs) is refused by number, not misread.
    assert_eq!(peek_kind(&[2, 0, 3]), Err(WireError::UnknownVersion(2)));
    assert_eq!(
        peek_kind(&encode(&sample_update(1))),
        Ok(MessageKind::ClientUpdate)
    );
}

#[test]
fn header_layout_is_pinned() {
    // Golden bytes: changing the envelope or a body layout must be a deliberate protocol bump.
    let msg = ClientUpdate {
        client_id: "a".into(),
        round: 1,
        base_version: 2,
        seq: 3,
        pairs: vec![SeedScalar {
            seed: 0x0102_0304_0506_0708,
            g: 1.0,
        }],
        samples: 4,
        loss_mean: 0.0,
        loss_m2: 0.0,
    };
    let bytes = encode(&msg);
    assert_eq!(
        bytes,
        [
            3, 0, 2, // version 3 LE, kind ClientUpdate
            1, b'a', // client_id
            1, 2, 3, // round, base_version, seq (varints)
            1, 8, 7, 6, 5, 4, 3, 2, 1, 0, 0, 0x80,
            0x3f, // 1 pair: seed LE fixed, g = 1.0f32 LE
            4, 0, 0, 0, 0, 0, 0, 0, 0 // samples, loss_mean, loss_m2
        ]
    );
}

#[test]
fn checkpoint_with_tampered_params_fails_hash_check() {
    let layout = LoraLayout::new(&tiny_shape(), &tiny_config()).unwrap();
    let w = LoraWeights::init(layout);
    let mut cp = Checkpoint::from_weights(3, &w);
    assert_eq!(cp.to_weights().unwrap().hash(), w.hash());
    cp.params[0] += 1.0;
    assert!(matches!(
        cp.to_weights(),
        Err(CheckpointError::HashMismatch { .. })
    ));
    let mut short = Checkpoint::from_weights(3, &w);
    short.params.pop();
    assert!(matches!(
        short.to_weights(),
        Err(CheckpointError::Layout(_))
    ));
}

#[test]
fn checkpoint_claiming_a_huge_shape_is_refused_before_its_layout_is_allocated() {
    // `make fuzz` found this: a few bytes claiming a billion layers made `to_weights` allocate
    // the layout's tensor list (hundreds of GB) and abort the process.
    let w = LoraWeights::init(LoraLayout::new(&tiny_shape(), &tiny_config()).unwrap());
    let mut cp = Checkpoint::from_weights(3, &w);
    cp.shape.n_layer = 1 << 30;
    cp.config.layers = None;
    let err = cp.to_weights().unwrap_err();
    assert!(
        matches!(
            err,
            CheckpointError::Layout(LoraError::ParamLenMismatch { got, .. }) if got == w.params().len()
        ),
        "{err}"
    );
}

#[test]
fn json_messages_round_trip_and_are_readable() {
    let mut s = AgentStatus::new("pi-01", AgentState::Offline);
    s.reason = Some("last will".into());
    let bytes = encode_json(&s);
    let text = std::str::from_utf8(&bytes).unwrap();
    assert!(text.contains("\"state\":\"offline\""), "{text}");
    assert_eq!(decode_json::<AgentStatus>(&bytes).unwrap(), s);
    // Older/newer agents may omit or add fields.
    let minimal: AgentStatus =
        decode_json(br#"{"client_id":"x","state":"busy","future":1}"#).unwrap();
    assert_eq!(minimal.state, AgentState::Busy);
    assert!(!AgentState::Busy.is_eligible());
    assert_eq!(
        decode_json::<AgentStatus>(br#"{"client_id":"x""#).unwrap_err(),
        WireError::Truncated
    );
    assert!(matches!(
        decode_json::<AgentStatus>(br#"{"client_id":"x","state":"asleep"}"#),
        Err(WireError::Malformed(_))
    ));

    let m = AggregatorMetrics {
        job: "j".into(),
        round: 3,
        pacing_stat: 0.5,
        eval_accuracy: Some(0.8),
        ..Default::default()
    };
    assert_eq!(
        decode_json::<AggregatorMetrics>(&encode_json(&m)).unwrap(),
        m
    );
    let t = Telemetry {
        client_id: "c".into(),
        temperature_c: Some(51.5),
        ..Default::default()
    };
    assert_eq!(decode_json::<Telemetry>(&encode_json(&t)).unwrap(), t);
}

#[test]
fn selection_is_deterministic_and_respects_lists() {
    assert!(ClientSelection::All.includes("x", 1));
    let list = ClientSelection::Clients(vec!["a".into(), "b".into()]);
    assert!(list.includes("a", 5) && !list.includes("c", 5));
    let half = ClientSelection::Fraction {
        fraction: 0.5,
        min: 1,
    };
    let picked = (0..1000)
        .filter(|i| half.includes(&format!("c{i}"), 7))
        .count();
    assert!((400..600).contains(&picked), "{picked}");
    assert_eq!(half.includes("c1", 7), half.includes("c1", 7));
    assert!(!ClientSelection::Fraction {
        fraction: 0.0,
        min: 0
    }
    .includes("c1", 7));
    assert!((0..100).all(|i| ClientSelection::Fraction {
        fraction: 1.0,
        min: 0
    }
    .includes(&format!("c{i}"), 1)));
    assert_ne!(client_index("a"), client_index("b"));
    assert_eq!(client_index("pi-01"), client_index("pi-01"));
}
