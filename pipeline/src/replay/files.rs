//! File replays: Parquet or JSONL files and data-lake directories, merged in event-time order
//! through an external sort, validated by the same decoder as records on Kafka.

use crate::external_sort::{ExternalSort, Keyed};
use super::progress::Progress;
use super::{ReplayJob, Scorer};
use crate::output::Output;
use anyhow::{bail, Context, Result};
use intentflow_operators::PositionedEvent;
use intentflow_schemas::{EventDecoder, ScoredIntent, SourcePosition};
use std::path::{Path, PathBuf};

/// Replays event files (and the event files under directories) in event-time order, keeping
/// the events with `span.0 <= time < span.1`. The files are streamed into an external sort
/// (bounded by `--max-events-in-memory`), so their size is bounded by disk, not memory.
///
/// Order: by time, then file (as given), then row, the stable time order of all files' rows.
/// Positions: the file, and the event's index in the file's time order, so a row keeps its
/// position whatever the time window.
pub async fn replay_files(job: &ReplayJob, inputs: &[PathBuf], span: (i64, i64), scorer: &mut Scorer<'_>, output: &mut Output<'_, ScoredIntent>) -> Result<()> {
    let files = expand_inputs(inputs)?;
    let names: Vec<String> = files.iter().map(|p| file_name(p)).collect();
    let mut sort = ExternalSort::new(job.max_events_in_memory, job.spill_dir.as_deref().unwrap_or(&job.state_dir));
    let decoder = EventDecoder::new(job.limits);
    // Per file: valid events before the window (where its kept events start in its time order).
    let mut before = vec![0u64; files.len()];
    for (index, path) in files.iter().enumerate() {
        let (mut invalid, kept_from) = (0u64, sort.len());
        let mut pushed = Ok(());
        intentflow_formats::for_each_event(path, &decoder, |row, event| match event {
            Ok(e) if e.ts < span.0 => before[index] += 1,
            Ok(e) if e.ts >= span.1 => {}
            Ok(event) if pushed.is_ok() => pushed = sort.push(Keyed { file: index as u32, row: row as u64, event }),
            Ok(_) => {}
            Err(reason) => {
                invalid += 1;
                if invalid <= 10 {
                    tracing::warn!(file = %path.display(), row, %reason, "invalid event skipped");
                }
            }
        })?;
        pushed?;
        scorer.summary.invalid += invalid;
        let kept = sort.len() - kept_from;
        tracing::info!(file = %path.display(), kept, before_window = before[index], invalid, "file read");
        let range = if kept == 0 { (0, 0) } else { (before[index] as i64, (before[index] + kept) as i64) };
        scorer.summary.ranges.insert((names[index].clone(), 0), range);
    }
    if sort.runs() > 0 {
        // The buffer becomes the last run.
        tracing::info!(events = sort.len(), runs = sort.runs() + 1, "events exceed --max-events-in-memory: merging sorted runs from disk");
    }
    let progress = Progress::new(vec![("files".to_string(), sort.len())]);
    let mut next = before;
    let mut sorted = sort.sorted()?.peekable();
    while sorted.peek().is_some() {
        let chunk: Vec<PositionedEvent> = sorted
            .by_ref()
            .take(job.max_batch_records.max(1))
            .map(|keyed| {
                let Keyed { file, event, .. } = keyed?;
                let offset = &mut next[file as usize];
                *offset += 1;
                Ok(PositionedEvent { source: SourcePosition { topic: names[file as usize].as_str().into(), partition: 0, offset: *offset as i64 - 1 }, event })
            })
            .collect::<Result<_>>()?;
        let intents = scorer.score(&chunk, [])?;
        output.write(intents).await?;
        progress.advance(0, chunk.len() as u64);
    }
    progress.finish();
    Ok(())
}

/// The event files named by `inputs`: files as given, directories searched recursively for
/// `*.parquet`, `*.jsonl`, `*.ndjson` and `*.json` (hidden and `_`-prefixed entries, such as
/// `_SUCCESS`, skipped), in path order.
fn expand_inputs(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("reading directory {}", dir.display()))?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()?;
        entries.sort();
        for path in entries {
            let name = file_name(&path);
            if name.starts_with('.') || name.starts_with('_') {
                continue;
            }
            if path.is_dir() {
                walk(&path, out)?;
            } else if path.extension().and_then(|e| e.to_str()).is_some_and(|e| ["parquet", "jsonl", "ndjson", "json"].contains(&e.to_ascii_lowercase().as_str())) {
                out.push(path);
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    for input in inputs {
        if input.is_dir() {
            let before = files.len();
            walk(input, &mut files)?;
            if files.len() == before {
                bail!("{} holds no event files (*.parquet, *.jsonl, *.ndjson, *.json)", input.display());
            }
        } else {
            files.push(input.clone());
        }
    }
    Ok(files)
}

fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_expand_to_their_event_files_in_path_order() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["b/2.jsonl", "b/1.parquet", "a.ndjson", "_SUCCESS", ".hidden.jsonl", "b/notes.txt", "_tmp/x.jsonl"] {
            let path = dir.path().join(f);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, b"").unwrap();
        }
        let single = dir.path().join("b/notes.txt");
        let got = expand_inputs(&[dir.path().to_path_buf(), single.clone()]).unwrap();
        let want: Vec<PathBuf> = ["a.ndjson", "b/1.parquet", "b/2.jsonl"].iter().map(|f| dir.path().join(f)).chain([single]).collect();
        assert_eq!(got, want, "files given by name are taken as they are");
        let empty = tempfile::tempdir().unwrap();
        assert!(expand_inputs(&[empty.path().to_path_buf()]).unwrap_err().to_string().contains("holds no event files"));
    }
}
