//! Batch assembly by size and linger, with time passed in.

/// Collects items into batches of at most `max_len`, closing a batch when it is full or when
/// `linger_ms` has passed since its first item.
#[derive(Debug)]
pub struct Batcher<T> {
    max_len: usize,
    linger_ms: u64,
    current: Vec<T>,
    opened_at: u64,
}

impl<T> Batcher<T> {
    pub fn new(max_len: usize, linger_ms: u64) -> Self {
        assert!(max_len > 0, "batch size must be at least 1");
        Batcher {
            max_len,
            linger_ms,
            current: Vec::new(),
            opened_at: 0,
        }
    }

    /// Adds an item; returns a full batch when this item filled one.
    pub fn push(&mut self, item: T, now_ms: u64) -> Option<Vec<T>> {
        if self.current.is_empty() {
            self.opened_at = now_ms;
        }
        self.current.push(item);
        (self.current.len() >= self.max_len).then(|| self.take())
    }

    /// The open batch, when its linger has passed.
    pub fn poll(&mut self, now_ms: u64) -> Option<Vec<T>> {
        let due =
            !self.current.is_empty() && now_ms.saturating_sub(self.opened_at) >= self.linger_ms;
        due.then(|| self.take())
    }

    /// The open batch, whatever its age (empty when none).
    pub fn take(&mut self) -> Vec<T> {
        std::mem::take(&mut self.current)
    }

    pub fn len(&self) -> usize {
        self.current.len()
    }

    pub fn is_empty(&self) -> bool {
        self.current.is_empty()
    }

    /// When the open batch falls due, if there is one.
    pub fn due_at(&self) -> Option<u64> {
        (!self.current.is_empty()).then(|| self.opened_at + self.linger_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_closes_when_full() {
        let mut b = Batcher::new(3, 1000);
        assert_eq!(b.push(1, 0), None);
        assert_eq!(b.push(2, 1), None);
        assert_eq!(b.push(3, 2), Some(vec![1, 2, 3]));
        assert!(b.is_empty());
    }

    #[test]
    fn batch_closes_after_linger_from_its_first_item() {
        let mut b = Batcher::new(100, 200);
        b.push("a", 1000);
        b.push("b", 1150);
        assert_eq!(b.poll(1199), None);
        assert_eq!(b.due_at(), Some(1200));
        assert_eq!(b.poll(1200), Some(vec!["a", "b"]));
        assert_eq!(b.poll(5000), None);
    }
}
