//! Versioned postcard wire format: every binary message that crosses the network, plus the
//! JSON messages on human-facing topics (agent status, telemetry, aggregator metrics).
//!
//! # Binary envelope
//!
//! ```text
//! +---------------------+----------+-------------------------------+
//! | version: u16 (LE)   | kind: u8 | body: postcard(T)             |
//! +---------------------+----------+-------------------------------+
//! ```
//!
//! The header is fixed-width (not postcard) so a decoder can reject a message from a future
//! protocol version before it tries to interpret the body. [`decode`] checks, in this order:
//! the per-kind size limit ([`WireError::TooLarge`]), the header length ([`WireError::Truncated`]),
//! the version ([`WireError::UnknownVersion`]), the kind ([`WireError::WrongKind`]), the body
//! ([`WireError::Truncated`] / [`WireError::Malformed`]) and finally that nothing follows the body
//! ([`WireError::TrailingBytes`]). It never panics on any input.
//!
//! Seeds inside (seed, scalar) pairs are encoded as fixed 8-byte little-endian integers rather
//! than postcard varints: seeds are uniformly random 64-bit values, for which a varint costs 9-10
//! bytes, so fixed width is both smaller and constant (12 bytes per pair).

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::lora::{LoraConfig, LoraError, LoraLayout, LoraWeights, ModelShape, WeightsHash};
use crate::update::{self as update_math, SeedCoeff, StepError};

/// Version carried by every binary message. Bump on any incompatible change to a message body.
/// 2: `LoraConfig` (inside `Checkpoint`) gained `head_rows`, `head_alpha`, `blockwise`.
/// `LoraModule` then gained `attn_norm` and `ffn_norm` as appended variants (no bump: every
/// earlier message decodes as before). 3: `RoundCommit` carries a [`CommitStep`] (its pairs or
/// the dense trainable values, whichever is smaller) instead of always its pairs.
pub const PROTOCOL_VERSION: u16 = 3;

/// Bytes of the fixed envelope header (version u16 LE + kind u8).
pub const HEADER_LEN: usize = 3;

/// Errors from [`decode`] and [`decode_json`]. Each names what was wrong with the input.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum WireError {
    #[error("message truncated: input ended before the message was complete")]
    Truncated,
    #[error("message too large: {len} bytes, the limit for this kind is {max}")]
    TooLarge { len: usize, max: usize },
    #[error("unknown protocol version {0} (this build speaks version {PROTOCOL_VERSION}); upgrade the older side")]
    UnknownVersion(u16),
    #[error("wrong message kind: expected {expected:?}, got kind byte {got}")]
    WrongKind { expected: MessageKind, got: u8 },
    #[error("{0} trailing bytes after the message body")]
    TrailingBytes(usize),
    #[error("malformed message: {0}")]
    Malformed(String),
}

/// Kind byte of the envelope; one per binary message type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[repr(u8)]
pub enum MessageKind {
    RoundAnnounce = 1,
    ClientUpdate = 2,
    RoundCommit = 3,
    Checkpoint = 4,
    EvalReport = 5,
}

impl MessageKind {
    pub fn from_byte(b: u8) -> Option<MessageKind> {
        match b {
            1 => Some(MessageKind::RoundAnnounce),
            2 => Some(MessageKind::ClientUpdate),
            3 => Some(MessageKind::RoundCommit),
            4 => Some(MessageKind::Checkpoint),
            5 => Some(MessageKind::EvalReport),
            _ => None,
        }
    }
}

/// A binary message: its kind byte and the largest encoding a decoder accepts.
pub trait WireMessage: Serialize + DeserializeOwned {
    const KIND: MessageKind;
    /// Upper bound on the whole encoded message (header included). Keeps a hostile or buggy
    /// peer from making a decoder allocate without bound; chosen well above real sizes.
    const MAX_BYTES: usize;
}

/// Largest update accepted: 65,536 pairs at 12 bytes plus slack.
pub const MAX_UPDATE_BYTES: usize = 1 << 20;
/// Largest commit accepted (a commit carries every pair of a round).
pub const MAX_COMMIT_BYTES: usize = 8 << 20;
/// Largest announcement accepted (client lists for a few thousand clients).
pub const MAX_ANNOUNCE_BYTES: usize = 256 << 10;
/// Largest checkpoint accepted: 64 MiB of f32 parameters (SmolLM2-135M rank 8 q+v is ~1.8 MB).
pub const MAX_CHECKPOINT_BYTES: usize = 64 << 20;
/// Largest evaluation report accepted (a client id and a few numbers).
pub const MAX_EVAL_BYTES: usize = 1 << 10;
/// Largest JSON message accepted on human-facing topics.
pub const MAX_JSON_BYTES: usize = 64 << 10;

/// Encodes `msg` in the versioned envelope.
pub fn encode<T: WireMessage>(msg: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    out.push(T::KIND as u8);
    // Serialising into a Vec cannot fail for these types (no maps of unknown length, no
    // custom serialisers that error), so a failure here is a programming error.
    postcard::to_extend(msg, out).expect("postcard serialisation of a wire message into a Vec")
}

/// Reads the kind byte of an envelope without decoding the body (for routing/logging).
pub fn peek_kind(bytes: &[u8]) -> Result<MessageKind, WireError> {
    if bytes.len() < HEADER_LEN {
        return Err(WireError::Truncated);
    }
    let version = u16::from_le_bytes([bytes[0], bytes[1]]);
    if version != PROTOCOL_VERSION {
        return Err(WireError::UnknownVersion(version));
    }
    MessageKind::from_byte(bytes[2])
        .ok_or_else(|| WireError::Malformed(format!("unknown kind byte {}", bytes[2])))
}

/// Decodes one message of type `T`, checking size, version, kind and trailing bytes.
pub fn decode<T: WireMessage>(bytes: &[u8]) -> Result<T, WireError> {
    if bytes.len() > T::MAX_BYTES {
        return Err(WireError::TooLarge {
            len: bytes.len(),
            max: T::MAX_BYTES,
        });
    }
    if bytes.len() < HEADER_LEN {
        return Err(WireError::Truncated);
    }
    let version = u16::from_le_bytes([bytes[0], bytes[1]]);
    if version != PROTOCOL_VERSION {
        return Err(WireError::UnknownVersion(version));
    }
    if bytes[2] != T::KIND as u8 {
        return Err(WireError::WrongKind {
            expected: T::KIND,
            got: bytes[2],
        });
    }
    let (msg, rest) =
        postcard::take_from_bytes::<T>(&bytes[HEADER_LEN..]).map_err(|e| match e {
            postcard::Error::DeserializeUnexpectedEnd => WireError::Truncated,
            other => WireError::Malformed(other.to_string()),
        })?;
    if !rest.is_empty() {
        return Err(WireError::TrailingBytes(rest.len()));
    }
    Ok(msg)
}

/// Serialises a JSON (human-facing) message.
pub fn encode_json<T: Serialize>(msg: &T) -> Vec<u8> {
    serde_json::to_vec(msg).expect("JSON serialisation of a plain struct")
}

/// Decodes a JSON message with the size limit [`MAX_JSON_BYTES`].
pub fn decode_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, WireError> {
    if bytes.len() > MAX_JSON_BYTES {
        return Err(WireError::TooLarge {
            len: bytes.len(),
            max: MAX_JSON_BYTES,
        });
    }
    serde_json::from_slice(bytes).map_err(|e| {
        if e.is_eof() {
            WireError::Truncated
        } else {
            WireError::Malformed(e.to_string())
        }
    })
}

/// Stable per-client index used in `perturb::derive_seed(seed_base, round, client_index, k)`:
/// the first four bytes (LE) of blake3(client_id). Every agent computes its own, the aggregator
/// needs none (seeds travel in the update), and two clients collide with probability ~n²/2³³;
/// the aggregator additionally drops a seed it already pooled in the round.
pub fn client_index(client_id: &str) -> u32 {
    let h = blake3::hash(client_id.as_bytes());
    let b = h.as_bytes();
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// Which clients a round asks for work.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ClientSelection {
    /// Every client that sees the announcement.
    All,
    /// Exactly these client ids (the aggregator resolved the selection from retained statuses).
    Clients(Vec<String>),
    /// A deterministic pseudo-random fraction of clients per round; `min` is the aggregator's
    /// floor when resolving, agents only evaluate the fraction.
    Fraction { fraction: f32, min: u32 },
}

impl ClientSelection {
    /// Whether `client_id` is asked to work in `round`.
    pub fn includes(&self, client_id: &str, round: u64) -> bool {
        match self {
            ClientSelection::All => true,
            ClientSelection::Clients(ids) => ids.iter().any(|c| c == client_id),
            ClientSelection::Fraction { fraction, .. } => {
                let mut h = blake3::Hasher::new();
                h.update(client_id.as_bytes());
                h.update(&round.to_le_bytes());
                let b = h.finalize();
                let x = u32::from_le_bytes([
                    b.as_bytes()[0],
                    b.as_bytes()[1],
                    b.as_bytes()[2],
                    b.as_bytes()[3],
                ]);
                // Compare in integers so every platform agrees.
                let threshold = (f64::from(fraction.clamp(0.0, 1.0)) * f64::from(u32::MAX)) as u64;
                u64::from(x) <= threshold && *fraction > 0.0
            }
        }
    }
}

/// Task hyper-parameters the agents need for their forward passes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskParams {
    /// Examples per loss evaluation (one batch per perturbation).
    pub batch_size: u32,
    /// One-sided difference (L(θ+εv) − L(θ))/ε instead of central (saves one pass per perturbation).
    pub one_sided: bool,
    /// Token budget per example.
    pub max_tokens: u32,
    /// Free-form extension parameters (key, value), ignored by agents that do not know a key.
    pub extra: Vec<(String, String)>,
}

impl Default for TaskParams {
    fn default() -> Self {
        TaskParams {
            batch_size: 8,
            one_sided: false,
            max_tokens: 256,
            extra: Vec::new(),
        }
    }
}

/// Published retained on the round topic. Also re-published with `extend = n > 0` when the
/// round is still open and the aggregator wants `n` more perturbations from each selected client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundAnnounce {
    pub job: String,
    pub round: u64,
    /// Model version the updates must be computed at (= number of commits applied so far).
    pub model_version: u64,
    pub weights_hash: WeightsHash,
    /// Perturbations each selected client computes for this request.
    pub perturbations_per_client: u32,
    pub eps: f32,
    pub deadline_unix_ms: u64,
    pub selection: ClientSelection,
    pub task: TaskParams,
    /// Seeds are `derive_seed(seed_base, round, client_index(client_id), k)`, k counting from 0
    /// and continuing across extends.
    pub seed_base: u64,
    /// 0 for the first request of a round; n > 0 for the n-th "send more" request. An agent
    /// answers each (round, extend) at most once, with `ClientUpdate::seq = extend`.
    pub extend: u32,
}

impl WireMessage for RoundAnnounce {
    const KIND: MessageKind = MessageKind::RoundAnnounce;
    const MAX_BYTES: usize = MAX_ANNOUNCE_BYTES;
}

/// One perturbation's result: the seed of direction v and the directional derivative g ≈ ∇L·v.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SeedScalar {
    #[serde(with = "postcard::fixint::le")]
    pub seed: u64,
    pub g: f32,
}

/// A client's answer to one (round, extend) request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientUpdate {
    pub client_id: String,
    pub round: u64,
    /// Model version the client computed at; must equal the announcement's `model_version`.
    pub base_version: u64,
    /// De-duplication sequence: the `extend` value this update answers. The aggregator counts
    /// each (client_id, round, seq) once.
    pub seq: u32,
    pub pairs: Vec<SeedScalar>,
    /// Examples evaluated in total for this update.
    pub samples: u32,
    /// Mean unperturbed (or ±-averaged) loss over the batches of this update.
    pub loss_mean: f32,
    /// Sum of squared deviations of those losses (Welford M2), for pooled loss variance.
    pub loss_m2: f32,
}

impl WireMessage for ClientUpdate {
    const KIND: MessageKind = MessageKind::ClientUpdate;
    const MAX_BYTES: usize = MAX_UPDATE_BYTES;
}

/// Serde adapter: `Vec<SeedCoeff>` with fixed-width seeds (same reasoning as [`SeedScalar`]).
mod seed_coeff_vec {
    use super::SeedCoeff;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    struct Fixed(#[serde(with = "postcard::fixint::le")] u64, f32);

    pub(super) fn serialize<S: Serializer>(v: &[SeedCoeff], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|p| Fixed(p.seed, p.coeff)))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<SeedCoeff>, D::Error> {
        let v = Vec::<Fixed>::deserialize(d)?;
        Ok(v.into_iter()
            .map(|Fixed(seed, coeff)| SeedCoeff { seed, coeff })
            .collect())
    }
}

/// How a commit moves the weights from `base_version` to `new_version`. The aggregator sends
/// whichever form is smaller ([`CommitStep::smaller`]): a round of many pairs on a small layout
/// (head rows: 2,885 values) costs less as the values themselves. Both forms land on the same
/// bits: the dense form is the aggregator's own weights after it applied the pairs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CommitStep {
    /// Coefficients with the learning rate, schedule, averaging and trust-region clamp folded
    /// in; replayed in order with [`update_math::apply_commit`].
    Pairs(#[serde(with = "seed_coeff_vec")] Vec<SeedCoeff>),
    /// Every trainable value after the commit, in direction order
    /// ([`update_math::set_trainable_values`]). The values, not their difference from the
    /// base: `w + (w' - w)` need not round to `w'` in f32, `w'` itself is exact.
    Dense(Vec<f32>),
}

impl CommitStep {
    /// Bytes per pair on the wire (fixed-width seed + f32) and per dense value (f32).
    const PAIR_BYTES: usize = 12;
    const VALUE_BYTES: usize = 4;

    /// The smaller encoding of a step: `pairs`, or the trainable values of `after` (the
    /// weights once `pairs` are applied). A tie keeps the pairs, which also say the direction.
    pub fn smaller(pairs: Vec<SeedCoeff>, after: &LoraWeights) -> CommitStep {
        let dense = after.layout().trainable_len() * Self::VALUE_BYTES;
        if dense < pairs.len() * Self::PAIR_BYTES {
            CommitStep::Dense(after.trainable_values().collect())
        } else {
            CommitStep::Pairs(pairs)
        }
    }

    /// Moves `weights` (at the commit's base version) to the commit's new version. A dense step
    /// that does not fit the layout is refused and leaves the weights untouched.
    pub fn apply(&self, weights: &mut LoraWeights) -> Result<(), StepError> {
        match self {
            CommitStep::Pairs(pairs) => {
                update_math::apply_commit(weights, pairs);
                Ok(())
            }
            CommitStep::Dense(values) => update_math::set_trainable_values(weights, values),
        }
    }

    /// The pairs, when the step carries them (audits that account for every seed need them:
    /// the aggregator's `state.commit_form = "pairs"`).
    pub fn pairs(&self) -> Option<&[SeedCoeff]> {
        match self {
            CommitStep::Pairs(p) => Some(p),
            CommitStep::Dense(_) => None,
        }
    }

    /// For logs: "12 pairs" or "2885 dense values".
    pub fn describe(&self) -> String {
        match self {
            CommitStep::Pairs(p) => format!("{} pairs", p.len()),
            CommitStep::Dense(v) => format!("{} dense values", v.len()),
        }
    }
}

/// Published retained on the commit topic (latest) and on the commit log topic of its version.
/// Applying `step` to weights at `base_version` yields weights at `new_version` whose hash is
/// `weights_hash`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundCommit {
    pub round: u64,
    pub base_version: u64,
    pub new_version: u64,
    pub step: CommitStep,
    pub weights_hash: WeightsHash,
}

impl WireMessage for RoundCommit {
    const KIND: MessageKind = MessageKind::RoundCommit;
    const MAX_BYTES: usize = MAX_COMMIT_BYTES;
}

/// Full weights, published retained every N commits so late joiners catch up with one download
/// plus replay of the commits since.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub model_version: u64,
    pub shape: ModelShape,
    pub config: LoraConfig,
    pub params: Vec<f32>,
    pub weights_hash: WeightsHash,
}

impl WireMessage for Checkpoint {
    const KIND: MessageKind = MessageKind::Checkpoint;
    const MAX_BYTES: usize = MAX_CHECKPOINT_BYTES;
}

/// A client's evaluation of model version `model_version` on its fixed dev subset, sent when
/// the round announcement asks for one (`TaskParams::extra` key [`EVAL_EVERY_KEY`]). The
/// aggregator sums the reports of a version into its dev accuracy and keeps the best version's
/// weights for export (model selection). Agents never see held-out data; dev examples are
/// never trained on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    pub client_id: String,
    pub model_version: u64,
    /// Hash of the weights evaluated; a report for other weights than the aggregator's at that
    /// version is ignored.
    pub weights_hash: WeightsHash,
    /// Dev examples evaluated.
    pub examples: u32,
    /// How many of them were predicted right (classification; 0 for other tasks).
    pub correct: u32,
    /// Sum of the per-example losses (lower is better; what SFT tasks select on).
    pub loss_sum: f64,
}

impl WireMessage for EvalReport {
    const KIND: MessageKind = MessageKind::EvalReport;
    const MAX_BYTES: usize = MAX_EVAL_BYTES;
}

/// `TaskParams::extra` key: evaluate the dev subset at every model version that is a multiple
/// of this value (absent or 0: never).
pub const EVAL_EVERY_KEY: &str = "eval_every";

/// Why a checkpoint could not be turned back into weights.
#[derive(Debug, Error)]
pub enum CheckpointError {
    #[error("checkpoint layout is invalid: {0}")]
    Layout(#[from] LoraError),
    #[error("checkpoint hash mismatch: message says {expected}, parameters hash to {actual}; the checkpoint is corrupt or was built by a different layout")]
    HashMismatch {
        expected: WeightsHash,
        actual: WeightsHash,
    },
}

impl Checkpoint {
    pub fn from_weights(model_version: u64, weights: &LoraWeights) -> Checkpoint {
        Checkpoint {
            model_version,
            shape: weights.layout().shape().clone(),
            config: weights.layout().config().clone(),
            params: weights.params().to_vec(),
            weights_hash: weights.hash(),
        }
    }

    /// Rebuilds the weights and verifies their hash against `weights_hash`.
    pub fn to_weights(&self) -> Result<LoraWeights, CheckpointError> {
        // The parameter count first: the claimed shape is untrusted, and the layout it names
        // is only built once it matches the parameters the message really carries.
        let expected = LoraLayout::checked_len(&self.shape, &self.config)?;
        if expected != self.params.len() {
            return Err(LoraError::ParamLenMismatch {
                expected,
                got: self.params.len(),
            }
            .into());
        }
        let layout = LoraLayout::new(&self.shape, &self.config)?;
        let weights = LoraWeights::from_params(layout, self.params.clone())?;
        let actual = weights.hash();
        if actual != self.weights_hash {
            return Err(CheckpointError::HashMismatch {
                expected: self.weights_hash,
                actual,
            });
        }
        Ok(weights)
    }
}

/// Agent lifecycle state as shown on its retained status topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentState {
    /// Connected and eligible for rounds.
    Online,
    /// Connected but sitting rounds out (device limits: memory, temperature, load).
    Busy,
    /// Computing an update right now.
    Training,
    /// Catching up (replaying commits / downloading a checkpoint).
    Syncing,
    /// Disconnected (graceful shutdown or last will).
    Offline,
}

impl AgentState {
    /// Eligible to be selected for a round.
    pub fn is_eligible(self) -> bool {
        matches!(
            self,
            AgentState::Online | AgentState::Training | AgentState::Syncing
        )
    }
}

/// Retained JSON on `status/{client_id}`; the last will carries the same with `state: offline`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentStatus {
    pub client_id: String,
    pub state: AgentState,
    /// Model version the agent currently holds (0 in a last will published before it synced).
    #[serde(default)]
    pub model_version: u64,
    #[serde(default)]
    pub weights_hash: Option<WeightsHash>,
    /// Why the agent is busy/offline, for humans.
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub unix_ms: u64,
    #[serde(default)]
    pub agent_version: String,
}

impl AgentStatus {
    pub fn new(client_id: impl Into<String>, state: AgentState) -> AgentStatus {
        AgentStatus {
            client_id: client_id.into(),
            state,
            model_version: 0,
            weights_hash: None,
            reason: None,
            unix_ms: 0,
            agent_version: String::new(),
        }
    }
}

/// Heartbeat JSON on `telemetry/{client_id}` (not retained).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Telemetry {
    pub client_id: String,
    pub unix_ms: u64,
    pub cpu_percent: f32,
    pub mem_used_bytes: u64,
    pub mem_total_bytes: u64,
    pub mem_available_bytes: u64,
    pub temperature_c: Option<f32>,
    pub load_avg_1m: Option<f32>,
    pub model_version: u64,
    pub rounds_done: u64,
    pub perturbations_done: u64,
    /// Wall time of the last update's computation.
    pub last_update_ms: Option<u64>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

/// Aggregator metrics JSON on the metrics topic (retained: a monitor sees the latest at once)
/// and in the metrics CSV/JSON files.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AggregatorMetrics {
    pub job: String,
    pub unix_ms: u64,
    /// Round the aggregator is in (or just finished, for a commit record).
    pub round: u64,
    pub model_version: u64,
    /// "collecting", "committed", "abandoned", "stopped", ...
    pub phase: String,
    pub clients_online: u32,
    pub clients_busy: u32,
    pub clients_selected: u32,
    pub clients_responded: u32,
    /// Updates accepted this round (after dedup).
    pub updates: u32,
    /// (seed, g) pairs pooled this round.
    pub perturbations: u32,
    pub perturbations_total: u64,
    pub extends: u32,
    /// Pacing statistic: relative standard error of the pooled gradient estimate (dimensionless).
    pub pacing_stat: f64,
    pub pacing_target: f64,
    /// Mean of g² over the pooled pairs (pooled variance of the directional derivatives).
    pub pooled_variance: f64,
    pub lr: f64,
    pub step_norm: f64,
    pub theta_norm: f64,
    /// True if the trust-region clamp shortened this step.
    pub clamped: bool,
    pub loss_mean: f64,
    pub eval_accuracy: Option<f64>,
    pub eval_loss: Option<f64>,
    pub duplicates: u64,
    pub stale: u64,
    pub rejected: u64,
    pub round_ms: u64,
    pub weights_hash: Option<WeightsHash>,
    /// Rejected updates by reason (`non_finite`, `out_of_bound`, `too_many_pairs`, ...), since
    /// the job started.
    pub rejected_by_reason: std::collections::BTreeMap<String, u64>,
    /// Pairs of this round whose g the robust clip changed.
    pub clipped_pairs: u32,
    /// Clients of this round whose contribution the per-client cap scaled down.
    pub capped_clients: u32,
    pub clipped_pairs_total: u64,
    pub capped_clients_total: u64,
    /// Median and largest |g| of this round's raw pooled pairs.
    pub g_abs_median: f64,
    pub g_abs_max: f64,
    /// Commits released with differential-privacy noise, and the (ε, δ) spent so far
    /// (zCDP composition; None without DP).
    pub dp_commits: u64,
    pub dp_epsilon: Option<f64>,
    pub dp_delta: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures;

    fn golden_weights() -> LoraWeights {
        let layout = LoraLayout::new(&fixtures::golden_shape(), &fixtures::golden_lora()).unwrap();
        LoraWeights::init(layout)
    }

    fn commit(step: CommitStep, weights_hash: WeightsHash) -> RoundCommit {
        RoundCommit {
            round: 1,
            base_version: 0,
            new_version: 1,
            step,
            weights_hash,
        }
    }

    /// Golden vectors for both forms of one commit: the same weights bits (the golden
    /// `commit_hash`), and pinned encodings, so that a change of either form's wire layout or
    /// of what the dense form holds shows up here.
    #[test]
    fn both_commit_forms_land_on_the_golden_bits_and_encode_as_pinned() {
        let mut by_pairs = golden_weights();
        let pairs = CommitStep::Pairs(fixtures::golden_commit());
        pairs.apply(&mut by_pairs).unwrap();
        let hash = by_pairs.hash();
        assert_eq!(
            hash.to_string(),
            "068b0bafce5745ca750cc1f7724b552e8e786ebf2773e35285068f1e7477880f"
        );
        let dense = CommitStep::Dense(by_pairs.trainable_values().collect());
        let mut by_dense = golden_weights();
        dense.apply(&mut by_dense).unwrap();
        let bits = |w: &LoraWeights| w.params().iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&by_dense), bits(&by_pairs));

        let pinned = |step: CommitStep| {
            let bytes = encode(&commit(step, hash));
            assert_eq!(
                decode::<RoundCommit>(&bytes).unwrap(),
                commit(decode_step(&bytes), hash)
            );
            (bytes.len(), blake3::hash(&bytes).to_hex().to_string())
        };
        assert_eq!(
            pinned(pairs),
            (
                76,
                "00e2f2ee610fff7627e3cbd166d3507246f65a6474007b22a1b517e2bf61d6a1".into()
            )
        );
        assert_eq!(
            pinned(dense),
            (
                873,
                "02628b5d4d684d4e03b01bfbc5c94de8aabb0d0c8075b08713126f8e00a20a7f".into()
            )
        );
    }

    fn decode_step(bytes: &[u8]) -> CommitStep {
        decode::<RoundCommit>(bytes).unwrap().step
    }

    #[test]
    fn a_commit_carries_whichever_form_is_smaller() {
        let w = golden_weights();
        let t = w.layout().trainable_len();
        let pairs = |n: usize| {
            (0..n as u64)
                .map(|seed| SeedCoeff { seed, coeff: 0.5 })
                .collect::<Vec<_>>()
        };
        // 12 bytes per pair against 4 per value: pairs up to t / 3 of them (a tie keeps them).
        let most = t / 3;
        assert!(
            matches!(CommitStep::smaller(pairs(most), &w), CommitStep::Pairs(p) if p.len() == most)
        );
        match CommitStep::smaller(pairs(most + 1), &w) {
            CommitStep::Dense(v) => assert_eq!(v, w.trainable_values().collect::<Vec<_>>()),
            other => panic!("expected the dense form, got {}", other.describe()),
        }
        let bytes = |s: CommitStep| encode(&commit(s, w.hash())).len();
        assert!(
            bytes(CommitStep::smaller(pairs(most + 1), &w))
                < bytes(CommitStep::Pairs(pairs(most + 1)))
        );
    }

    #[test]
    fn a_dense_step_that_does_not_fit_is_refused_and_changes_nothing() {
        let mut w = golden_weights();
        let before = w.clone();
        let t = w.layout().trainable_len();
        let short = CommitStep::Dense(vec![0.5; t - 1]);
        assert_eq!(
            short.apply(&mut w),
            Err(StepError::DenseLength {
                got: t - 1,
                expected: t
            })
        );
        let mut poisoned = vec![0.5; t];
        poisoned[t - 1] = f32::NAN;
        let err = CommitStep::Dense(poisoned).apply(&mut w).unwrap_err();
        assert!(matches!(err, StepError::DenseNonFinite { index, .. } if index == t - 1));
        assert!(err.to_string().contains("non-finite"), "{err}");
        assert_eq!(w, before);
    }
}
