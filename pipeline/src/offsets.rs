//! Offset decisions of the runtime and of replays, as pure functions.

use std::collections::{BTreeMap, HashMap};

/// The next offset the state store reflects per topic-partition, read from the store once per
/// partition and kept current after each commit. Lookups by `&str` allocate nothing.
#[derive(Debug, Default)]
pub struct AppliedOffsets {
    by_topic: HashMap<String, HashMap<i32, Option<i64>>>,
}

impl AppliedOffsets {
    /// The recorded next offset of a partition, loading it with `load` on first use.
    ///
    /// # Errors
    ///
    /// Whatever `load` returns.
    pub fn get_or_load<E>(&mut self, topic: &str, partition: i32, load: impl FnOnce() -> Result<Option<i64>, E>) -> Result<Option<i64>, E> {
        if let Some(v) = self.by_topic.get(topic).and_then(|p| p.get(&partition)) {
            return Ok(*v);
        }
        let v = load()?;
        self.by_topic.entry(topic.to_string()).or_default().insert(partition, v);
        Ok(v)
    }

    /// Records that the store now reflects everything before `next`.
    pub fn advance(&mut self, topic: &str, partition: i32, next: i64) {
        self.by_topic.entry(topic.to_string()).or_default().insert(partition, Some(next));
    }

    /// Forgets everything (after a rebalance, ownership may have moved).
    pub fn clear(&mut self) {
        self.by_topic.clear();
    }

    /// Every known `(topic, partition, next offset)`.
    pub fn known(&self) -> impl Iterator<Item = (&str, i32, i64)> {
        self.by_topic.iter().flat_map(|(t, ps)| ps.iter().filter_map(move |(p, o)| o.map(|o| (t.as_str(), *p, o))))
    }
}

/// Whether a record at `offset` is already reflected in the state store, whose recorded next
/// offset for the partition is `stored_next`.
pub fn already_applied(offset: i64, stored_next: Option<i64>) -> bool {
    stored_next.is_some_and(|next| offset < next)
}

/// The next offset to consume per topic-partition after a batch: one past the highest offset
/// seen, whatever became of the record (scored, rejected or skipped).
pub fn next_offsets<'a>(records: impl IntoIterator<Item = (&'a str, i32, i64)>) -> BTreeMap<(String, i32), i64> {
    per_partition(records.into_iter().map(|(t, p, o)| (t, p, o + 1)), i64::max)
}

/// Lowers the next offsets of a batch (`next`, per topic-partition) to the first event the wave
/// cap deferred in each partition: those events are applied by a later batch, so the committed
/// offset must not pass them. (Applied events of other users beyond it are read again after a
/// restart and skipped by their users' fences.)
pub fn hold_at_deferred<'a>(next: &mut BTreeMap<(String, i32), i64>, deferred: impl IntoIterator<Item = (&'a str, i32, i64)>) {
    for ((topic, partition), first) in first_offsets(deferred) {
        next.entry((topic, partition)).and_modify(|o| *o = (*o).min(first)).or_insert(first);
    }
}

/// Whether the record at `offset` of `topic`-`partition` lies at or beyond the partition's next
/// offset in `next` (held back by a deferred event); a partition not in `next` holds nothing.
pub fn held(next: &BTreeMap<(String, i32), i64>, topic: &str, partition: i32, offset: i64) -> bool {
    next.iter().any(|((t, p), &n)| t == topic && *p == partition && offset >= n)
}

/// The first offset per topic-partition of `records`: where an aborted transaction that read
/// them rewinds to.
pub fn first_offsets<'a>(records: impl IntoIterator<Item = (&'a str, i32, i64)>) -> BTreeMap<(String, i32), i64> {
    per_partition(records, i64::min)
}

/// Folds offsets per topic-partition with `keep`.
fn per_partition<'a>(records: impl IntoIterator<Item = (&'a str, i32, i64)>, keep: fn(i64, i64) -> i64) -> BTreeMap<(String, i32), i64> {
    // Keyed by the borrowed name while folding: a name is allocated per partition, not per record.
    let mut folded: BTreeMap<(&str, i32), i64> = BTreeMap::new();
    for (topic, partition, offset) in records {
        folded.entry((topic, partition)).and_modify(|o| *o = keep(*o, offset)).or_insert(offset);
    }
    folded.into_iter().map(|((t, p), o)| ((t.to_string(), p), o)).collect()
}

/// How many offsets were lost to retention when a partition that should resume at `expected`
/// delivers `got` while its oldest retained offset is `low` (`None` when unknown): only offsets
/// below `low` count, since gaps above it are transaction markers, not lost records.
pub fn lost_to_retention(expected: i64, got: i64, low: Option<i64>) -> Option<u64> {
    let low = low?;
    (expected < low && got > expected).then(|| (low.min(got) - expected) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_offsets_below_the_low_watermark_are_lost() {
        // Resumed at 1,500 after retention moved the log start to 1,500: 500 records lost.
        assert_eq!(lost_to_retention(1_000, 1_500, Some(1_500)), Some(500));
        // `latest` jumped further than retention: only what retention deleted counts.
        assert_eq!(lost_to_retention(1_000, 9_000, Some(1_500)), Some(500));
        // A transaction marker at 1,000 and nothing deleted.
        assert_eq!(lost_to_retention(1_000, 1_001, Some(0)), None);
        assert_eq!(lost_to_retention(1_000, 1_500, None), None);
    }

    #[test]
    fn skips_only_what_the_store_holds() {
        assert!(!already_applied(0, None));
        assert!(already_applied(4, Some(5)));
        assert!(!already_applied(5, Some(5)));
    }

    #[test]
    fn applied_offsets_load_once_and_advance() {
        let mut a = AppliedOffsets::default();
        let mut loads = 0;
        for _ in 0..3 {
            let v = a.get_or_load::<()>("t", 1, || { loads += 1; Ok(Some(5)) }).unwrap();
            assert_eq!(v, Some(5));
        }
        assert_eq!(loads, 1);
        a.advance("t", 1, 9);
        assert_eq!(a.get_or_load::<()>("t", 1, || unreachable!()).unwrap(), Some(9));
        assert_eq!(a.get_or_load::<()>("t", 2, || Ok(None)).unwrap(), None);
        assert_eq!(a.known().collect::<Vec<_>>(), [("t", 1, 9)]);
        a.clear();
        assert_eq!(a.known().count(), 0);
    }

    #[test]
    fn deferred_events_hold_their_partition_back() {
        let mut next = next_offsets([("a", 0, 7), ("a", 1, 3), ("b", 0, 4)]);
        hold_at_deferred(&mut next, [("a", 0, 6), ("a", 0, 5), ("b", 0, 9)]);
        // a-0 waits for its first deferred event; a-1 has none; a deferral never moves one forward.
        assert_eq!(next, BTreeMap::from([(("a".to_string(), 0), 5), (("a".to_string(), 1), 4), (("b".to_string(), 0), 5)]));
        assert!(held(&next, "a", 0, 5) && held(&next, "a", 0, 6));
        assert!(!held(&next, "a", 0, 4) && !held(&next, "a", 1, 3) && !held(&next, "c", 0, 99));
    }

    #[test]
    fn next_offset_is_one_past_the_highest_per_partition() {
        let next = next_offsets([("a", 0, 7), ("a", 1, 3), ("a", 0, 9), ("b", 0, 0)]);
        let got: Vec<_> = next.into_iter().collect();
        assert_eq!(got, [(("a".into(), 0), 10), (("a".into(), 1), 4), (("b".into(), 0), 1)]);
    }
}
