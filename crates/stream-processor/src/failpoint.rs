//! Failpoints: a test switch (off unless FAILPOINT is set) that aborts the process at a named
//! step of the delivery protocol, as a kill -9 there would.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// The protocol steps a failpoint can name.
pub const STEPS: [&str; 4] = [
    "after_consume_before_checkpoint",
    "after_checkpoint_before_post",
    "after_post_before_outbox_clear",
    "after_outbox_clear_before_commit",
];

static ARMED: OnceLock<Option<(String, u64)>> = OnceLock::new();
static HITS: AtomicU64 = AtomicU64::new(0);

/// Arms the failpoint (once per process). An unknown step name is a start-up error.
pub fn arm(step: Option<&str>, hit: u64) -> Result<(), String> {
    if let Some(s) = step {
        if !STEPS.contains(&s) {
            return Err(format!("FAILPOINT must be one of {}", STEPS.join(", ")));
        }
        tracing::warn!(step = s, hit, "failpoint armed: the process will abort there");
    }
    let _ = ARMED.set(step.map(|s| (s.to_owned(), hit.max(1))));
    Ok(())
}

/// Aborts the process when `step` is the armed one and this is its armed hit.
pub fn hit(step: &'static str) {
    if let Some(Some((armed, at))) = ARMED.get() {
        if armed == step && HITS.fetch_add(1, Ordering::SeqCst) + 1 == *at {
            eprintln!("failpoint {step}: aborting");
            std::process::abort();
        }
    }
}
