//! Versioned postcard wire format: every message that crosses the network.
