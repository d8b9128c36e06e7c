//! The order of one partition's records across co-partitioned input topics.
//!
//! With several input topics (say `views` and `carts`, both keyed by user), a user's events of
//! one partition arrive on several topic-partitions, and the order in which a consumer happens to
//! fetch them is not reproducible. [`TopicMerge`] fixes one: records are released in order of
//! `(timestamp, topic index, offset)` of the queue heads, and only while every topic either has a
//! record waiting or is known to have nothing more to give (at its end). That is the rule of
//! Kafka Streams' timestamp synchronisation, and the one a replay applies to the same ranges, so
//! the live operator and a replay apply a user's events in the same order whenever the data was
//! already there. A record arriving later with an older timestamp than records already released
//! is applied when it arrives; the caller decides how long a partition waits for a topic that is
//! not at its end ([`TopicMerge::release_all`] after a timeout).
//!
//! Within one topic the order is always the offset order.

use std::collections::VecDeque;

struct Pending<R> {
    timestamp: i64,
    offset: i64,
    record: R,
}

/// Buffered records of one partition, one queue per input topic (by index in the configured
/// topic list).
pub struct TopicMerge<R> {
    queues: Vec<VecDeque<Pending<R>>>,
}

impl<R> TopicMerge<R> {
    /// A merge of `topics` topics (at least one).
    pub fn new(topics: usize) -> TopicMerge<R> {
        TopicMerge { queues: (0..topics.max(1)).map(|_| VecDeque::new()).collect() }
    }

    /// Buffers a record of topic `topic`; records of one topic must come in offset order.
    ///
    /// # Panics
    ///
    /// If `topic` is not below the number of topics.
    pub fn push(&mut self, topic: usize, timestamp: i64, offset: i64, record: R) {
        self.queues[topic].push_back(Pending { timestamp, offset, record });
    }

    /// Records buffered.
    pub fn len(&self) -> usize {
        self.queues.iter().map(VecDeque::len).sum()
    }

    /// Whether nothing is buffered.
    pub fn is_empty(&self) -> bool {
        self.queues.iter().all(VecDeque::is_empty)
    }

    /// The topic whose empty queue holds the others back, if one does: it has no record buffered
    /// and `at_end` does not say it is at its end.
    pub fn blocked_on(&self, at_end: impl Fn(usize) -> bool) -> Option<usize> {
        if self.is_empty() {
            return None;
        }
        (0..self.queues.len()).find(|&t| self.queues[t].is_empty() && !at_end(t))
    }

    /// Moves records to `out` in merge order for as long as no topic holds the others back
    /// ([`TopicMerge::blocked_on`]); returns how many moved.
    pub fn release(&mut self, at_end: impl Fn(usize) -> bool, out: &mut Vec<R>) -> usize {
        let mut moved = 0;
        while self.blocked_on(&at_end).is_none() {
            let Some(next) = self.head() else { break };
            out.push(self.queues[next].pop_front().expect("the head's queue is not empty").record);
            moved += 1;
        }
        moved
    }

    /// Moves every buffered record to `out` in merge order, waiting for no topic (after the
    /// caller's idle timeout).
    pub fn release_all(&mut self, out: &mut Vec<R>) -> usize {
        self.release(|_| true, out)
    }

    /// The first buffered offset of each topic that has records buffered, as `(topic, offset)`,
    /// and forgets everything buffered: what to seek back to when the buffered records will not
    /// be processed (an aborted transaction).
    pub fn clear(&mut self) -> Vec<(usize, i64)> {
        let firsts = self.queues.iter().enumerate().filter_map(|(t, q)| q.front().map(|p| (t, p.offset))).collect();
        self.queues.iter_mut().for_each(VecDeque::clear);
        firsts
    }

    /// The topic whose head comes first: smallest timestamp, then topic index (offsets of
    /// different topics do not compare).
    fn head(&self) -> Option<usize> {
        (0..self.queues.len()).filter(|&t| !self.queues[t].is_empty()).min_by_key(|&t| (self.queues[t][0].timestamp, t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn waits_for_a_topic_that_is_not_at_its_end() {
        let mut m = TopicMerge::new(2);
        m.push(0, 10, 0, "a10");
        m.push(0, 30, 1, "a30");
        let mut out = Vec::new();
        assert_eq!(m.release(|_| false, &mut out), 0, "topic 1 may still deliver something older");
        assert_eq!(m.blocked_on(|_| false), Some(1));
        m.push(1, 20, 0, "b20");
        m.release(|_| false, &mut out);
        assert_eq!(out, ["a10", "b20"], "stops when topic 1 runs dry again");
        m.release(|t| t == 1, &mut out);
        assert_eq!(out, ["a10", "b20", "a30"]);
        assert!(m.is_empty());
    }

    #[test]
    fn ties_go_to_the_first_topic_and_clear_reports_where_to_rewind() {
        let mut m = TopicMerge::new(3);
        m.push(2, 5, 40, "c");
        m.push(1, 5, 7, "b");
        m.push(0, 5, 9, "a");
        m.push(1, 6, 8, "b2");
        let mut out = Vec::new();
        m.release(|_| true, &mut out);
        assert_eq!(out, ["a", "b", "c", "b2"]);
        m.push(0, 1, 10, "x");
        m.push(2, 1, 41, "y");
        assert_eq!(m.clear(), [(0, 10), (2, 41)]);
        assert!(m.is_empty());
    }

    proptest! {
        /// However the records of two topics arrive (any interleaving of the two offset-ordered
        /// streams, released whenever possible), the order released equals one merge of the
        /// complete streams: the live operator and a replay agree.
        #[test]
        fn release_order_does_not_depend_on_arrival(
            a in proptest::collection::vec(0i64..50, 0..40),
            b in proptest::collection::vec(0i64..50, 0..40),
            arrival in proptest::collection::vec(any::<bool>(), 0..80),
        ) {
            let streams = [a, b];
            let reference = {
                let mut m = TopicMerge::new(2);
                for (t, s) in streams.iter().enumerate() {
                    for (o, ts) in s.iter().enumerate() {
                        m.push(t, *ts, o as i64, (t, o));
                    }
                }
                let mut out = Vec::new();
                m.release_all(&mut out);
                out
            };
            let mut m = TopicMerge::new(2);
            let mut next = [0usize, 0];
            let mut out = Vec::new();
            let mut turns = arrival.into_iter();
            while next[0] < streams[0].len() || next[1] < streams[1].len() {
                let pick = turns.next().unwrap_or(false);
                let t = if next[usize::from(pick)] < streams[usize::from(pick)].len() { usize::from(pick) } else { usize::from(!pick) };
                m.push(t, streams[t][next[t]], next[t] as i64, (t, next[t]));
                next[t] += 1;
                m.release(|t| next[t] == streams[t].len(), &mut out);
            }
            m.release(|_| true, &mut out);
            prop_assert_eq!(out, reference);
        }
    }
}
