//! An instance's internal buffer of jobs (pure), of one of three kinds (tezos-workers'
//! buffer kinds): an unbounded queue; a bounded queue (full: the instance stops
//! fetching — backpressure, never a drop); a dropbox (a job whose merge key matches
//! one still pending is merged into it, the merged-away one handed back to be recorded
//! as merged, never lost).

use std::collections::VecDeque;

/// Which kind of buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Unbounded FIFO.
    Queue,
    /// FIFO of at most this many jobs.
    Bounded(usize),
    /// FIFO where a job merges into a pending one with the same merge key.
    Dropbox,
}

impl std::str::FromStr for Kind {
    type Err = String;
    /// `queue`, `bounded:<n>` (n ≥ 1) or `dropbox`.
    fn from_str(s: &str) -> Result<Kind, String> {
        match s {
            "queue" => Ok(Kind::Queue),
            "dropbox" => Ok(Kind::Dropbox),
            _ => match s.strip_prefix("bounded:").map(str::parse::<usize>) {
                Some(Ok(n)) if n > 0 => Ok(Kind::Bounded(n)),
                _ => Err(format!(
                    "buffer {s:?}: expected queue, bounded:<n> (n ≥ 1) or dropbox"
                )),
            },
        }
    }
}

/// A job waiting in the buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending<T> {
    /// The job (and whatever the instance keeps with it).
    pub item: T,
    /// When it was pushed (ms since the epoch).
    pub pushed_ms: u64,
    /// Its merge key (dropbox).
    pub key: Option<String>,
}

/// The buffer.
#[derive(Debug)]
pub struct Buffer<T> {
    kind: Kind,
    items: VecDeque<Pending<T>>,
}

impl<T> Buffer<T> {
    /// An empty buffer of `kind`.
    pub fn new(kind: Kind) -> Buffer<T> {
        Buffer {
            kind,
            items: VecDeque::new(),
        }
    }

    /// The kind.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Jobs waiting.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether none waits.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// How many more jobs may be fetched now (none for a full bounded buffer;
    /// `usize::MAX` for the unbounded kinds).
    pub fn room(&self) -> usize {
        match self.kind {
            Kind::Bounded(n) => n.saturating_sub(self.items.len()),
            Kind::Queue | Kind::Dropbox => usize::MAX,
        }
    }

    /// Pushes `item`. In a dropbox, an item with the `key` of a pending one is merged
    /// into it: `merge(pending, new)` gives the item to keep (in the pending one's
    /// place, with its push time) and the one merged away, which is returned. A push
    /// into a full bounded buffer is still taken (the caller checks [`Buffer::room`]
    /// before fetching; a job already fetched is never dropped).
    pub fn push(
        &mut self,
        item: T,
        key: Option<String>,
        now_ms: u64,
        merge: impl FnOnce(T, T) -> (T, T),
    ) -> Option<T> {
        if self.kind == Kind::Dropbox {
            if let Some(k) = &key {
                if let Some(i) = self.items.iter().position(|p| p.key.as_ref() == Some(k)) {
                    // Take the pending one out, merge, put the kept one back in place.
                    if let Some(old) = self.items.remove(i) {
                        let (keep, away) = merge(old.item, item);
                        self.items.insert(
                            i,
                            Pending {
                                item: keep,
                                pushed_ms: old.pushed_ms,
                                key: old.key,
                            },
                        );
                        return Some(away);
                    }
                }
            }
        }
        self.items.push_back(Pending {
            item,
            pushed_ms: now_ms,
            key,
        });
        None
    }

    /// Puts a job taken out back at the front (it keeps its push time; a dropbox
    /// does not merge it: it is not new).
    pub fn put_back(&mut self, item: T, key: Option<String>, pushed_ms: u64) {
        self.items.push_front(Pending {
            item,
            pushed_ms,
            key,
        });
    }

    /// The oldest job.
    pub fn pop(&mut self) -> Option<Pending<T>> {
        self.items.pop_front()
    }

    /// The first job `ready` accepts, taken out (the others keep their order).
    pub fn pop_first(&mut self, mut ready: impl FnMut(&T) -> bool) -> Option<Pending<T>> {
        let i = self.items.iter().position(|p| ready(&p.item))?;
        self.items.remove(i)
    }

    /// Every job, oldest first, taken out.
    pub fn drain(&mut self) -> Vec<Pending<T>> {
        self.items.drain(..).collect()
    }

    /// The jobs waiting, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &Pending<T>> {
        self.items.iter()
    }

    /// Removes the jobs `gone` says, returning them.
    pub fn remove_where(&mut self, mut gone: impl FnMut(&T) -> bool) -> Vec<T> {
        let mut out = Vec::new();
        let mut kept = VecDeque::with_capacity(self.items.len());
        for p in self.items.drain(..) {
            if gone(&p.item) {
                out.push(p.item);
            } else {
                kept.push_back(p);
            }
        }
        self.items = kept;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn newest(old: u32, new: u32) -> (u32, u32) {
        (new, old)
    }

    #[test]
    fn kinds_parse() {
        assert_eq!("queue".parse::<Kind>(), Ok(Kind::Queue));
        assert_eq!("dropbox".parse::<Kind>(), Ok(Kind::Dropbox));
        assert_eq!("bounded:8".parse::<Kind>(), Ok(Kind::Bounded(8)));
        assert!("bounded:0".parse::<Kind>().is_err());
        assert!("bounded:".parse::<Kind>().is_err());
        assert!("lifo".parse::<Kind>().is_err());
    }

    #[test]
    fn a_queue_is_fifo_and_never_full() {
        let mut b = Buffer::new(Kind::Queue);
        for i in 0..100u32 {
            assert_eq!(b.push(i, Some("k".into()), i as u64, newest), None);
        }
        assert_eq!(b.room(), usize::MAX);
        let order: Vec<u32> = std::iter::from_fn(|| b.pop().map(|p| p.item)).collect();
        assert_eq!(order, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn a_bounded_buffer_reports_no_room_when_full_and_drops_nothing() {
        let mut b = Buffer::new(Kind::Bounded(3));
        for i in 0..3u32 {
            b.push(i, None, 0, newest);
        }
        assert_eq!(b.room(), 0);
        // Already fetched: taken anyway, never dropped.
        b.push(3, None, 0, newest);
        assert_eq!(b.len(), 4);
        assert_eq!(b.room(), 0);
        b.pop();
        b.pop();
        assert_eq!(b.room(), 1);
    }

    #[test]
    fn a_dropbox_merges_by_key_in_place_and_returns_the_merged_away() {
        let mut b = Buffer::new(Kind::Dropbox);
        assert_eq!(b.push(1u32, Some("a".into()), 10, newest), None);
        assert_eq!(b.push(2, Some("b".into()), 11, newest), None);
        assert_eq!(b.push(3, None, 12, newest), None);
        // Same key as 1: 1 is merged away, 4 takes its place and its push time.
        assert_eq!(b.push(4, Some("a".into()), 13, newest), Some(1));
        assert_eq!(b.push(5, None, 14, newest), None);
        let got: Vec<(u32, u64)> = b
            .drain()
            .into_iter()
            .map(|p| (p.item, p.pushed_ms))
            .collect();
        assert_eq!(got, vec![(4, 10), (2, 11), (3, 12), (5, 14)]);
    }

    #[test]
    fn a_merge_function_decides_what_stays() {
        let mut b = Buffer::new(Kind::Dropbox);
        b.push(10u32, Some("k".into()), 0, newest);
        // Keep the sum; the new one is what goes away.
        let away = b.push(5, Some("k".into()), 1, |old, new| (old + new, new));
        assert_eq!(away, Some(5));
        assert_eq!(b.pop().map(|p| p.item), Some(15));
    }

    #[test]
    fn pop_first_and_remove_where_keep_the_others_in_order() {
        let mut b = Buffer::new(Kind::Queue);
        for i in 0..6u32 {
            b.push(i, None, 0, newest);
        }
        assert_eq!(b.pop_first(|x| *x % 2 == 1).map(|p| p.item), Some(1));
        assert_eq!(b.remove_where(|x| *x >= 4), vec![4, 5]);
        let rest: Vec<u32> = b.drain().into_iter().map(|p| p.item).collect();
        assert_eq!(rest, vec![0, 2, 3]);
    }

    #[test]
    fn a_job_put_back_goes_first_with_its_push_time() {
        let mut b = Buffer::new(Kind::Bounded(2));
        b.push(1u32, None, 10, newest);
        b.push(2, None, 11, newest);
        let p = b.pop_first(|x| *x == 2).unwrap();
        b.put_back(p.item, p.key, p.pushed_ms);
        let got: Vec<(u32, u64)> = b
            .drain()
            .into_iter()
            .map(|p| (p.item, p.pushed_ms))
            .collect();
        assert_eq!(got, vec![(2, 11), (1, 10)]);
    }

    proptest::proptest! {
        /// Whatever is pushed is either still in the buffer or was handed back merged:
        /// a dropbox loses nothing, and holds at most one job per key.
        #[test]
        fn a_dropbox_loses_nothing(keys in proptest::collection::vec(0u8..5, 0..60)) {
            let mut b = Buffer::new(Kind::Dropbox);
            let mut away = Vec::new();
            for (i, k) in keys.iter().enumerate() {
                if let Some(x) = b.push(i, Some(k.to_string()), 0, |old, new| (new, old)) {
                    away.push(x);
                }
            }
            let mut all: Vec<usize> = b.iter().map(|p| p.item).chain(away).collect();
            all.sort_unstable();
            proptest::prop_assert_eq!(all, (0..keys.len()).collect::<Vec<_>>());
            let distinct: std::collections::BTreeSet<_> = b.iter().map(|p| p.key.clone()).collect();
            proptest::prop_assert_eq!(distinct.len(), b.len());
        }
    }
}
