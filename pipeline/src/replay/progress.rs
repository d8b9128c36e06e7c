//! Progress of a replay: bars on a terminal, log lines otherwise.

use std::time::{Duration, Instant};

/// Progress of a replay, per source partition (or for all files): on a terminal, the bar of the
/// partition being read (events/s, ETA) above a bar for the whole replay, and a line per
/// finished partition; otherwise a log line every 5 s and one per finished partition.
pub struct Progress {
    parts: Vec<(String, u64)>,
    /// Sum of the parts' lengths.
    all: u64,
    multi: Option<indicatif::MultiProgress>,
    total: Option<indicatif::ProgressBar>,
    /// The part being read: its index, bar and records read.
    current: std::cell::RefCell<Option<(usize, indicatif::ProgressBar, u64)>>,
    last_log: std::cell::Cell<Instant>,
    done: std::cell::Cell<u64>,
    started: Instant,
    /// When the current part began: the previous part's end (or the start), so that a part's time
    /// includes reading and scoring its first batch.
    part_started: std::cell::Cell<Instant>,
}

impl Progress {
    /// `parts`: each partition's label and number of offsets (or events) to read, in read order.
    pub fn new(parts: Vec<(String, u64)>) -> Progress {
        let all: u64 = parts.iter().map(|(_, n)| n).sum();
        let multi = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(indicatif::MultiProgress::new);
        let total = multi.as_ref().map(|m| {
            let bar = m.add(Self::bar(all));
            bar.set_prefix("all");
            bar
        });
        let now = Instant::now();
        use std::cell::Cell;
        Progress { parts, all, multi, total, current: Default::default(), last_log: Cell::new(now), done: Cell::new(0), started: now, part_started: Cell::new(now) }
    }

    fn bar(len: u64) -> indicatif::ProgressBar {
        let bar = indicatif::ProgressBar::new(len);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{prefix:>24} [{bar:30}] {human_pos}/{human_len} {rate} ETA {eta}")
                .expect("valid template")
                .with_key("rate", |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| write!(w, "{:.0} events/s", state.per_sec()).unwrap_or_default()),
        );
        bar
    }

    /// Records `n` more records read from part `index`.
    pub fn advance(&self, index: usize, n: u64) {
        let mut current = self.current.borrow_mut();
        if current.as_ref().is_none_or(|(i, ..)| *i != index) {
            self.close(current.take());
            let bar = match &self.multi {
                Some(m) => m.insert(0, Self::bar(self.parts[index].1)),
                None => indicatif::ProgressBar::hidden(),
            };
            bar.set_prefix(self.parts[index].0.clone());
            *current = Some((index, bar, 0));
        }
        let (_, bar, read) = current.as_mut().expect("set above");
        bar.inc(n);
        *read += n;
        self.done.set(self.done.get() + n);
        if let Some(total) = &self.total {
            total.inc(n);
        } else if self.last_log.get().elapsed() > Duration::from_secs(5) {
            let (label, len) = &self.parts[index];
            let rate = self.done.get() as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
            let eta = (self.all.saturating_sub(self.done.get())) as f64 / rate.max(1e-9);
            tracing::info!(partition = %label, read = *read, of = len, total_read = self.done.get(), total = self.all, rate = rate.round(), eta_s = eta.round(), "replay progress");
            self.last_log.set(Instant::now());
        }
    }

    fn close(&self, part: Option<(usize, indicatif::ProgressBar, u64)>) {
        let Some((index, bar, read)) = part else { return };
        bar.finish_and_clear();
        let seconds = self.part_started.get().elapsed().as_secs_f64();
        self.part_started.set(Instant::now());
        let line = format!("{}: {read} records in {seconds:.1} s ({:.0}/s)", self.parts[index].0, read as f64 / seconds.max(1e-9));
        match &self.multi {
            Some(m) => m.println(line).unwrap_or_default(),
            None => tracing::info!(partition = %self.parts[index].0, records = read, seconds, "replay partition done"),
        }
    }

    pub fn finish(&self) {
        self.close(self.current.borrow_mut().take());
        if let Some(total) = &self.total {
            total.finish_and_clear();
        }
    }
}
