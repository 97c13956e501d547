//! fwdllm-agent library: the engine (forward gradients on llama.cpp), data pipeline and daemon.
