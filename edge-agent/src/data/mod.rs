//! Data pipeline: readers, task configs, splits and client shards.
