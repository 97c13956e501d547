//! systemd integration: sd-notify READY/WATCHDOG, journald or stderr logging, SIGTERM.
