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

    /// Everything waiting, in order, as the fewest batches of at most `max_len`, balanced in
    /// size (see [`balanced_chunks`]).
    pub fn take_batches(&mut self) -> Vec<Vec<T>> {
        balanced_chunks(std::mem::take(&mut self.waiting), self.max_len)
    }

    /// Lowers (or raises) the largest batch from now on.
    pub fn set_max_len(&mut self, max_len: usize) {
        assert!(max_len > 0, "batch size must be at least 1");
        self.max_len = max_len;
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }
}

/// `items`, in order, as the fewest chunks of at most `max_len`, balanced in size (1,300 items
/// with `max_len` 1,000 become 650 + 650): no chunk exceeds the limit and no tiny remainder
/// goes alone. The same input always gives the same chunks.
pub fn balanced_chunks<T>(items: Vec<T>, max_len: usize) -> Vec<Vec<T>> {
    assert!(max_len > 0, "batch size must be at least 1");
    if items.is_empty() {
        return Vec::new();
    }
    let count = items.len().div_ceil(max_len);
    let (base, extra) = (items.len() / count, items.len() % count);
    let mut out = Vec::with_capacity(count);
    let mut items = items.into_iter();
    for i in 0..count {
        let len = base + usize::from(i < extra);
        out.push(items.by_ref().take(len).collect());
    }
    out
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
            vec![vec![0, 1, 2, 3], vec![4, 5, 6], vec![7, 8, 9]]
        );
        assert!(b.take_batches().is_empty());
    }

    #[test]
    fn batches_are_balanced_and_never_exceed_the_limit() {
        let mut b = Batcher::new(10, 10);
        b.extend(0..13, 0);
        let batches = b.take_batches();
        assert_eq!(batches, vec![(0..7).collect::<Vec<_>>(), (7..13).collect()]);
        for n in 1usize..200 {
            b.extend(0..n, 0);
            let batches = b.take_batches();
            let sizes: Vec<usize> = batches.iter().map(Vec::len).collect();
            assert!(sizes.iter().all(|s| *s <= 10), "{n}: {sizes:?}");
            assert_eq!(sizes.len(), n.div_ceil(10), "{n}: fewest batches");
            assert!(
                sizes.iter().max().expect("chunks") - sizes.iter().min().expect("chunks") <= 1,
                "{n}: {sizes:?}"
            );
            let flat: Vec<usize> = batches.into_iter().flatten().collect();
            assert_eq!(flat, (0..n).collect::<Vec<_>>(), "order kept");
        }
    }
}
