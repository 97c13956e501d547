//! A stand-in daemon for tests/tests/deploy_notify.rs: drives `fwdllm_shared::service`
//! exactly as the agent and aggregator do, one command per stdin line, so the test can
//! check which sd-notify messages a given sequence of work produces.
//!
//! Commands: `ready`, `step` (one unit of work, then a watchdog ping), `stall N` (a hung
//! unit of work: N watchdog intervals without pinging, bracketed by STATUS messages),
//! `stop`. Start-up facts go to stdout as `log: <backend>` and `watchdog: <usec|none>`.

use std::io::{BufRead, Write};

use fwdllm_shared::service::{self, Watchdog};

fn main() {
    let backend = service::init_logging(log::LevelFilter::Info);
    let watchdog = Watchdog::from_env();
    let mut out = std::io::stdout().lock();
    writeln!(out, "log: {backend:?}").unwrap();
    match &watchdog {
        Some(wd) => writeln!(out, "watchdog: {}", wd.timeout().as_micros()).unwrap(),
        None => writeln!(out, "watchdog: none").unwrap(),
    }
    out.flush().unwrap();

    let mut round = 0u64;
    for line in std::io::stdin().lock().lines() {
        let line = line.expect("stdin");
        let mut words = line.split_whitespace();
        match words.next() {
            Some("ready") => service::notify_ready(),
            Some("step") => {
                round += 1;
                log::info!(round = round, client = "probe"; "probe step done");
                if let Some(wd) = &watchdog {
                    wd.ping();
                }
            }
            Some("stall") => {
                let n: u32 = words.next().and_then(|w| w.parse().ok()).expect("stall N");
                service::notify_status("stalled");
                // The hang itself: the work loop is stuck, so nothing may ping. The
                // sleep *is* the simulated hang, not a synchronisation.
                let interval = watchdog
                    .as_ref()
                    .map(Watchdog::interval)
                    .unwrap_or_default();
                std::thread::sleep(interval * n);
                service::notify_status("resumed");
            }
            Some("stop") => {
                service::notify_stopping();
                break;
            }
            other => panic!("unknown probe command {other:?}"),
        }
    }
}
