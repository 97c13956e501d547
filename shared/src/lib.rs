//! fwdllm-shared: everything both sides of the federation must agree on bit for bit —
//! the wire format, topic names, seeded perturbations, LoRA layout, update math and the
//! GGUF adapter writer. Knows nothing about llama.cpp or MQTT.

pub mod topics;
pub mod wire;
#[cfg(feature = "service")]
pub mod service;
