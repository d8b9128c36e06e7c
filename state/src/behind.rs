//! A store written one batch behind: each batch's states go to RocksDB on a thread of their own
//! while the caller scores the next batch.
//!
//! For a single writer with no transaction to wait for (`intentflow replay`, the in-process
//! bench); the live operator does the same for its commits with its own bookkeeping. The next
//! batch reads the states still being written through [`WriteBehind::view`], so what it reads
//! is what a serial write would have left, and writes land one at a time, in order.

use crate::{StagedView, Staged, StateError, StateStore};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Writes staged batches to a store on a thread of its own, one at a time, in order.
pub struct WriteBehind {
    store: Arc<StateStore>,
    /// The batch being written, if any.
    in_flight: Option<Arc<Staged>>,
    /// The writer thread (one for the writer's life, so its allocations stay in one heap), its
    /// batches and its outcomes; started by the first write.
    writer: Option<Writer>,
    /// Read over when nothing is staged for the next batch.
    empty: Staged,
    /// A written batch's overlay, cleared: handed out again for its allocations.
    spare: Staged,
}

struct Writer {
    batches: Sender<Arc<Staged>>,
    written: Receiver<Result<(), StateError>>,
    thread: JoinHandle<()>,
}

impl WriteBehind {
    /// Writes to `store`.
    pub fn new(store: Arc<StateStore>) -> WriteBehind {
        WriteBehind { store, in_flight: None, writer: None, empty: Staged::default(), spare: Staged::default() }
    }

    /// The store as the next batch reads it: the batch being written over RocksDB.
    pub fn view(&self) -> StagedView<'_> {
        StagedView { store: &self.store, staged: &self.empty, committing: self.in_flight.as_deref() }
    }

    /// An empty overlay for the next batch's states and offsets (one written before, cleared,
    /// when there is one).
    pub fn next_batch(&mut self) -> Staged {
        std::mem::take(&mut self.spare)
    }

    /// Writes `staged` on the writer thread ([`StateStore::commit_staged`]) once the write
    /// before it is done.
    ///
    /// # Errors
    ///
    /// The write before it failed (this one is then not started), or the thread could not be
    /// started.
    ///
    /// # Panics
    ///
    /// With the writer thread's panic, if it panicked.
    pub fn write(&mut self, staged: Staged) -> Result<(), StateError> {
        self.wait()?;
        let writer = match &mut self.writer {
            Some(w) => w,
            None => self.writer.insert(Writer::start(self.store.clone())?),
        };
        let staged = Arc::new(staged);
        if writer.batches.send(staged.clone()).is_err() {
            // The thread is gone: only a panic ends it early.
            Self::stopped(self.writer.take().expect("matched above"));
        }
        self.in_flight = Some(staged);
        Ok(())
    }

    /// Waits for the write in flight, if any: everything handed over is in RocksDB on success.
    ///
    /// # Errors
    ///
    /// That write failed.
    ///
    /// # Panics
    ///
    /// With the writer thread's panic, if it panicked.
    pub fn wait(&mut self) -> Result<(), StateError> {
        let Some(staged) = self.in_flight.take() else { return Ok(()) };
        let writer = self.writer.as_ref().expect("a write in flight has a writer");
        let Ok(written) = writer.written.recv() else { Self::stopped(self.writer.take().expect("matched above")) };
        if let Ok(mut spare) = Arc::try_unwrap(staged) {
            spare.clear();
            self.spare = spare;
        }
        written
    }

    /// Passes on the panic that ended the writer thread.
    fn stopped(writer: Writer) -> ! {
        match writer.thread.join() {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(()) => unreachable!("the writer thread runs until its batches' sender is dropped"),
        }
    }

    /// The store written to.
    pub fn store(&self) -> &StateStore {
        &self.store
    }
}

impl Writer {
    fn start(store: Arc<StateStore>) -> Result<Writer, StateError> {
        let (batches, inbox) = channel::<Arc<Staged>>();
        let (outcome, written) = channel();
        let thread = std::thread::Builder::new()
            .name("state-writer".into())
            .spawn(move || {
                for staged in inbox {
                    let result = store.commit_staged(&staged);
                    // The overlay goes back before the outcome, so the caller can reuse it.
                    drop(staged);
                    if outcome.send(result).is_err() {
                        return;
                    }
                }
            })
            .map_err(StateError::Writer)?;
        Ok(Writer { batches, written, thread })
    }
}

impl Drop for WriteBehind {
    /// A write in flight lands before the store can be closed (its outcome is the caller's to
    /// have asked for with [`WriteBehind::wait`]); the thread ends.
    fn drop(&mut self) {
        if let Some(writer) = self.writer.take() {
            let Writer { batches, written, thread } = writer;
            drop(batches);
            drop(written);
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{StateRead, StoreOptions, UserState};

    const USERS: [&str; 10] = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"];

    fn state(events: u32) -> Vec<u8> {
        let mut s = UserState::default();
        s.session.events = events;
        s.encode()
    }

    fn events(loaded: Vec<crate::Loaded>) -> Vec<Option<u32>> {
        loaded.into_iter().map(|l| l.state().map(|s| s.session.events)).collect()
    }

    /// Each batch reads what the batches before it wrote, landed or not, and once the last
    /// write is waited for RocksDB holds every batch's states and offsets.
    #[test]
    fn each_batch_reads_the_last_ones_states_and_every_write_lands_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = WriteBehind::new(Arc::new(StateStore::open(dir.path(), StoreOptions::default()).unwrap()));
        let keys: Vec<(i32, &str)> = USERS.iter().enumerate().map(|(i, u)| (i as i32 % 3, *u)).collect();
        for batch in 1..=50u32 {
            // USERS are written by every batch, `u<100 + batch>` by this one alone.
            let before = (batch > 1).then_some(batch - 1);
            assert_eq!(events(w.view().get_many(keys.iter().copied()).unwrap()), vec![before; USERS.len()], "batch {batch}");
            let mut staged = w.next_batch();
            assert!(staged.is_empty());
            for &(p, u) in &keys {
                staged.put_user(p, u, state(batch));
            }
            staged.put_user(0, &format!("u{}", 100 + batch), state(batch));
            staged.put_offset("t".into(), 0, i64::from(batch));
            w.write(staged).unwrap();
        }
        w.wait().unwrap();
        let store = w.store();
        assert_eq!(store.offset("t", 0).unwrap(), Some(50));
        assert_eq!(events(store.get_many([(0, "a"), (1, "b"), (0, "u101"), (0, "u150"), (1, "a")]).unwrap()), [Some(50), Some(50), Some(1), Some(50), None]);
    }
}
