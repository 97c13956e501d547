//! MQTT topic scheme (names only; no MQTT client here).
//!
//! Every topic is `fwdllm/v1/{job}/...`: the protocol version and the job name are in the path,
//! so two jobs (or two protocol versions) can share a broker, and per-client topics end in the
//! client id so a broker ACL can pin a client to its own topics
//! (e.g. mosquitto `pattern write fwdllm/v1/+/update/%c`).
//!
//! | topic                                  | publisher  | payload              | retained | QoS |
//! |----------------------------------------|------------|----------------------|----------|-----|
//! | `fwdllm/v1/{job}/round`                | aggregator | `RoundAnnounce`      | yes      | 1   |
//! | `fwdllm/v1/{job}/commit`               | aggregator | `RoundCommit` latest | yes      | 1   |
//! | `fwdllm/v1/{job}/commits/{version}`    | aggregator | `RoundCommit` log    | yes (*)  | 1   |
//! | `fwdllm/v1/{job}/checkpoint`           | aggregator | `Checkpoint`         | yes      | 1   |
//! | `fwdllm/v1/{job}/update/{client_id}`   | agent      | `ClientUpdate`       | no       | 1   |
//! | `fwdllm/v1/{job}/status/{client_id}`   | agent      | `AgentStatus` JSON   | yes, LWT | 1   |
//! | `fwdllm/v1/{job}/telemetry/{client_id}`| agent      | `Telemetry` JSON     | no       | 0   |
//! | `fwdllm/v1/{job}/eval/{client_id}`     | agent      | `EvalReport`         | no       | 1   |
//! | `fwdllm/v1/{job}/metrics`              | aggregator | `AggregatorMetrics` JSON | yes  | 0   |
//! | `fwdllm/v1/{job}/aggregator`           | aggregator | `AgentStatus` JSON (client_id "aggregator") | yes, LWT | 1 |
//!
//! (*) The commit log is keyed by the commit's `new_version` (not the round: a round that times
//! out without quorum commits nothing, so versions are dense and rounds are not). Log entries are
//! retained so that a reconnecting agent receives, on subscribing to [`Topics::commits_filter`],
//! the latest checkpoint plus every commit since it — one download plus replay. When the aggregator
//! publishes a new checkpoint it clears the log entries it covers by publishing an empty retained
//! payload, so the broker holds at most `checkpoint_every` commits per job. **An empty payload on
//! any topic means "retained message cleared" and must be ignored by subscribers.**
//!
//! Binary payloads use `crate::wire`'s versioned envelope; JSON payloads are readable with
//! `mosquitto_sub -v -t 'fwdllm/#'`.

use thiserror::Error;

/// First two path segments of every topic.
pub const PREFIX: &str = "fwdllm/v1";

/// A job name or client id that cannot be a topic segment.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum TopicError {
    #[error("{what} is empty; give it a non-empty name")]
    Empty { what: &'static str },
    #[error("{what} {value:?} contains {ch:?}; topic segments may not contain '/', '+', '#' or NUL — use letters, digits, '-', '_' or '.'")]
    BadChar {
        what: &'static str,
        value: String,
        ch: char,
    },
    #[error("{what} {value:?} is {len} bytes long; at most {max} allowed")]
    TooLong {
        what: &'static str,
        value: String,
        len: usize,
        max: usize,
    },
}

/// Longest job name / client id (keeps topics far below MQTT's 65,535-byte limit).
pub const MAX_SEGMENT_LEN: usize = 128;

/// Checks that `value` is usable as one topic segment (job name, client id).
pub fn validate_segment(what: &'static str, value: &str) -> Result<(), TopicError> {
    if value.is_empty() {
        return Err(TopicError::Empty { what });
    }
    if value.len() > MAX_SEGMENT_LEN {
        return Err(TopicError::TooLong {
            what,
            value: value.to_string(),
            len: value.len(),
            max: MAX_SEGMENT_LEN,
        });
    }
    if let Some(ch) = value
        .chars()
        .find(|c| matches!(c, '/' | '+' | '#' | '\0') || c.is_control())
    {
        return Err(TopicError::BadChar {
            what,
            value: value.to_string(),
            ch,
        });
    }
    Ok(())
}

/// What a topic of this job is, parsed back from its name (see [`Topics::parse`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicKind {
    Round,
    Commit,
    CommitLog(u64),
    Checkpoint,
    Update(String),
    Status(String),
    Telemetry(String),
    Eval(String),
    Metrics,
    Aggregator,
}

/// Topic names of one job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    base: String,
}

impl Topics {
    /// Topics of job `job`; the name must be a valid topic segment.
    pub fn new(job: &str) -> Result<Topics, TopicError> {
        validate_segment("job name", job)?;
        Ok(Topics {
            base: format!("{PREFIX}/{job}"),
        })
    }

    /// `fwdllm/v1/{job}`
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Current round announcement (retained).
    pub fn round(&self) -> String {
        format!("{}/round", self.base)
    }

    /// Latest commit (retained).
    pub fn commit(&self) -> String {
        format!("{}/commit", self.base)
    }

    /// Commit log entry producing model version `new_version` (retained until a checkpoint covers it).
    pub fn commit_log(&self, new_version: u64) -> String {
        format!("{}/commits/{new_version}", self.base)
    }

    /// All commit log entries.
    pub fn commits_filter(&self) -> String {
        format!("{}/commits/+", self.base)
    }

    /// Latest checkpoint (retained).
    pub fn checkpoint(&self) -> String {
        format!("{}/checkpoint", self.base)
    }

    /// A client's updates.
    pub fn update(&self, client_id: &str) -> String {
        format!("{}/update/{client_id}", self.base)
    }

    /// All clients' updates (aggregator subscription).
    pub fn updates_filter(&self) -> String {
        format!("{}/update/+", self.base)
    }

    /// A client's status (retained, with last will "offline").
    pub fn status(&self, client_id: &str) -> String {
        format!("{}/status/{client_id}", self.base)
    }

    /// All clients' statuses.
    pub fn status_filter(&self) -> String {
        format!("{}/status/+", self.base)
    }

    /// A client's telemetry heartbeat.
    pub fn telemetry(&self, client_id: &str) -> String {
        format!("{}/telemetry/{client_id}", self.base)
    }

    /// All clients' telemetry.
    pub fn telemetry_filter(&self) -> String {
        format!("{}/telemetry/+", self.base)
    }

    /// A client's dev-set evaluation of one model version (model selection).
    pub fn eval(&self, client_id: &str) -> String {
        format!("{}/eval/{client_id}", self.base)
    }

    /// All clients' dev-set evaluations (aggregator subscription).
    pub fn evals_filter(&self) -> String {
        format!("{}/eval/+", self.base)
    }

    /// Aggregator metrics (retained).
    pub fn metrics(&self) -> String {
        format!("{}/metrics", self.base)
    }

    /// Aggregator liveness (retained, last will "offline").
    pub fn aggregator(&self) -> String {
        format!("{}/aggregator", self.base)
    }

    /// Everything of this job (monitor subscription).
    pub fn all_filter(&self) -> String {
        format!("{}/#", self.base)
    }

    /// The filters an agent subscribes to: round, commit log, checkpoint. Not the latest-commit
    /// topic: every commit is also in the log, and both would deliver it twice.
    pub fn agent_filters(&self) -> Vec<String> {
        vec![self.round(), self.commits_filter(), self.checkpoint()]
    }

    /// Parses a topic of this job; `None` for topics of other jobs or unknown shapes.
    pub fn parse(&self, topic: &str) -> Option<TopicKind> {
        let rest = topic.strip_prefix(self.base.as_str())?.strip_prefix('/')?;
        let (head, tail) = match rest.split_once('/') {
            Some((h, t)) => (h, Some(t)),
            None => (rest, None),
        };
        let client = |t: Option<&str>| -> Option<String> {
            let t = t?;
            validate_segment("client id", t).ok()?;
            Some(t.to_string())
        };
        match (head, tail) {
            ("round", None) => Some(TopicKind::Round),
            ("commit", None) => Some(TopicKind::Commit),
            ("checkpoint", None) => Some(TopicKind::Checkpoint),
            ("metrics", None) => Some(TopicKind::Metrics),
            ("aggregator", None) => Some(TopicKind::Aggregator),
            ("commits", Some(v)) => {
                // Canonical decimal only, so one version has exactly one topic.
                let n: u64 = v.parse().ok()?;
                (n.to_string() == v).then_some(TopicKind::CommitLog(n))
            }
            ("update", t) => client(t).map(TopicKind::Update),
            ("status", t) => client(t).map(TopicKind::Status),
            ("telemetry", t) => client(t).map(TopicKind::Telemetry),
            ("eval", t) => client(t).map(TopicKind::Eval),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_documented_scheme() {
        let t = Topics::new("bbc").unwrap();
        assert_eq!(t.round(), "fwdllm/v1/bbc/round");
        assert_eq!(t.commit(), "fwdllm/v1/bbc/commit");
        assert_eq!(t.commit_log(7), "fwdllm/v1/bbc/commits/7");
        assert_eq!(t.commits_filter(), "fwdllm/v1/bbc/commits/+");
        assert_eq!(t.checkpoint(), "fwdllm/v1/bbc/checkpoint");
        assert_eq!(t.update("pi-1"), "fwdllm/v1/bbc/update/pi-1");
        assert_eq!(t.updates_filter(), "fwdllm/v1/bbc/update/+");
        assert_eq!(t.status("pi-1"), "fwdllm/v1/bbc/status/pi-1");
        assert_eq!(t.status_filter(), "fwdllm/v1/bbc/status/+");
        assert_eq!(t.telemetry("pi-1"), "fwdllm/v1/bbc/telemetry/pi-1");
        assert_eq!(t.telemetry_filter(), "fwdllm/v1/bbc/telemetry/+");
        assert_eq!(t.eval("pi-1"), "fwdllm/v1/bbc/eval/pi-1");
        assert_eq!(t.evals_filter(), "fwdllm/v1/bbc/eval/+");
        assert_eq!(t.metrics(), "fwdllm/v1/bbc/metrics");
        assert_eq!(t.aggregator(), "fwdllm/v1/bbc/aggregator");
        assert_eq!(t.all_filter(), "fwdllm/v1/bbc/#");
    }

    #[test]
    fn every_topic_parses_back_to_its_kind() {
        let t = Topics::new("job-1").unwrap();
        let cases = [
            (t.round(), TopicKind::Round),
            (t.commit(), TopicKind::Commit),
            (t.commit_log(42), TopicKind::CommitLog(42)),
            (t.checkpoint(), TopicKind::Checkpoint),
            (t.update("a"), TopicKind::Update("a".into())),
            (t.status("b.c"), TopicKind::Status("b.c".into())),
            (t.telemetry("d_e"), TopicKind::Telemetry("d_e".into())),
            (t.eval("f"), TopicKind::Eval("f".into())),
            (t.metrics(), TopicKind::Metrics),
            (t.aggregator(), TopicKind::Aggregator),
        ];
        for (topic, kind) in cases {
            assert_eq!(t.parse(&topic), Some(kind), "{topic}");
        }
    }

    #[test]
    fn foreign_and_malformed_topics_do_not_parse() {
        let t = Topics::new("job").unwrap();
        for topic in [
            "fwdllm/v1/other/round",
            "fwdllm/v2/job/round",
            "fwdllm/v1/jobx/round",
            "fwdllm/v1/job",
            "fwdllm/v1/job/",
            "fwdllm/v1/job/round/extra",
            "fwdllm/v1/job/update",
            "fwdllm/v1/job/update/",
            "fwdllm/v1/job/update/a/b",
            "fwdllm/v1/job/commits/x",
            "fwdllm/v1/job/commits/007",
            "fwdllm/v1/job/commits/-1",
            "fwdllm/v1/job/unknown",
        ] {
            assert_eq!(t.parse(topic), None, "{topic}");
        }
    }

    #[test]
    fn bad_segments_are_rejected_with_the_reason() {
        assert_eq!(Topics::new(""), Err(TopicError::Empty { what: "job name" }));
        for bad in ["a/b", "a+", "#", "nul\0"] {
            assert!(
                matches!(Topics::new(bad), Err(TopicError::BadChar { .. })),
                "{bad:?}"
            );
        }
        let long = "x".repeat(MAX_SEGMENT_LEN + 1);
        assert!(matches!(
            validate_segment("client id", &long),
            Err(TopicError::TooLong { len, .. }) if len == MAX_SEGMENT_LEN + 1
        ));
        assert!(validate_segment("client id", "pi5-kitchen_01.local").is_ok());
    }
}
