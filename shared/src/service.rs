//! Daemon plumbing shared by agent and aggregator: where log records go (journald or
//! stderr) and what the service manager is told (sd-notify READY / STATUS / STOPPING /
//! WATCHDOG). Everything here is a no-op when the process is not run by systemd, so the
//! daemons call it unconditionally.
//!
//! ```no_run
//! use fwdllm_shared::service::{self, Watchdog};
//!
//! service::init_logging(log::LevelFilter::Info);
//! // ... load the model, connect to the broker ...
//! service::notify_ready();
//! let watchdog = Watchdog::from_env();
//! loop {
//!     // ... one unit of real work (a perturbation, a round step) ...
//!     if let Some(wd) = &watchdog {
//!         wd.ping();
//!     }
//! #   break;
//! }
//! service::notify_stopping();
//! ```
//!
//! Structured fields: log with `log`'s key-value syntax, e.g.
//! `log::info!(round = 7, client = "pi-3"; "round committed")`. Under journald every
//! pair becomes a journal field with an upper-cased name (`ROUND=7`, `CLIENT=pi-3`, so
//! `journalctl -u fwdllm-agent ROUND=7` works); on stderr the pairs follow the message.

use std::env;
use std::time::Duration;

use log::LevelFilter;
use sd_notify::NotifyState;

/// Where [`init_logging`] sent the log records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogBackend {
    /// The native journal protocol (stderr of this process is a journal stream).
    Journal,
    /// Human-readable lines on stderr (env_logger).
    Stderr,
    /// A logger was already installed by someone else (a test harness, the in-process
    /// demo's first agent); it was left in place.
    Existing,
}

/// Installs the process-wide logger and returns which one.
///
/// The filter is `RUST_LOG` (env_logger syntax, e.g. `info,fwdllm_agent=debug`) when
/// set, else `default_level`; it applies to both backends. The journal is used when
/// stderr is the journal stream systemd handed us (`JOURNAL_STREAM` matches stderr's
/// device and inode), which keeps priorities and structured fields; otherwise, and if
/// the journal socket cannot be opened, records go to stderr.
///
/// Logging is best effort and never fails the daemon: a second call keeps the first
/// logger and returns [`LogBackend::Existing`].
pub fn init_logging(default_level: LevelFilter) -> LogBackend {
    let filter = stderr_builder(default_level).build();
    let max_level = filter.filter();
    if systemd_journal_logger::connected_to_journal() {
        match systemd_journal_logger::JournalLog::new() {
            Ok(journal) => {
                let logger = FilteredJournal { filter, journal };
                if log::set_boxed_logger(Box::new(logger)).is_err() {
                    return LogBackend::Existing;
                }
                log::set_max_level(max_level);
                return LogBackend::Journal;
            }
            Err(err) => {
                // Fall through to stderr, which systemd still forwards to the journal
                // (as plain lines); say why once it is installed.
                let backend = install_stderr(default_level);
                log::warn!("cannot open the journal socket ({err}); logging plain lines to stderr");
                return backend;
            }
        }
    }
    install_stderr(default_level)
}

fn stderr_builder(default_level: LevelFilter) -> env_logger::Builder {
    let env = env_logger::Env::default().default_filter_or(default_level.as_str());
    env_logger::Builder::from_env(env)
}

fn install_stderr(default_level: LevelFilter) -> LogBackend {
    match stderr_builder(default_level).try_init() {
        Ok(()) => LogBackend::Stderr,
        Err(_) => LogBackend::Existing,
    }
}

/// `JournalLog` has no filter of its own; reuse env_logger's so `RUST_LOG` means the same
/// thing on both backends.
struct FilteredJournal {
    filter: env_logger::Logger,
    journal: systemd_journal_logger::JournalLog,
}

impl log::Log for FilteredJournal {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        self.filter.enabled(metadata)
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.filter.matches(record) {
            self.journal.log(record);
        }
    }

    fn flush(&self) {}
}

/// True when a service manager is listening for notifications (`NOTIFY_SOCKET` is set).
pub fn under_service_manager() -> bool {
    env::var_os("NOTIFY_SOCKET").is_some()
}

fn notify(what: &str, states: &[NotifyState<'_>]) {
    // A failed notification is worth a warning, not an exit: systemd will act on the
    // missing READY/WATCHDOG itself (timeout, restart), which is the right outcome.
    if let Err(err) = sd_notify::notify(false, states) {
        log::warn!("sd_notify {what} failed: {err}");
    }
}

/// Tells systemd (`Type=notify`) that start-up is complete. Call it once the daemon is
/// actually able to work (model loaded, first broker connection up), not at `main`.
pub fn notify_ready() {
    notify("READY", &[NotifyState::Ready]);
}

/// Sets the one-line status shown by `systemctl status` (e.g. "round 12: 3/4 updates").
pub fn notify_status(status: &str) {
    notify("STATUS", &[NotifyState::Status(status)]);
}

/// Tells systemd a graceful shutdown has begun (after SIGTERM), so a slow final flush
/// is not mistaken for a hang.
pub fn notify_stopping() {
    notify("STOPPING", &[NotifyState::Stopping]);
}

/// Asks systemd for `extra` more time before the current start-up or shutdown step is
/// considered hung (for a slow model load on a small board).
pub fn notify_extend_timeout(extra: Duration) {
    let usec = u32::try_from(extra.as_micros()).unwrap_or(u32::MAX);
    notify(
        "EXTEND_TIMEOUT_USEC",
        &[NotifyState::ExtendTimeoutUsec(usec)],
    );
}

/// The service watchdog (`WatchdogSec=` in the unit). There is deliberately no timer
/// behind it: the daemon pings from its work loop, so a hung loop stops the pings and
/// systemd restarts the service.
#[derive(Debug, Clone)]
pub struct Watchdog {
    timeout: Duration,
}

impl Watchdog {
    /// The watchdog systemd armed for this process, or `None` when there is none.
    ///
    /// Same rules as `sd_watchdog_enabled(3)`: `WATCHDOG_USEC` must be a positive
    /// integer, and when `WATCHDOG_PID` is set it must be this process (a child started
    /// by the daemon must not ping on its behalf).
    pub fn from_env() -> Option<Watchdog> {
        let usec: u64 = env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
        if usec == 0 {
            return None;
        }
        if let Ok(pid) = env::var("WATCHDOG_PID") {
            if pid.trim().parse::<u32>().ok()? != std::process::id() {
                return None;
            }
        }
        Some(Watchdog {
            timeout: Duration::from_micros(usec),
        })
    }

    /// The time after which systemd declares the service hung (`WatchdogSec=`).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The longest the work loop may go between pings: half the timeout, as
    /// `sd_watchdog_enabled(3)` recommends. A unit of work that can take longer (a
    /// forward pass on a slow board) must ping inside it, or the unit's `WatchdogSec=`
    /// must be raised.
    pub fn interval(&self) -> Duration {
        self.timeout / 2
    }

    /// Sends `WATCHDOG=1`. One datagram; cheap enough to call once per unit of work.
    pub fn ping(&self) {
        notify("WATCHDOG", &[NotifyState::Watchdog]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Environment-dependent behaviour (READY/WATCHDOG arriving on a real socket, stalls)
    // is tested in tests/tests/deploy_notify.rs with a child process, because changing
    // the environment inside a multi-threaded test binary is racy.

    #[test]
    fn interval_is_half_the_timeout() {
        let wd = Watchdog {
            timeout: Duration::from_secs(30),
        };
        assert_eq!(wd.interval(), Duration::from_secs(15));
        assert_eq!(wd.timeout(), Duration::from_secs(30));
    }
}
