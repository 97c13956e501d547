//! The sd-notify contract the systemd units rely on (`Type=notify`, `WatchdogSec=`):
//! READY and WATCHDOG reach the socket named by NOTIFY_SOCKET, watchdog pings come only
//! from the work loop (a stalled loop sends none), and nothing is sent or required when
//! there is no service manager. Driven through `fwdllm-service-probe`, which uses
//! `fwdllm_shared::service` the way the daemons do.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::Duration;

const PROBE: &str = env!("CARGO_BIN_EXE_fwdllm-service-probe");

/// A fake service manager: the receiving end of NOTIFY_SOCKET.
struct NotifySocket {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    sock: UnixDatagram,
}

impl NotifySocket {
    fn bind() -> NotifySocket {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        // A safety net so a broken probe fails the test instead of hanging it; the
        // assertions never depend on how long anything took.
        sock.set_read_timeout(Some(Duration::from_secs(120)))
            .unwrap();
        NotifySocket {
            _dir: dir,
            path,
            sock,
        }
    }

    /// All messages up to and including STOPPING=1, one entry per line.
    fn messages_until_stopping(&self) -> Vec<String> {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = self
                .sock
                .recv(&mut buf)
                .expect("probe went silent before STOPPING=1");
            let text = std::str::from_utf8(&buf[..n]).unwrap();
            for line in text.lines() {
                got.push(line.to_owned());
            }
            if got.last().map(String::as_str) == Some("STOPPING=1") {
                return got;
            }
        }
    }
}

struct ProbeRun {
    stdout: Vec<String>,
    stderr: String,
}

fn run_probe(env: &[(&str, &str)], script: &str) -> ProbeRun {
    let mut cmd = Command::new(PROBE);
    cmd.env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .env_remove("JOURNAL_STREAM")
        .env_remove("RUST_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "probe failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ProbeRun {
        stdout: BufReader::new(&out.stdout[..])
            .lines()
            .map(Result::unwrap)
            .collect(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

#[test]
fn ready_and_watchdog_pings_reach_the_notify_socket() {
    let sock = NotifySocket::bind();
    let run = run_probe(
        &[
            ("NOTIFY_SOCKET", sock.path.to_str().unwrap()),
            ("WATCHDOG_USEC", "30000000"),
        ],
        "ready\nstep\nstep\nstop\n",
    );
    assert_eq!(run.stdout, ["log: Stderr", "watchdog: 30000000"]);
    assert_eq!(
        sock.messages_until_stopping(),
        ["READY=1", "WATCHDOG=1", "WATCHDOG=1", "STOPPING=1"]
    );
}

#[test]
fn a_stalled_work_loop_sends_no_watchdog_ping() {
    let sock = NotifySocket::bind();
    // 2 ms timeout, 1 ms interval: the stall lasts 200 intervals, so any timer-driven
    // ping would land between "stalled" and "resumed".
    run_probe(
        &[
            ("NOTIFY_SOCKET", sock.path.to_str().unwrap()),
            ("WATCHDOG_USEC", "2000"),
        ],
        "ready\nstep\nstall 200\nstep\nstop\n",
    );
    assert_eq!(
        sock.messages_until_stopping(),
        [
            "READY=1",
            "WATCHDOG=1",
            "STATUS=stalled",
            "STATUS=resumed",
            "WATCHDOG=1",
            "STOPPING=1"
        ]
    );
}

#[test]
fn watchdog_is_off_without_systemd_or_for_another_pid() {
    let run = run_probe(&[], "ready\nstep\nstop\n");
    assert_eq!(run.stdout, ["log: Stderr", "watchdog: none"]);

    // systemd sets WATCHDOG_PID to the main process; a child must not ping for it.
    let sock = NotifySocket::bind();
    let run = run_probe(
        &[
            ("NOTIFY_SOCKET", sock.path.to_str().unwrap()),
            ("WATCHDOG_USEC", "30000000"),
            ("WATCHDOG_PID", "1"),
        ],
        "ready\nstep\nstop\n",
    );
    assert_eq!(run.stdout[1], "watchdog: none");
    assert_eq!(sock.messages_until_stopping(), ["READY=1", "STOPPING=1"]);

    let run = run_probe(&[("WATCHDOG_USEC", "0")], "stop\n");
    assert_eq!(run.stdout[1], "watchdog: none");
}

#[test]
fn stderr_logging_carries_structured_fields_and_honours_rust_log() {
    // A JOURNAL_STREAM that is not our stderr (e.g. inherited through a pipe) must not
    // divert logs to the journal.
    let run = run_probe(&[("JOURNAL_STREAM", "1:1")], "step\nstop\n");
    assert_eq!(run.stdout[0], "log: Stderr");
    let line = run
        .stderr
        .lines()
        .find(|l| l.contains("probe step done"))
        .expect(&run.stderr);
    assert!(
        line.ends_with("probe step done round=1 client=probe"),
        "{line}"
    );

    let run = run_probe(&[("RUST_LOG", "warn")], "step\nstop\n");
    assert!(!run.stderr.contains("probe step done"), "{}", run.stderr);
}
