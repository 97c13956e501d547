//! The engine: forward-gradient LoRA on llama.cpp.
