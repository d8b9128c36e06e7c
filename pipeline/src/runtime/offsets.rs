//! Offset decisions of the runtime, as pure functions.

use std::collections::BTreeMap;

/// Whether a record at `offset` is already reflected in the state store, whose recorded next
/// offset for the partition is `stored_next`.
pub fn already_applied(offset: i64, stored_next: Option<i64>) -> bool {
    stored_next.is_some_and(|next| offset < next)
}

/// The next offset to consume per topic-partition after a batch: one past the highest offset
/// seen, whatever became of the record (scored, rejected or skipped).
pub fn next_offsets<'a>(records: impl IntoIterator<Item = (&'a str, i32, i64)>) -> BTreeMap<(String, i32), i64> {
    let mut next: BTreeMap<(String, i32), i64> = BTreeMap::new();
    for (topic, partition, offset) in records {
        let slot = next.entry((topic.to_string(), partition)).or_insert(offset + 1);
        *slot = (*slot).max(offset + 1);
    }
    next
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skips_only_what_the_store_holds() {
        assert!(!already_applied(0, None));
        assert!(already_applied(4, Some(5)));
        assert!(!already_applied(5, Some(5)));
    }

    #[test]
    fn next_offset_is_one_past_the_highest_per_partition() {
        let next = next_offsets([("a", 0, 7), ("a", 1, 3), ("a", 0, 9), ("b", 0, 0)]);
        let got: Vec<_> = next.into_iter().collect();
        assert_eq!(got, [(("a".into(), 0), 10), (("a".into(), 1), 4), (("b".into(), 0), 1)]);
    }
}
