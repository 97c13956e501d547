//! End-to-end suites live in `tests/tests/*.rs`; this crate only hosts them.
