//! Failpoints: a test switch (off unless FAILPOINT is set) that aborts the process at a named
//! step of the protocol, as a kill -9 there would.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// The protocol steps a failpoint can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum Step {
    /// Events read and released, before the checkpoint that records them starts.
    AfterConsumeBeforeCheckpoint,
    /// The checkpoint's transaction committed on the broker, before the local cache has it.
    AfterChangelogCommitBeforeCache,
    /// The checkpoint is committed and known to the pipeline, before its batches are sent.
    AfterCheckpointBeforePost,
    /// The sink acknowledged a batch, before a checkpoint records the acknowledgement.
    AfterPostBeforeAckRecorded,
    /// A partition's state is being restored (after its producer fenced the previous owner).
    DuringRestore,
    /// A revoked partition is being checkpointed and handed over.
    DuringRevoke,
}

impl Step {
    pub fn name(self) -> &'static str {
        match self {
            Step::AfterConsumeBeforeCheckpoint => "after_consume_before_checkpoint",
            Step::AfterChangelogCommitBeforeCache => "after_changelog_commit_before_cache",
            Step::AfterCheckpointBeforePost => "after_checkpoint_before_post",
            Step::AfterPostBeforeAckRecorded => "after_post_before_ack_recorded",
            Step::DuringRestore => "during_restore",
            Step::DuringRevoke => "during_revoke",
        }
    }
}

static ARMED: OnceLock<Option<(Step, u64)>> = OnceLock::new();
static HITS: AtomicU64 = AtomicU64::new(0);

/// Arms the failpoint (once per process).
pub fn arm(step: Option<Step>, hit: u64) {
    if let Some(s) = step {
        tracing::warn!(
            step = s.name(),
            hit,
            "failpoint armed: the process will abort there"
        );
    }
    let _ = ARMED.set(step.map(|s| (s, hit.max(1))));
}

/// Aborts the process when `step` is the armed one and this is its armed hit.
pub fn hit(step: Step) {
    if let Some(Some((armed, at))) = ARMED.get() {
        if *armed == step && HITS.fetch_add(1, Ordering::SeqCst) + 1 == *at {
            eprintln!("failpoint {}: aborting", step.name());
            std::process::abort();
        }
    }
}
