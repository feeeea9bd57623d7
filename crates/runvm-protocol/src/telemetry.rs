//! What both sides of `ReadTelemetry` agree on: the log levels' names and the limits of one
//! answer, which together keep it under ttrpc's 4 MiB message limit (the span batch's own
//! limit, `runvm_telemetry::MAX_GUEST_REQUEST_BYTES`, is 2 MiB).

/// The levels of a log record, most severe first, as they travel.
pub const LEVELS: [&str; 5] = ["error", "warn", "info", "debug", "trace"];
/// Longest message of one record, bytes (the agent cuts longer ones and marks them `…`).
pub const MAX_RECORD_MESSAGE: usize = 4096;
/// Most records in one answer.
pub const MAX_RECORDS_PER_READ: u32 = 1024;
/// Records in one answer when the host does not say.
pub const DEFAULT_RECORDS_PER_READ: u32 = 256;
/// Most bytes of records (messages and targets) in one answer.
pub const MAX_RECORD_BYTES_PER_READ: usize = 1536 * 1024;
/// Longest wait of one read while nothing is queued, ms.
pub const MAX_READ_WAIT_MS: u32 = 10_000;
