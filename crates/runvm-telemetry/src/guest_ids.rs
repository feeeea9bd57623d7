//! Span and trace ids for the guest that never wait for the kernel's entropy.
//!
//! The SDK's default generator draws from the thread's `rand` generator, seeded by
//! `getrandom(2)`, which blocks until the kernel's random pool is initialised: early in a VM's
//! life under TCG, with no hardware RNG, that can take many seconds, and `tracing-opentelemetry`
//! asks for an id when any span opens. Ids need to be unique, not secret: a SplitMix64
//! sequence seeded once from `GRND_INSECURE` (never blocks) and the boot clock.

use std::sync::atomic::{AtomicU64, Ordering};

use opentelemetry::trace::{SpanId, TraceId};
use opentelemetry_sdk::trace::IdGenerator;

/// SplitMix64's increment.
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// Ids from a SplitMix64 sequence.
#[derive(Debug)]
pub(crate) struct GuestIds {
    state: AtomicU64,
}

impl GuestIds {
    pub(crate) fn new() -> GuestIds {
        GuestIds {
            state: AtomicU64::new(seed()),
        }
    }

    fn next(&self) -> u64 {
        let mut z = self
            .state
            .fetch_add(GOLDEN, Ordering::Relaxed)
            .wrapping_add(GOLDEN);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A value that is not zero (zero is an invalid id).
    fn nonzero(&self) -> u64 {
        loop {
            let v = self.next();
            if v != 0 {
                return v;
            }
        }
    }
}

impl IdGenerator for GuestIds {
    fn new_trace_id(&self) -> TraceId {
        let hi = u128::from(self.nonzero());
        TraceId::from((hi << 64) | u128::from(self.next()))
    }

    fn new_span_id(&self) -> SpanId {
        SpanId::from(self.nonzero())
    }
}

/// Eight bytes from the kernel without waiting for its pool, mixed with the boot clock.
fn seed() -> u64 {
    let mut bytes = [0u8; 8];
    // SAFETY: the buffer is valid for writes of its length; GRND_INSECURE never blocks.
    let _ = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), libc::GRND_INSECURE) };
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write to.
    let _ = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    let clock = (ts.tv_sec as u64).wrapping_mul(1_000_000_000) ^ (ts.tv_nsec as u64);
    u64::from_ne_bytes(bytes) ^ clock.rotate_left(32) ^ u64::from(std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_valid_and_do_not_repeat() {
        let ids = GuestIds::new();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let id = ids.new_span_id();
            assert_ne!(id, SpanId::INVALID);
            assert!(seen.insert(id), "{id} repeated");
        }
        assert_ne!(ids.new_trace_id(), TraceId::INVALID);
    }
}
