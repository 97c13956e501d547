//! The agent daemon: MQTT loop, replay, status and telemetry.
