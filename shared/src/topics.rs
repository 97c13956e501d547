//! MQTT topic scheme (names only; no MQTT client here).
