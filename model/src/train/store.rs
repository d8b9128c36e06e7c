//! Labelled sessions and training batches on disk, so that training holds neither the events nor
//! the training split in memory.
//!
//! * [`SessionsBuilder`] takes one user's events at a time (in time order), cuts them into
//!   labelled sessions ([`user_sessions`]) and appends each to a spill file; what stays in memory
//!   is the session's start time, place in the file and length (24 bytes a session).
//! * [`SessionSet`] maps the file and orders the sessions by start time (ties in the order they
//!   were added: by user, as [`labelled_sessions`](super::labelled_sessions) orders them), which
//!   the split cuts; a session is decoded when it is read.
//! * [`TrainBatches`] writes the training split's padded, length-bucketed batches to a second
//!   file once, shared by every cell and member; a step decodes its batch from the mapping.
//!
//! Both files live in one temporary directory, removed when the set is dropped. The operating
//! system pages the mappings in and out: a training split larger than memory is read from disk
//! each epoch instead of failing.

use super::labels::{by_user, user_sessions};
use super::{LabelHorizon, LabelledSession, SplitSpec};
use crate::{FeatureSpec, Features, ModelError, FEATURE_DIM};
use intentflow_schemas::Event;
use memmap2::Mmap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

/// Bytes of one event in the session file before its aggregates: the dense features, four
/// buckets, the label and the mask.
const EVENT_BYTES: usize = FEATURE_DIM * 4 + 4 * 4 + 2 * 4;

/// Creates a spill file, readable too (it is mapped once written).
fn create(path: &Path) -> Result<File, ModelError> {
    std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(path).map_err(io(path))
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::Io { path: path.to_path_buf(), source }
}

/// Maps a finished file (flushed: the page cache serves the mapping), `None` when empty (an
/// empty file cannot be mapped).
fn map(file: &File, path: &Path) -> Result<Option<Mmap>, ModelError> {
    if file.metadata().map_err(io(path))?.len() == 0 {
        return Ok(None);
    }
    // SAFETY: the file is private to this process (a fresh temporary directory), complete and
    // never written again while the mapping lives, so the mapped bytes cannot change under it.
    Ok(Some(unsafe { Mmap::map(file) }.map_err(io(path))?))
}

/// Little-endian reader over a mapped record.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let (head, rest) = self.0.split_at(N);
        self.0 = rest;
        head.try_into().expect("N bytes")
    }
    fn f32(&mut self) -> f32 {
        f32::from_le_bytes(self.take())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
}

/// Where a session lies in the spill file.
#[derive(Debug, Clone, Copy)]
struct Place {
    start_ms: i64,
    offset: u64,
    events: u32,
    aggregates: u32,
}

/// Writes labelled sessions to a spill file one user at a time.
pub struct SessionsBuilder {
    dir: tempfile::TempDir,
    /// The spill file in `dir`.
    path: PathBuf,
    out: BufWriter<File>,
    spec: FeatureSpec,
    horizon: LabelHorizon,
    places: Vec<Place>,
    written: u64,
    events: usize,
    buffer: Vec<LabelledSession>,
}

impl SessionsBuilder {
    /// A builder spilling under a new temporary directory in `parent`, featurising with `spec`
    /// (its normalisation is not applied) and labelling for `horizon`.
    ///
    /// # Errors
    ///
    /// If the directory or its file cannot be created.
    pub fn create(parent: &Path, spec: &FeatureSpec, horizon: LabelHorizon) -> Result<SessionsBuilder, ModelError> {
        std::fs::create_dir_all(parent).map_err(io(parent))?;
        let dir = tempfile::Builder::new().prefix("train-spill-").tempdir_in(parent).map_err(io(parent))?;
        let path = dir.path().join("sessions.bin");
        let file = create(&path)?;
        Ok(SessionsBuilder { dir, path, out: BufWriter::with_capacity(1 << 20, file), spec: spec.clone(), horizon, places: Vec::new(), written: 0, events: 0, buffer: Vec::new() })
    }

    /// Adds one user's events, in time order (equal times in input order).
    ///
    /// # Errors
    ///
    /// If the spill file cannot be written.
    pub fn add_user(&mut self, events: &[Event]) -> Result<(), ModelError> {
        let indexed: Vec<(usize, &Event)> = events.iter().enumerate().map(|(k, e)| (self.events + k, e)).collect();
        self.add_indexed(&indexed)
    }

    /// [`SessionsBuilder::add_user`] with each event's input index.
    fn add_indexed(&mut self, events: &[(usize, &Event)]) -> Result<(), ModelError> {
        self.buffer.clear();
        user_sessions(events, &self.spec, self.horizon, &mut self.buffer);
        self.events += events.len();
        for s in &self.buffer {
            let width = s.aggregates.first().map_or(0, Vec::len);
            let mut bytes = Vec::with_capacity(s.features.len() * (EVENT_BYTES + width * 8));
            for (j, f) in s.features.iter().enumerate() {
                f.dense.iter().for_each(|v| bytes.extend_from_slice(&v.to_le_bytes()));
                for b in [f.item, f.category, f.brand, f.top_category] {
                    bytes.extend_from_slice(&b.to_le_bytes());
                }
                bytes.extend_from_slice(&s.labels[j].to_le_bytes());
                bytes.extend_from_slice(&s.mask[j].to_le_bytes());
                s.aggregates[j].iter().for_each(|v| bytes.extend_from_slice(&v.to_le_bytes()));
            }
            self.out.write_all(&bytes).map_err(io(&self.path))?;
            self.places.push(Place { start_ms: s.start_ms, offset: self.written, events: s.features.len() as u32, aggregates: width as u32 });
            self.written += bytes.len() as u64;
        }
        Ok(())
    }

    /// Events added so far.
    pub fn events(&self) -> usize {
        self.events
    }

    /// Finishes the file and orders the sessions by start time.
    ///
    /// # Errors
    ///
    /// If the file cannot be flushed or mapped.
    pub fn finish(self) -> Result<SessionSet, ModelError> {
        let path = self.path;
        let file = self.out.into_inner().map_err(|e| ModelError::Io { path: path.clone(), source: e.into_error() })?;
        let map = map(&file, &path)?;
        let mut places = self.places;
        // Stable: equal start times keep the order they were added in.
        places.sort_by_key(|p| p.start_ms);
        Ok(SessionSet { map, places, dir: self.dir })
    }
}

/// Labelled sessions on disk, sorted by start time.
pub struct SessionSet {
    map: Option<Mmap>,
    places: Vec<Place>,
    dir: tempfile::TempDir,
}

impl SessionSet {
    /// Cuts `events` into labelled sessions (as [`labelled_sessions`](super::labelled_sessions)
    /// does) spilled under `parent`.
    ///
    /// # Errors
    ///
    /// If the spill cannot be written.
    pub fn of_events(events: &[Event], spec: &FeatureSpec, horizon: LabelHorizon, parent: &Path) -> Result<SessionSet, ModelError> {
        let mut builder = SessionsBuilder::create(parent, spec, horizon)?;
        for user in by_user(events) {
            builder.add_indexed(&user)?;
        }
        builder.finish()
    }

    /// Number of sessions.
    pub fn len(&self) -> usize {
        self.places.len()
    }

    /// Whether there are no sessions.
    pub fn is_empty(&self) -> bool {
        self.places.is_empty()
    }

    /// Events in session `i` (in start-time order).
    pub fn events_in(&self, i: usize) -> usize {
        self.places[i].events as usize
    }

    /// Session `i` (in start-time order), decoded; its `events` indices are not kept.
    pub fn get(&self, i: usize) -> LabelledSession {
        let p = self.places[i];
        let (n, width) = (p.events as usize, p.aggregates as usize);
        let map = self.map.as_deref().unwrap_or_default();
        let mut r = Bytes(&map[p.offset as usize..p.offset as usize + n * (EVENT_BYTES + width * 8)]);
        let mut s = LabelledSession { start_ms: p.start_ms, features: Vec::with_capacity(n), labels: Vec::with_capacity(n), mask: Vec::with_capacity(n), aggregates: Vec::with_capacity(n), events: Vec::new() };
        for _ in 0..n {
            let mut dense = [0f32; FEATURE_DIM];
            dense.iter_mut().for_each(|v| *v = r.f32());
            let (item, category, brand, top_category) = (r.u32(), r.u32(), r.u32(), r.u32());
            s.features.push(Features { dense, item, category, brand, top_category });
            s.labels.push(r.f32());
            s.mask.push(r.f32());
            s.aggregates.push((0..width).map(|_| f64::from_le_bytes(r.take())).collect());
        }
        s
    }

    /// The sessions of `range` (in start-time order), decoded one at a time.
    pub fn iter(&self, range: Range<usize>) -> impl Iterator<Item = LabelledSession> + '_ {
        range.map(|i| self.get(i))
    }

    /// Index ranges (train, validation, test) of `split`.
    pub fn ranges(&self, split: &SplitSpec) -> [Range<usize>; 3] {
        split.ranges(self.len())
    }

    /// The directory the spill files live in.
    pub(super) fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// The sessions of one part of a split, read from disk when iterated.
#[derive(Clone)]
pub(super) struct Split<'a> {
    pub(super) set: &'a SessionSet,
    pub(super) range: Range<usize>,
}

impl Split<'_> {
    /// The sessions, decoded one at a time.
    pub(super) fn iter(&self) -> impl Iterator<Item = LabelledSession> + '_ {
        self.set.iter(self.range.clone())
    }

    /// Number of sessions.
    pub(super) fn len(&self) -> usize {
        self.range.len()
    }
}

/// Where one padded batch lies in the batch file.
#[derive(Debug, Clone, Copy)]
struct BatchPlace {
    offset: usize,
    rows: usize,
    steps: usize,
}

/// The training split as padded, length-bucketed batches in a file: built once, read by every
/// member of every cell.
pub(super) struct TrainBatches {
    map: Option<Mmap>,
    places: Vec<BatchPlace>,
    /// The file, of its own name (a set may be trained on more than once), deleted when dropped
    /// (after the mapping, declared before it).
    _file: tempfile::NamedTempFile,
}

/// One padded batch in host memory: dense inputs `(B, T, D)`, the four buckets, labels and loss
/// weights `(B, T)`.
pub(super) struct HostBatch {
    pub(super) rows: usize,
    pub(super) steps: usize,
    pub(super) x: Vec<f32>,
    pub(super) items: Vec<u32>,
    pub(super) categories: Vec<u32>,
    pub(super) brands: Vec<u32>,
    pub(super) tops: Vec<u32>,
    pub(super) y: Vec<f32>,
    pub(super) w: Vec<f32>,
}

impl HostBatch {
    /// Pads `sessions` to their longest (at most `max_len` steps), normalised by `spec`, with
    /// positive labels weighted `pos_weight`.
    pub(super) fn of(sessions: &[&LabelledSession], spec: &FeatureSpec, max_len: usize, pos_weight: f32) -> HostBatch {
        let t = sessions.iter().map(|s| s.features.len().min(max_len)).max().unwrap_or(1).max(1);
        let b = sessions.len();
        let mut batch = HostBatch {
            rows: b,
            steps: t,
            x: vec![0f32; b * t * FEATURE_DIM],
            items: vec![0u32; b * t],
            categories: vec![0u32; b * t],
            brands: vec![0u32; b * t],
            tops: vec![0u32; b * t],
            y: vec![0f32; b * t],
            w: vec![0f32; b * t],
        };
        for (i, s) in sessions.iter().enumerate() {
            for j in 0..s.features.len().min(t) {
                let k = i * t + j;
                let row = spec.normalize(&s.features[j]);
                batch.x[k * FEATURE_DIM..(k + 1) * FEATURE_DIM].copy_from_slice(&row.dense);
                batch.items[k] = row.item;
                batch.categories[k] = row.category;
                (batch.brands[k], batch.tops[k]) = (row.brand, row.top_category);
                batch.y[k] = s.labels[j];
                batch.w[k] = s.mask[j] * if s.labels[j] > 0.5 { pos_weight } else { 1.0 };
            }
        }
        batch
    }

    fn bytes(rows: usize, steps: usize) -> usize {
        rows * steps * (FEATURE_DIM + 6) * 4
    }

    fn write(&self, out: &mut impl Write) -> std::io::Result<()> {
        let mut bytes = Vec::with_capacity(HostBatch::bytes(self.rows, self.steps));
        self.x.iter().chain(&self.y).chain(&self.w).for_each(|v| bytes.extend_from_slice(&v.to_le_bytes()));
        [&self.items, &self.categories, &self.brands, &self.tops].into_iter().flatten().for_each(|v| bytes.extend_from_slice(&v.to_le_bytes()));
        out.write_all(&bytes)
    }

    fn read(bytes: &[u8], rows: usize, steps: usize) -> HostBatch {
        let n = rows * steps;
        let mut r = Bytes(bytes);
        let mut f32s = |len: usize| (0..len).map(|_| r.f32()).collect::<Vec<f32>>();
        let (x, y, w) = (f32s(n * FEATURE_DIM), f32s(n), f32s(n));
        let mut u32s = |len: usize| (0..len).map(|_| r.u32()).collect::<Vec<u32>>();
        let (items, categories, brands, tops) = (u32s(n), u32s(n), u32s(n), u32s(n));
        HostBatch { rows, steps, x, items, categories, brands, tops, y, w }
    }
}

impl TrainBatches {
    /// Sorts the sessions of `range` by length (stable) and writes them as batches of
    /// `batch_size` into `sessions`' directory.
    pub(super) fn write(sessions: &SessionSet, range: Range<usize>, spec: &FeatureSpec, batch_size: usize, max_len: usize, pos_weight: f32) -> Result<TrainBatches, ModelError> {
        let dir = sessions.dir();
        let mut named = tempfile::Builder::new().prefix("batches-").tempfile_in(dir).map_err(io(dir))?;
        let path = named.path().to_path_buf();
        let mut out = BufWriter::with_capacity(1 << 20, named.as_file_mut());
        // Length buckets: sessions of similar length share a batch, so little is padding.
        let mut by_len: Vec<usize> = range.collect();
        by_len.sort_by_key(|&i| sessions.events_in(i));
        let mut places = Vec::with_capacity(by_len.len().div_ceil(batch_size.max(1)));
        let mut offset = 0;
        for chunk in by_len.chunks(batch_size.max(1)) {
            let decoded: Vec<LabelledSession> = chunk.iter().map(|&i| sessions.get(i)).collect();
            let batch = HostBatch::of(&decoded.iter().collect::<Vec<_>>(), spec, max_len, pos_weight);
            batch.write(&mut out).map_err(io(&path))?;
            places.push(BatchPlace { offset, rows: batch.rows, steps: batch.steps });
            offset += HostBatch::bytes(batch.rows, batch.steps);
        }
        out.flush().map_err(io(&path))?;
        drop(out);
        Ok(TrainBatches { map: map(named.as_file(), &path)?, places, _file: named })
    }

    /// Number of batches.
    pub(super) fn len(&self) -> usize {
        self.places.len()
    }

    /// Batch `k`, read back.
    pub(super) fn get(&self, k: usize) -> HostBatch {
        let p = self.places[k];
        let map = self.map.as_deref().unwrap_or_default();
        HostBatch::read(&map[p.offset..p.offset + HostBatch::bytes(p.rows, p.steps)], p.rows, p.steps)
    }
}
