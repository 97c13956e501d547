//! fwdllm-shared: everything both sides of the federation must agree on bit for bit.
//! Knows nothing about llama.cpp or MQTT.
