//! Batch assembly by size and linger, with time passed in.

/// Collects items and says when they are due as batches: when `max_len` items wait, or when
/// `linger_ms` has passed since the oldest waiting item arrived. Taking splits everything that
/// waits into batches of at most `max_len`, so nothing is left behind between checkpoints.
#[derive(Debug)]
pub struct Batcher<T> {
    max_len: usize,
    linger_ms: u64,
    waiting: Vec<T>,
    oldest_at: u64,
}

impl<T> Batcher<T> {
    pub fn new(max_len: usize, linger_ms: u64) -> Self {
        assert!(max_len > 0, "batch size must be at least 1");
        Batcher {
            max_len,
            linger_ms,
            waiting: Vec::new(),
            oldest_at: 0,
        }
    }

    /// Adds items that arrived at `now_ms`.
    pub fn extend(&mut self, items: impl IntoIterator<Item = T>, now_ms: u64) {
        let was_empty = self.waiting.is_empty();
        self.waiting.extend(items);
        if was_empty && !self.waiting.is_empty() {
            self.oldest_at = now_ms;
        }
    }

    /// True when a full batch waits or the oldest item has lingered long enough.
    pub fn is_due(&self, now_ms: u64) -> bool {
        self.waiting.len() >= self.max_len
            || (!self.waiting.is_empty() && now_ms.saturating_sub(self.oldest_at) >= self.linger_ms)
    }

    /// Everything waiting, in order, as batches of `max_len`; a remainder shorter than half of
    /// `max_len` joins the last batch instead of going alone (so a burst that tips the count
    /// just past the size does not produce a tiny batch; no batch exceeds 1.5 × `max_len`).
    pub fn take_batches(&mut self) -> Vec<Vec<T>> {
        let mut out: Vec<Vec<T>> = Vec::new();
        let mut rest = std::mem::take(&mut self.waiting);
        while rest.len() > self.max_len {
            let tail = rest.split_off(self.max_len);
            out.push(rest);
            rest = tail;
        }
        if !rest.is_empty() {
            match out.last_mut() {
                Some(last) if rest.len() * 2 < self.max_len => last.append(&mut rest),
                _ => out.push(rest),
            }
        }
        out
    }

    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_is_due_when_full() {
        let mut b = Batcher::new(3, 1000);
        b.extend([1, 2], 0);
        assert!(!b.is_due(1));
        b.extend([3], 2);
        assert!(b.is_due(2));
        assert_eq!(b.take_batches(), vec![vec![1, 2, 3]]);
        assert!(b.is_empty());
    }

    #[test]
    fn batch_is_due_after_linger_from_its_oldest_item() {
        let mut b = Batcher::new(100, 200);
        b.extend(["a"], 1000);
        b.extend(["b"], 1150);
        assert!(!b.is_due(1199));
        assert!(b.is_due(1200));
        assert_eq!(b.take_batches(), vec![vec!["a", "b"]]);
        assert!(!b.is_due(5000));
    }

    #[test]
    fn taking_splits_everything_into_bounded_batches() {
        let mut b = Batcher::new(4, 10);
        b.extend(0..10, 0);
        assert_eq!(
            b.take_batches(),
            vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7], vec![8, 9]]
        );
        assert!(b.take_batches().is_empty());
    }

    #[test]
    fn a_short_remainder_joins_the_last_batch() {
        let mut b = Batcher::new(10, 10);
        b.extend(0..13, 0);
        assert_eq!(
            b.take_batches(),
            vec![(0..13).collect::<Vec<_>>()],
            "3 < 10/2: no batch of 3"
        );
        b.extend(0..24, 0);
        let sizes: Vec<usize> = b.take_batches().iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![10, 14], "the remainder 4 joins the second batch");
        b.extend(0..7, 0);
        assert_eq!(b.take_batches().len(), 1, "less than one batch stays one batch");
    }
}
