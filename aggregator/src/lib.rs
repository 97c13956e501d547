//! fwdllm-aggregator library: round state machine, pacing, persistence, export.
