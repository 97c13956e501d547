//! fwdllm-shared: everything both sides of the federation must agree on bit for bit —
//! the wire format, topic names, seeded perturbations, LoRA layout, update math and the
//! GGUF adapter writer. Knows nothing about llama.cpp or MQTT.
//!
//! Modules:
//! * [`perturb`] — the pinned counter-based generator (SplitMix64 over `(seed, counter)`):
//!   Rademacher directions, seed derivation, integer Gaussian approximation.
//! * [`lora`] — LoRA layout over a flat f32 vector, deterministic init, [`WeightsHash`].
//! * [`update`] — `(seed, coeff)` commit replay and perturbed parameter vectors.
//! * [`gguf`] — GGUF v3 LoRA adapter writer (for stock llama.cpp) and a small GGUF reader.
//! * [`durable`] — crash-safe file replacement (temp file, fsync, rename, fsync dir).
//! * [`fixtures`] — small shapes and the golden vectors' inputs for tests and simulations.
//! * [`wire`], [`topics`] — the versioned postcard wire format and MQTT topic names.
//! * `mqtt_tls` (feature `tls`) — TLS settings and the rustls (ring) client configuration of
//!   the daemons' broker connections.
//!
//! **Invariant:** replay (init + commits) is pure integer/f32 math in this crate, uses no
//! libm function and never reads an engine output, so every replica on every platform holds
//! the same bits for the same model version.

pub mod durable;
pub mod fixtures;
pub mod gguf;
pub mod lora;
pub mod perturb;
pub mod update;

#[cfg(feature = "tls")]
pub mod mqtt_tls;
#[cfg(feature = "service")]
pub mod service;
#[cfg(feature = "tokenizer")]
pub mod tokenizer;
pub mod topics;
pub mod wire;

pub use lora::WeightsHash;
