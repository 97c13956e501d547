//! Agent configuration (TOML, environment overrides, validation).
