//! Event-time order for file replays, and user order for training, in bounded memory: an
//! external merge sort.
//!
//! Events are buffered up to a limit; a full buffer is sorted and spilled to a run file (JSON
//! lines) under a temporary directory, and the runs are merged at the end (in groups of 256 first
//! when there are more, to bound the open files). Every event is keyed by its time, its file and
//! its row in the file ([`SortOrder::Time`]), or by its user first ([`SortOrder::User`]): a
//! total order, so the result is the same whatever the limit: the stable time order of the
//! files' rows taken in the order given (per user, for the user order).

use anyhow::{Context, Result};
use intentflow_schemas::{Event, Text};
use std::cmp::Ordering;
use serde::{Deserialize, Serialize};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Lines, Write};
use std::path::{Path, PathBuf};

/// An event of input file `file` (its index among the inputs) at `row`, its place in the file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Keyed {
    /// Index of the file among the replay's inputs.
    pub file: u32,
    /// Row of the event in its file.
    pub row: u64,
    /// The event.
    pub event: Event,
}

/// What events are sorted by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortOrder {
    /// Time, then file, then row.
    Time,
    /// User id, then time, file and row: each user's events together, in time order.
    User,
}

/// A merge key: the user (empty in time order), time, file and row.
type Key = (Text, i64, u32, u64);

impl Keyed {
    fn key(&self, order: SortOrder) -> Key {
        let user = if order == SortOrder::User { self.event.user_id.clone() } else { Text::default() };
        (user, self.event.ts, self.file, self.row)
    }

    /// The order of two events, without building keys.
    fn cmp_in(&self, other: &Keyed, order: SortOrder) -> Ordering {
        let user = if order == SortOrder::User { self.event.user_id.cmp(&other.event.user_id) } else { Ordering::Equal };
        user.then_with(|| (self.event.ts, self.file, self.row).cmp(&(other.event.ts, other.file, other.row)))
    }
}

/// Runs merged at once: more are first merged in groups of this many into longer runs, so the
/// open files stay well under the usual limit of 1,024 per process.
const FAN_IN: usize = 256;

/// Collects events in any order and gives them back in [`SortOrder`], holding at most
/// `limit` of them in memory.
pub struct ExternalSort {
    order: SortOrder,
    limit: usize,
    fan_in: usize,
    spill_parent: PathBuf,
    spill: Option<tempfile::TempDir>,
    buffer: Vec<Keyed>,
    runs: Vec<PathBuf>,
    /// Run files written, for unique names.
    written: usize,
    len: u64,
}

impl ExternalSort {
    /// A sort by time holding at most `limit` events in memory; runs go to a temporary directory
    /// under `spill_parent`, made on the first spill and removed when the sorted events are
    /// dropped.
    pub fn new(limit: usize, spill_parent: &Path) -> ExternalSort {
        ExternalSort::by(SortOrder::Time, limit, spill_parent)
    }

    /// [`ExternalSort::new`] in `order`.
    pub fn by(order: SortOrder, limit: usize, spill_parent: &Path) -> ExternalSort {
        ExternalSort {
            order,
            limit: limit.max(1),
            fan_in: FAN_IN,
            spill_parent: spill_parent.to_path_buf(),
            spill: None,
            buffer: Vec::new(),
            runs: Vec::new(),
            written: 0,
            len: 0,
        }
    }

    /// Adds one event, first spilling the buffer if it is full (so exactly `limit` events
    /// never spill).
    ///
    /// # Errors
    ///
    /// If a run cannot be written.
    pub fn push(&mut self, event: Keyed) -> Result<()> {
        if self.buffer.len() >= self.limit {
            self.spill_buffer()?;
        }
        self.buffer.push(event);
        self.len += 1;
        Ok(())
    }

    /// Events added so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Run files written so far; once there is one, the buffer becomes one more at the merge.
    pub fn runs(&self) -> usize {
        self.written
    }

    fn spill_buffer(&mut self) -> Result<()> {
        let order = self.order;
        self.buffer.sort_unstable_by(|a, b| a.cmp_in(b, order));
        let events = std::mem::take(&mut self.buffer);
        self.write_run(events.into_iter().map(Ok))
    }

    /// Writes sorted events as the next run file.
    fn write_run(&mut self, events: impl Iterator<Item = Result<Keyed>>) -> Result<()> {
        if self.spill.is_none() {
            std::fs::create_dir_all(&self.spill_parent).with_context(|| format!("creating {}", self.spill_parent.display()))?;
            let dir = tempfile::Builder::new().prefix("sort-spill-").tempdir_in(&self.spill_parent);
            self.spill = Some(dir.with_context(|| format!("creating a spill directory under {}", self.spill_parent.display()))?);
        }
        let dir = self.spill.as_ref().map(tempfile::TempDir::path).expect("made above");
        let path = dir.join(format!("run-{:05}.jsonl", self.written));
        let mut out = BufWriter::with_capacity(1 << 20, File::create(&path).with_context(|| format!("creating {}", path.display()))?);
        for event in events {
            serde_json::to_writer(&mut out, &event?)?;
            out.write_all(b"\n")?;
        }
        out.flush().with_context(|| format!("writing {}", path.display()))?;
        self.runs.push(path);
        self.written += 1;
        Ok(())
    }

    /// The events in the sort's order.
    ///
    /// # Errors
    ///
    /// If a run cannot be written, opened or read.
    pub fn sorted(mut self) -> Result<Sorted> {
        if self.runs.is_empty() {
            let order = self.order;
            self.buffer.sort_unstable_by(|a, b| a.cmp_in(b, order));
            return Ok(Sorted::Memory(self.buffer.into_iter()));
        }
        if !self.buffer.is_empty() {
            self.spill_buffer()?;
        }
        // The key is a total order, so runs merge the same in any grouping.
        while self.runs.len() > self.fan_in {
            let group: Vec<PathBuf> = self.runs.drain(..self.fan_in).collect();
            self.write_run(Merge::open(&group, self.order, None)?)?;
            for path in group {
                std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            }
        }
        Ok(Sorted::Merge(Merge::open(&self.runs, self.order, self.spill.take())?))
    }
}

/// Sorted events: from memory when they fitted, else merged from the run files.
pub enum Sorted {
    /// Everything fitted in memory.
    Memory(std::vec::IntoIter<Keyed>),
    /// A k-way merge of spilled runs.
    Merge(Merge),
}

/// A k-way merge of sorted run files; removes the runs' directory, if it owns it, when dropped.
pub struct Merge {
    runs: Vec<Lines<BufReader<File>>>,
    /// The next event of each run.
    heads: Vec<Option<Keyed>>,
    order: SortOrder,
    heap: BinaryHeap<Reverse<(Key, usize)>>,
    _dir: Option<tempfile::TempDir>,
}

impl Merge {
    fn open(paths: &[PathBuf], order: SortOrder, dir: Option<tempfile::TempDir>) -> Result<Merge> {
        let mut runs = Vec::with_capacity(paths.len());
        for path in paths {
            let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
            runs.push(BufReader::with_capacity(1 << 16, file).lines());
        }
        let mut merge = Merge { runs, heads: Vec::new(), order, heap: BinaryHeap::new(), _dir: dir };
        for run in 0..merge.runs.len() {
            let head = merge.next_of(run)?;
            merge.heads.push(head);
        }
        Ok(merge)
    }

    /// Reads the next event of `run` and queues its key.
    fn next_of(&mut self, run: usize) -> Result<Option<Keyed>> {
        let Some(line) = self.runs[run].next() else { return Ok(None) };
        let event: Keyed = serde_json::from_str(&line.context("reading a spilled run")?).context("decoding a spilled run")?;
        self.heap.push(Reverse((event.key(self.order), run)));
        Ok(Some(event))
    }

    fn pop(&mut self) -> Result<Option<Keyed>> {
        let Some(Reverse((_, run))) = self.heap.pop() else { return Ok(None) };
        let next = self.next_of(run)?;
        Ok(std::mem::replace(&mut self.heads[run], next))
    }
}

impl Iterator for Merge {
    type Item = Result<Keyed>;

    fn next(&mut self) -> Option<Result<Keyed>> {
        self.pop().transpose()
    }
}

impl Iterator for Sorted {
    type Item = Result<Keyed>;

    fn next(&mut self) -> Option<Result<Keyed>> {
        match self {
            Sorted::Memory(events) => events.next().map(Ok),
            Sorted::Merge(merge) => merge.next(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use intentflow_schemas::EventType;
    use proptest::prelude::*;

    fn keyed(file: u32, row: u64, ts: i64) -> Keyed {
        let event = Event {
            user_id: format!("u{row}").into(),
            ts,
            kind: EventType::View,
            event_id: Some(format!("{file}/{row}").into()),
            session_id: None,
            item_id: None,
            category: None,
            category_id: None,
            brand: None,
            price: Some(0.1 + row as f64),
            quantity: None,
        };
        Keyed { file, row, event }
    }

    fn sort(events: &[Keyed], limit: usize, fan_in: usize, dir: &Path) -> (Vec<Keyed>, usize) {
        sort_by(SortOrder::Time, events, limit, fan_in, dir)
    }

    fn sort_by(order: SortOrder, events: &[Keyed], limit: usize, fan_in: usize, dir: &Path) -> (Vec<Keyed>, usize) {
        let mut sort = ExternalSort::by(order, limit, dir);
        sort.fan_in = fan_in;
        events.iter().cloned().for_each(|e| sort.push(e).unwrap());
        let runs = sort.runs();
        (sort.sorted().unwrap().collect::<Result<Vec<_>>>().unwrap(), runs)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(40))]
        /// Spilled or not, and however many runs are merged at once, the result is the stable
        /// time order of the input (files in order, rows in file order), events unchanged.
        #[test]
        fn any_limit_gives_the_stable_time_order(times in prop::collection::vec(0i64..20, 0..300), limit in 1usize..50, fan_in in 2usize..6) {
            let dir = tempfile::tempdir().unwrap();
            // Rows of three files, in file order; times collide often.
            let events: Vec<Keyed> = times.iter().enumerate().map(|(i, ts)| keyed((i * 3 / times.len().max(1)) as u32, i as u64, *ts)).collect();
            let mut expected = events.clone();
            expected.sort_by_key(|k| k.event.ts);
            let (got, runs) = sort(&events, limit, fan_in, dir.path());
            prop_assert_eq!(runs, events.len().saturating_sub(1) / limit);
            prop_assert_eq!(got, expected);
            // The runs' directory is gone once the merge is dropped.
            prop_assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(30))]
        /// In user order, spilled or not: each user's events together (users by id), in the
        /// stable time order of the files' rows.
        #[test]
        fn any_limit_gives_the_stable_user_then_time_order(rows in prop::collection::vec((0u8..6, 0i64..10), 0..300), limit in 1usize..50, fan_in in 2usize..6) {
            let dir = tempfile::tempdir().unwrap();
            let events: Vec<Keyed> = rows
                .iter()
                .enumerate()
                .map(|(i, &(user, ts))| {
                    let mut k = keyed((i * 2 / rows.len().max(1)) as u32, i as u64, ts);
                    // Long ids too (past the 24 bytes a Text keeps inline).
                    k.event.user_id = format!("user-{user}-{}", "x".repeat(usize::from(user) * 8)).into();
                    k
                })
                .collect();
            let mut expected = events.clone();
            expected.sort_by(|a, b| a.event.user_id.cmp(&b.event.user_id).then(a.event.ts.cmp(&b.event.ts)));
            let (got, _) = sort_by(SortOrder::User, &events, limit, fan_in, dir.path());
            prop_assert_eq!(got, expected);
        }
    }

    #[test]
    fn a_corrupt_run_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let mut sort = ExternalSort::new(2, dir.path());
        (0..6).for_each(|i| sort.push(keyed(0, i, 10 - i as i64)).unwrap());
        let spill = std::fs::read_dir(dir.path()).unwrap().next().unwrap().unwrap().path();
        std::fs::write(spill.join("run-00001.jsonl"), "{not json\n").unwrap();
        let err = sort.sorted().and_then(|s| s.collect::<Result<Vec<_>>>()).unwrap_err();
        assert!(format!("{err:#}").contains("decoding a spilled run"), "{err:#}");
    }
}
