//! The write-ahead journal of updates: durable group commit between two state snapshots.
//!
//! `state.bin` holds the whole durable state, the open round's pooled pairs included, so
//! rewriting it per batch of updates costs O(pending pairs) per fsync. Instead the updates a
//! batch received are appended here, raw (client id and payload, exactly as they came off the
//! topic), and made durable by one `fdatasync` for the whole batch; `state.bin` is rewritten
//! only at round events (open, extend, commit, abandon), when a fresh journal starts.
//!
//! File `journal.bin` in `state.dir`:
//! ```text
//! "FWDJRNL1" | base = blake3(state.bin bytes it extends) (32 B)
//! then records: len u32 LE | blake3(base | body)[..8] | body = client_len u16 LE | client | payload
//! ```
//! * The header names the snapshot the records extend. A journal whose base is not the hash of
//!   the `state.bin` on disk is stale (the crash fell between a new snapshot and the reset of
//!   the journal: the snapshot already holds every record) and is ignored.
//! * After a snapshot the same file is reset in place (header rewritten, truncated, one
//!   `fdatasync`: no rename, no directory sync). Each record's check is keyed by its base, so
//!   whatever a crash leaves of a reset — old header, new header over old records, a torn
//!   header — no old record is ever read as extending the new snapshot.
//! * A record is acknowledged (MQTT PUBACK) only after the append that holds it was synced, so
//!   a torn tail (length or checksum wrong, file too short) holds only unacknowledged records,
//!   which the broker redelivers: reading stops there.
//! * Replay feeds the records, in order, through the same ingest as live traffic. Between two
//!   snapshots the round is fixed (no open, extend or commit happened without a snapshot), so
//!   the ingest is a pure function of the records and replay rebuilds the state exactly:
//!   nothing acknowledged is lost, nothing is counted twice.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::state::StateError;

pub const JOURNAL_FILE: &str = "journal.bin";
const MAGIC: &[u8; 8] = b"FWDJRNL1";
const HEADER_LEN: usize = MAGIC.len() + 32;
const FRAME_LEN: usize = 4 + 8;

/// One update as it arrived: the client of its topic and the raw payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub client: String,
    pub payload: Vec<u8>,
}

fn io(path: &Path, source: std::io::Error) -> StateError {
    StateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn check(base: &blake3::Hash, body: &[u8]) -> [u8; 8] {
    let mut h = blake3::Hasher::new();
    h.update(base.as_bytes());
    h.update(body);
    let h = h.finalize();
    let mut c = [0u8; 8];
    c.copy_from_slice(&h.as_bytes()[..8]);
    c
}

/// An open journal, appended to by [`Journal::append`].
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
    base: blake3::Hash,
}

impl Journal {
    /// Starts an empty journal extending the snapshot whose bytes hash to `base` (the file is
    /// created, or an existing one reset in place), durable with one `fdatasync`.
    pub fn create(dir: &Path, base: &blake3::Hash) -> Result<Journal, StateError> {
        let path = dir.join(JOURNAL_FILE);
        let existed = path.exists();
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| io(&path, e))?;
        let mut header = Vec::with_capacity(HEADER_LEN);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(base.as_bytes());
        file.seek(SeekFrom::Start(0)).map_err(|e| io(&path, e))?;
        file.write_all(&header).map_err(|e| io(&path, e))?;
        file.set_len(HEADER_LEN as u64).map_err(|e| io(&path, e))?;
        file.sync_data().map_err(|e| io(&path, e))?;
        if !existed {
            // A new file's name must be durable too (once per state directory).
            crate::state::sync_dir(dir)?;
        }
        file.seek(SeekFrom::End(0)).map_err(|e| io(&path, e))?;
        Ok(Journal {
            path,
            file,
            base: *base,
        })
    }

    /// Appends `records` and makes them durable with one `fdatasync`.
    pub fn append(&mut self, records: &[Record]) -> Result<(), StateError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::new();
        for r in records {
            encode(&self.base, r, &mut buf);
        }
        self.file.write_all(&buf).map_err(|e| io(&self.path, e))?;
        self.file.sync_data().map_err(|e| io(&self.path, e))?;
        Ok(())
    }

    /// The records of the journal in `dir` that extend the snapshot hashing to `base`, up to
    /// the first torn record; none when the journal is absent or extends another snapshot.
    pub fn read(dir: &Path, base: &blake3::Hash) -> Result<Vec<Record>, StateError> {
        let path = dir.join(JOURNAL_FILE);
        let mut bytes = Vec::new();
        match File::open(&path) {
            Ok(mut f) => f.read_to_end(&mut bytes).map_err(|e| io(&path, e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(&path, e)),
        };
        if bytes.len() < HEADER_LEN
            || &bytes[..MAGIC.len()] != MAGIC
            || &bytes[MAGIC.len()..HEADER_LEN] != base.as_bytes()
        {
            if !bytes.is_empty() {
                log::info!(
                    "{} extends another state snapshot (crash after the snapshot was written); ignored",
                    path.display()
                );
            }
            return Ok(Vec::new());
        }
        Ok(decode_records(base, &bytes[HEADER_LEN..]))
    }
}

fn encode(base: &blake3::Hash, r: &Record, buf: &mut Vec<u8>) {
    let client = r.client.as_bytes();
    // Client ids are topic segments; longer ones cannot come off a topic this aggregator parses.
    let client = &client[..client.len().min(u16::MAX as usize)];
    let mut body = Vec::with_capacity(2 + client.len() + r.payload.len());
    body.extend_from_slice(&(client.len() as u16).to_le_bytes());
    body.extend_from_slice(client);
    body.extend_from_slice(&r.payload);
    buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
    buf.extend_from_slice(&check(base, &body));
    buf.extend_from_slice(&body);
}

/// Records up to the first incomplete or corrupt one (a torn tail: never acknowledged).
fn decode_records(base: &blake3::Hash, mut rest: &[u8]) -> Vec<Record> {
    let mut out = Vec::new();
    while rest.len() >= FRAME_LEN {
        let len = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
        let Some(body) = rest.get(FRAME_LEN..FRAME_LEN + len) else {
            break;
        };
        if check(base, body)[..] != rest[4..FRAME_LEN] || body.len() < 2 {
            break;
        }
        let n = u16::from_le_bytes([body[0], body[1]]) as usize;
        let Some(client) = body.get(2..2 + n).and_then(|c| std::str::from_utf8(c).ok()) else {
            break;
        };
        out.push(Record {
            client: client.to_owned(),
            payload: body[2 + n..].to_vec(),
        });
        rest = &rest[FRAME_LEN + len..];
    }
    if !rest.is_empty() {
        log::warn!(
            "journal: {} bytes of a torn tail dropped (never acknowledged; the broker redelivers them)",
            rest.len()
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(c: &str, p: &[u8]) -> Record {
        Record {
            client: c.into(),
            payload: p.to_vec(),
        }
    }

    #[test]
    fn records_round_trip_and_a_torn_tail_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let base = blake3::hash(b"state");
        let mut j = Journal::create(dir.path(), &base).unwrap();
        let a = vec![rec("a", b"\x01\x02"), rec("b", b"")];
        j.append(&a).unwrap();
        j.append(&[rec("c", &[7; 300])]).unwrap();
        let mut all = a.clone();
        all.push(rec("c", &[7; 300]));
        assert_eq!(Journal::read(dir.path(), &base).unwrap(), all);
        // Another snapshot: the journal does not extend it.
        assert!(Journal::read(dir.path(), &blake3::hash(b"other"))
            .unwrap()
            .is_empty());
        // Every truncation keeps exactly the complete records before the cut.
        let bytes = std::fs::read(dir.path().join(JOURNAL_FILE)).unwrap();
        let ends = [HEADER_LEN + FRAME_LEN + 5, HEADER_LEN + 2 * FRAME_LEN + 8];
        for cut in HEADER_LEN..bytes.len() {
            std::fs::write(dir.path().join(JOURNAL_FILE), &bytes[..cut]).unwrap();
            let got = Journal::read(dir.path(), &base).unwrap();
            let complete = ends.iter().filter(|&&e| e <= cut).count();
            assert_eq!(got, all[..complete], "cut at {cut}");
        }
        // A flipped byte in a record ends the journal there.
        let mut bad = bytes.clone();
        bad[HEADER_LEN + FRAME_LEN + 3] ^= 1;
        std::fs::write(dir.path().join(JOURNAL_FILE), &bad).unwrap();
        assert!(Journal::read(dir.path(), &base).unwrap().is_empty());
        // A reset for a new snapshot, torn after the header: the old records, still on disk
        // behind the new header, do not extend the new snapshot.
        std::fs::write(dir.path().join(JOURNAL_FILE), &bytes).unwrap();
        let next = blake3::hash(b"next state");
        let mut torn = bytes.clone();
        torn[MAGIC.len()..HEADER_LEN].copy_from_slice(next.as_bytes());
        std::fs::write(dir.path().join(JOURNAL_FILE), &torn).unwrap();
        assert!(Journal::read(dir.path(), &next).unwrap().is_empty());
        // A complete reset keeps nothing of the old journal, and appends after it.
        std::fs::write(dir.path().join(JOURNAL_FILE), &bytes).unwrap();
        let mut j = Journal::create(dir.path(), &next).unwrap();
        assert!(Journal::read(dir.path(), &next).unwrap().is_empty());
        j.append(&a).unwrap();
        assert_eq!(Journal::read(dir.path(), &next).unwrap(), a);
        assert!(Journal::read(dir.path(), &base).unwrap().is_empty());
        // No journal at all.
        std::fs::remove_file(dir.path().join(JOURNAL_FILE)).unwrap();
        assert!(Journal::read(dir.path(), &base).unwrap().is_empty());
    }
}
