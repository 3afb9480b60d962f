//! What FAL tells of a request before it ends: its place in the queue and its log lines.
//!
//! Read for the clients who follow a job's stream, and only while one does. However many
//! streams of a process follow a request, one reader asks FAL for its status (with `logs=1`)
//! every so often; each stream takes from what was read the lines it has not yet sent. The
//! reader stops when FAL says the request completed, or when no stream follows it any more.

use super::client::FalClient;
use super::wire::{LogEntry, QueueState, QueueStatus};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use uuid::Uuid;

/// Log lines kept per request: the last ones. A stream that fell further behind skips the
/// older ones, and is told how many.
const MOST_LINES: usize = 1_000;

/// The longest log message kept, in bytes; a longer one is cut.
const LONGEST_MESSAGE: usize = 4_096;

/// The longest wait between two asks once FAL's answers fail.
const LONGEST_WAIT: Duration = Duration::from_secs(30);

/// What has been read of a request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Progress {
    /// FAL's word for the request; `None` until its first answer.
    pub state: Option<QueueState>,
    /// Its place in FAL's queue (0 is next) while it waits there.
    pub queue_position: Option<u64>,
    /// The last log lines read (at most [`MOST_LINES`]).
    pub lines: Vec<LogLine>,
    /// How many log lines were read in all: the first of `lines` is line number
    /// `lines_read - lines.len()` (counted from 0).
    pub lines_read: usize,
}

/// One line of a request's log, as FAL gave it (every part of it is optional at FAL).
#[derive(Debug, Clone, PartialEq)]
pub struct LogLine {
    pub timestamp: Option<String>,
    pub level: Option<String>,
    pub message: String,
}

impl From<LogEntry> for LogLine {
    fn from(entry: LogEntry) -> Self {
        let mut message = entry.message.unwrap_or_default();
        if message.len() > LONGEST_MESSAGE {
            let mut end = LONGEST_MESSAGE;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
        }
        Self {
            timestamp: entry.timestamp,
            level: entry.level,
            message,
        }
    }
}

impl Progress {
    /// Takes in one status answer; whether anything changed.
    pub fn absorb(&mut self, status: QueueStatus) -> bool {
        let before = (self.state.clone(), self.queue_position, self.lines_read);
        self.queue_position = status
            .queue_position
            .filter(|_| status.status == QueueState::InQueue);
        self.state = Some(status.status);
        let lines = status.logs.unwrap_or_default();
        self.take_lines(lines.into_iter().map(LogLine::from).collect());
        before != (self.state.clone(), self.queue_position, self.lines_read)
    }

    /// FAL's polled status is understood to carry all of a request's lines so far, and each
    /// message of its status stream only the new ones; neither is confirmed, so both are
    /// taken: lines that begin with those already read are the whole log, and only their tail
    /// is new. Otherwise every line is new.
    fn take_lines(&mut self, lines: Vec<LogLine>) {
        let kept_from = self.lines_read - self.lines.len();
        let whole_log =
            lines.len() >= self.lines_read && lines[kept_from..self.lines_read] == self.lines[..];
        let new: Vec<LogLine> = if whole_log {
            lines.into_iter().skip(self.lines_read).collect()
        } else {
            lines
        };
        self.lines_read += new.len();
        self.lines.extend(new);
        let excess = self.lines.len().saturating_sub(MOST_LINES);
        self.lines.drain(..excess);
    }

    /// The lines from line number `from` on (those still kept), and how many before them were
    /// dropped unread.
    pub fn lines_from(&self, from: usize) -> (&[LogLine], usize) {
        let kept_from = self.lines_read - self.lines.len();
        let start = from.clamp(kept_from, self.lines_read);
        (&self.lines[start - kept_from..], start.saturating_sub(from))
    }
}

/// The requests being read, by job.
pub struct ProgressReader {
    fal: FalClient,
    every: Duration,
    readings: Mutex<HashMap<Uuid, Reading>>,
    next_number: AtomicU64,
}

struct Reading {
    /// Tells a reader that stopped whether the entry is still its own.
    number: u64,
    progress: watch::Sender<Progress>,
}

impl ProgressReader {
    /// Reads each followed request every `every`.
    pub fn new(fal: FalClient, every: Duration) -> Arc<Self> {
        Arc::new(Self {
            fal,
            every,
            readings: Mutex::default(),
            next_number: AtomicU64::new(0),
        })
    }

    /// What FAL tells of `job`'s request (at `status_url`), as it is read. The reading starts
    /// with the first follower and stops after the last is dropped; the channel closes when
    /// FAL says the request completed.
    pub fn follow(self: &Arc<Self>, job: Uuid, status_url: &str) -> watch::Receiver<Progress> {
        let mut readings = self.lock();
        if let Some(reading) = readings.get(&job)
            && !reading.progress.is_closed()
        {
            return reading.progress.subscribe();
        }
        let (progress, receiver) = watch::channel(Progress::default());
        let number = self.next_number.fetch_add(1, Ordering::Relaxed);
        readings.insert(
            job,
            Reading {
                number,
                progress: progress.clone(),
            },
        );
        tokio::spawn(
            self.clone()
                .read(job, number, status_url.to_owned(), progress),
        );
        receiver
    }

    /// How many requests are being read.
    pub fn reading(&self) -> usize {
        self.lock().len()
    }

    async fn read(
        self: Arc<Self>,
        job: Uuid,
        number: u64,
        status_url: String,
        progress: watch::Sender<Progress>,
    ) {
        let mut wait = self.every;
        loop {
            let answer = tokio::select! {
                answer = self.fal.status(&status_url, true) => answer,
                () = progress.closed() => break,
            };
            match answer {
                Ok(status) => {
                    wait = self.every;
                    let completed = status.status == QueueState::Completed;
                    progress.send_if_modified(|read| read.absorb(status));
                    if completed {
                        break;
                    }
                }
                Err(error) => {
                    // The job's outcome does not depend on this; its stream goes on without.
                    tracing::debug!(%job, %error, "FAL's status of a followed job was not read");
                    wait = (wait * 2).min(LONGEST_WAIT.max(self.every));
                }
            }
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = progress.closed() => break,
            }
        }
        let mut readings = self.lock();
        if readings.get(&job).is_some_and(|r| r.number == number) {
            readings.remove(&job);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Reading>> {
        // The map stays whole whatever panicked while holding it.
        self.readings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(state: &str, position: Option<u64>, lines: &[&str]) -> QueueStatus {
        serde_json::from_value(serde_json::json!({
            "status": state,
            "queue_position": position,
            "logs": lines.iter().map(|m| serde_json::json!({"message": m, "timestamp": "t"})).collect::<Vec<_>>(),
        }))
        .unwrap()
    }

    fn messages(progress: &Progress, from: usize) -> Vec<String> {
        let (lines, _) = progress.lines_from(from);
        lines.iter().map(|l| l.message.clone()).collect()
    }

    #[test]
    fn a_whole_log_each_time_adds_only_its_new_lines() {
        let mut progress = Progress::default();
        assert!(progress.absorb(status("IN_QUEUE", Some(2), &[])));
        assert_eq!(progress.queue_position, Some(2));
        assert!(!progress.absorb(status("IN_QUEUE", Some(2), &[])));
        assert!(progress.absorb(status("IN_PROGRESS", None, &["a"])));
        assert_eq!(progress.queue_position, None);
        assert!(progress.absorb(status("IN_PROGRESS", None, &["a", "b", "c"])));
        assert!(!progress.absorb(status("IN_PROGRESS", None, &["a", "b", "c"])));
        assert_eq!(messages(&progress, 0), ["a", "b", "c"]);
        assert_eq!(messages(&progress, 1), ["b", "c"]);
        assert_eq!(progress.lines_read, 3);
    }

    #[test]
    fn new_lines_only_each_time_are_all_kept() {
        let mut progress = Progress::default();
        progress.absorb(status("IN_PROGRESS", None, &["a"]));
        progress.absorb(status("IN_PROGRESS", None, &["b"]));
        progress.absorb(status("IN_PROGRESS", None, &[]));
        progress.absorb(status("COMPLETED", None, &["c", "d"]));
        assert_eq!(messages(&progress, 0), ["a", "b", "c", "d"]);
    }

    #[test]
    fn only_the_last_lines_are_kept_and_a_late_reader_is_told_what_it_missed() {
        let mut progress = Progress::default();
        let lines: Vec<String> = (0..MOST_LINES + 10).map(|n| n.to_string()).collect();
        let names: Vec<&str> = lines.iter().map(String::as_str).collect();
        progress.absorb(status("IN_PROGRESS", None, &names));
        assert_eq!(progress.lines.len(), MOST_LINES);
        let (kept, missed) = progress.lines_from(3);
        assert_eq!(missed, 7);
        assert_eq!(kept[0].message, "10");
        // The whole log again, with one more line: one new line.
        let mut more = names.clone();
        more.push("last");
        progress.absorb(status("IN_PROGRESS", None, &more));
        assert_eq!(progress.lines_read, MOST_LINES + 11);
        assert_eq!(messages(&progress, MOST_LINES + 10), ["last"]);
        assert_eq!(progress.lines_from(MOST_LINES + 11).0.len(), 0);
    }

    #[test]
    fn a_long_message_is_cut_at_a_character_boundary() {
        let long = "é".repeat(LONGEST_MESSAGE);
        let line = LogLine::from(LogEntry {
            message: Some(long),
            ..LogEntry::default()
        });
        assert!(line.message.len() <= LONGEST_MESSAGE);
        assert!(line.message.chars().all(|c| c == 'é'));
    }
}
