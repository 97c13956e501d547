//! Daemon plumbing shared by agent and aggregator: logging (journald or stderr), sd-notify READY/WATCHDOG, shutdown.
