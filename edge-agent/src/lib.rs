//! fwdllm-agent library: the engine (forward gradients on llama.cpp), the data pipeline
//! and the federated daemon. The binary `fwdllm-agent` is a thin CLI over these modules.

pub mod app;
pub mod cli;
pub mod cli_args;
pub mod config;
pub mod daemon;
pub mod data;
pub mod engine;
pub mod predict;
pub mod service;
pub mod sft_cli;
