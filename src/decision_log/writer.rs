//! The writer: one task that owns the chain. It drains the queue in
//! batches, numbers and hashes each record, has the batch appended to the
//! spool (one write, one fsync: group commit), then releases durable waiters
//! and tells the shipper how far the spool goes.
//!
//! The task runs on the decision runtime and chains a few records per turn,
//! so its work interleaves with decisions instead of holding a core for a
//! whole batch; every blocking call (write, fsync, renames, the NDJSON copy)
//! is made by its [`Disk`] thread, so no runtime worker ever waits on a disk.

use std::io::{self, Write};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};

use super::chain;
use super::record;
use super::spool::{Head, Spool};
use super::{Overflow, Queued, Settings, Shared};

/// Records chained per turn of the writer task: about 30 µs of hashing, so
/// a decision waits at most that long behind it.
const CHAIN_PER_TURN: usize = 32;

pub(super) struct Writer {
    pub rx: mpsc::Receiver<Queued>,
    pub disk: Disk,
    /// The bytes every body of this instance starts with.
    pub body_start: record::BodyStart,
    pub head: Head,
    pub shared: Arc<Shared>,
    pub settings: Settings,
    pub spooled: watch::Sender<u64>,
    pub stop: watch::Receiver<bool>,
    /// When a `dropped` marker was last written while the spool was full.
    pub last_marker: Option<Instant>,
    /// The optional OTLP exporter's queue.
    pub otlp: Option<mpsc::Sender<super::otlp::Lines>>,
}

impl Writer {
    /// Writes until closed; returns once the disk thread has closed the
    /// spool too, so a spool closed by `Running::close` can be opened again
    /// at once.
    pub async fn run(mut self) {
        let closed = self.disk.closed.take();
        self.write_until_closed().await;
        if let Some(closed) = closed {
            let _ = closed.await;
        }
    }

    async fn write_until_closed(mut self) {
        let mut batch: Vec<Queued> = Vec::with_capacity(self.settings.batch_max);
        let mut lines = Vec::new();
        let mut last_write = Instant::now();
        loop {
            let mut stop = self.stop.clone();
            // Once told to stop, the next turn is the last, however much is
            // queued: under load the queue never runs dry.
            let first = if self.stopping() {
                None
            } else {
                tokio::select! {
                    biased;
                    q = self.rx.recv() => q,
                    _ = stop.wait_for(|s| *s) => None,
                }
            };
            let closing = first.is_none();
            if closing {
                // Before the last drain, so a record sent after it is
                // refused instead of answered and then lost with the queue.
                self.rx.close();
            }
            batch.extend(first);
            // Gathering only while a batch has room: with a full batch
            // already queued, sleeping would cap the rate the writer keeps
            // up with at one batch per interval.
            if !closing
                && self.settings.durability == super::Durability::Buffered
                && !self.settings.batch_interval.is_zero()
                && self.rx.len() + 1 < self.settings.batch_max
            {
                // Gather for one batch interval: one write and one fsync for
                // everything that arrives meanwhile.
                let until = last_write + self.settings.batch_interval;
                let mut stop = self.stop.clone();
                tokio::select! {
                    () = tokio::time::sleep_until(until.into()) => {}
                    _ = stop.wait_for(|s| *s) => {}
                }
            }
            while batch.len() < self.settings.batch_max || closing {
                match self.rx.try_recv() {
                    Ok(q) => batch.push(q),
                    Err(_) => break,
                }
            }
            self.shared.metrics.queued.set(self.rx.len() as i64);
            if !closing && !self.room_for(&mut batch).await {
                // Put the loss on the record now (at most every 10 s while
                // full, so markers cannot fill the disk), not only once
                // room returns: a crash in between would hide it.
                if self
                    .last_marker
                    .is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
                {
                    self.last_marker = Some(Instant::now());
                    let Some(back) = self.write(&mut batch, lines).await else {
                        return;
                    };
                    lines = back;
                }
                continue;
            }
            let Some(back) = self.write(&mut batch, lines).await else {
                return;
            };
            lines = back;
            last_write = Instant::now();
            if closing {
                return;
            }
        }
    }

    /// Whether the trail is shutting down: told so, or its `Running` was
    /// dropped without `close` (a closed channel never says `true`, and
    /// waiting on it returns at once: loops on it would spin).
    fn stopping(&self) -> bool {
        *self.stop.borrow() || self.stop.has_changed().is_err()
    }

    /// Applies the overflow policy while the spool is at its cap. False if
    /// the batch was dropped.
    async fn room_for(&mut self, batch: &mut Vec<Queued>) -> bool {
        let cap = self.settings.max_spool_bytes;
        // Not while every spooled record is acknowledged and all that is
        // left is the segment being written: that one is released only once
        // the next starts (it would stay at the cap for good). Keyed on the
        // bytes left, not the acknowledgement alone, so a release that keeps
        // failing still holds the spool at its cap.
        let spooled = self.head.seq;
        let full = || {
            let bytes = self.shared.spool_bytes.load(Ordering::Relaxed);
            bytes >= cap
                && (self.shared.acked.load(Ordering::Relaxed) < spooled
                    || bytes > self.shared.spool_live.get().1)
        };
        if !full() {
            self.shared.full_logged.store(false, Ordering::Relaxed);
            return true;
        }
        if !self.shared.full_logged.swap(true, Ordering::Relaxed) {
            tracing::error!(
                cap_bytes = cap,
                overflow = ?self.settings.overflow,
                "decision log spool is full (the control plane has not acknowledged records for a while)"
            );
        }
        match self.settings.overflow {
            Overflow::Drop => {
                let n = batch.len() as u64;
                self.shared.dropped.fetch_add(n, Ordering::Relaxed);
                self.shared.metrics.dropped.inc_by(n);
                for q in batch.drain(..) {
                    if let Some(done) = q.done {
                        let _ = done.send(false);
                    }
                }
                false
            }
            Overflow::Block => {
                // Hold the batch until the shipper frees room; the queue
                // fills behind it and the decision path refuses after its
                // block timeout. On shutdown the batch is written anyway.
                let mut stop = self.stop.clone();
                while full() && !self.stopping() {
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(10)) => {}
                        _ = stop.wait_for(|s| *s) => {}
                    }
                }
                true
            }
        }
    }

    /// Chains the batch into `lines` and has it spooled; gives the buffer
    /// back for the next batch, or `None` once nothing can be written any
    /// more (the disk thread is gone, or the spool kept failing at
    /// shutdown): the writer ends, and with it the queue, so decisions that
    /// need a record are refused.
    async fn write(&mut self, batch: &mut Vec<Queued>, mut lines: Vec<u8>) -> Option<Vec<u8>> {
        lines.clear();
        let first_seq = self.head.seq + 1;
        let mut head = self.head;
        let start = &self.body_start;
        let mut push = |tail: &[u8], lines: &mut Vec<u8>| {
            let seq = head.seq + 1;
            let hash = chain::append_next(lines, &head.hash, |out| start.write(seq, tail, out));
            head = Head { seq, hash };
        };
        let dropped = self.shared.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            push(&record::dropped_tail(dropped), &mut lines);
        }
        // The further behind, the longer the turns (32,768 records queued:
        // 1,024 a turn), so a writer sharing a saturated runtime catches up
        // instead of letting the queue fill.
        let per_turn = CHAIN_PER_TURN.max(self.rx.len() / 32);
        for (i, q) in batch.iter().enumerate() {
            push(&q.tail, &mut lines);
            if i % per_turn == per_turn - 1 {
                tokio::task::yield_now().await;
            }
        }
        if lines.is_empty() {
            return Some(lines);
        }
        // A spool that cannot be written is retried, never skipped: the
        // queue backs up behind it and the overflow policy applies.
        let mut failing_since: Option<Instant> = None;
        loop {
            let Ok((back, result)) = self.disk.append(lines, first_seq).await else {
                tracing::error!(
                    "decision log: the disk thread stopped; no more records can be written, decisions that need one are refused"
                );
                self.shared.writer_failed.store(true, Ordering::Relaxed);
                self.lose(batch, dropped);
                return None;
            };
            lines = back;
            match result {
                Ok(()) => break,
                Err(e) => {
                    if failing_since.is_none() {
                        tracing::error!("decision log: cannot write the spool: {e}; retrying");
                        failing_since = Some(Instant::now());
                    }
                    if self.stopping()
                        && failing_since.is_some_and(|t| t.elapsed() > Duration::from_secs(2))
                    {
                        // And on the queue: the head stays where it was, so
                        // a later batch would take this one's seqs and be
                        // written over whatever part of it reached the disk.
                        self.rx.close();
                        while let Ok(q) = self.rx.try_recv() {
                            batch.push(q);
                        }
                        self.shared.metrics.queued.set(0);
                        tracing::error!(
                            "decision log: giving up on {} records at shutdown",
                            batch.len()
                        );
                        self.lose(batch, dropped);
                        return None;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        self.head = head;
        let n = batch.len() as u64 + u64::from(dropped > 0);
        if let Some(otlp) = &self.otlp
            && otlp
                .try_send(bytes::Bytes::copy_from_slice(&lines))
                .is_err()
        {
            // The exporter is behind: this copy is best effort.
            self.shared.metrics.otlp_dropped.inc_by(n);
        }
        self.shared.metrics.spooled.inc_by(n);
        self.shared
            .metrics
            .spool_bytes
            .set(self.shared.spool_bytes.load(Ordering::Relaxed) as i64);
        self.spooled.send_replace(self.head.seq);
        for q in batch.drain(..) {
            if let Some(done) = q.done {
                let _ = done.send(true);
            }
            self.shared.reuse(q.tail);
        }
        Some(lines)
    }
}

/// Tells the batch's durable waiters that their records were not written.
impl Writer {
    /// A batch that will not be written (or whose write was never
    /// confirmed). Records of answered decisions count as dropped, with the
    /// earlier losses the batch was to put on record (kept for a later
    /// batch, if one can still be written); `durable` decisions waiting for
    /// theirs are refused.
    fn lose(&self, batch: &mut Vec<Queued>, dropped: u64) {
        let answered = batch.iter().filter(|q| q.done.is_none()).count() as u64;
        self.shared.metrics.dropped.inc_by(answered);
        self.shared
            .dropped
            .fetch_add(dropped + answered, Ordering::Relaxed);
        fail(batch);
    }
}

fn fail(batch: &mut Vec<Queued>) {
    for q in batch.drain(..) {
        if let Some(done) = q.done {
            let _ = done.send(false);
        }
    }
}

/// The writer's thread for blocking calls, at a low CPU priority: it owns
/// the spool and the NDJSON copy. It ends when its `Disk` is dropped.
pub(super) struct Disk {
    jobs: std::sync::mpsc::Sender<Append>,
    /// Told once the thread has dropped the spool (and its lock).
    closed: Option<oneshot::Receiver<()>>,
}

struct DiskGone;

struct Append {
    lines: Vec<u8>,
    first_seq: u64,
    reply: oneshot::Sender<(Vec<u8>, io::Result<()>)>,
}

impl Disk {
    pub fn start(
        mut spool: Spool,
        mut copy: Option<Box<dyn Write + Send>>,
        fsync: bool,
        write_time: crate::telemetry::AtomicHistogram,
    ) -> io::Result<Self> {
        let (jobs, appends) = std::sync::mpsc::channel::<Append>();
        let (closing, closed) = oneshot::channel();
        std::thread::Builder::new()
            .name("decision-log-disk".into())
            .spawn(move || {
                super::background_priority(super::WRITER_NICE);
                for job in appends {
                    let start = Instant::now();
                    let result = spool.append(&job.lines, job.first_seq, fsync);
                    write_time.observe(start.elapsed());
                    if result.is_ok()
                        && let Some(copy) = &mut copy
                        && let Err(e) = copy.write_all(&job.lines).and_then(|()| copy.flush())
                    {
                        tracing::warn!("decision log: cannot write the NDJSON copy: {e}");
                    }
                    let _ = job.reply.send((job.lines, result));
                }
                drop(spool);
                drop(copy);
                let _ = closing.send(());
            })?;
        Ok(Self {
            jobs,
            closed: Some(closed),
        })
    }

    /// Appends whole lines to the spool (see [`Spool::append`]), and on
    /// success to the copy; gives the buffer back with the result. `Err`:
    /// the thread is gone (it panicked), and the lines with it.
    async fn append(
        &self,
        lines: Vec<u8>,
        first_seq: u64,
    ) -> Result<(Vec<u8>, io::Result<()>), DiskGone> {
        let (reply, result) = oneshot::channel();
        let job = Append {
            lines,
            first_seq,
            reply,
        };
        self.jobs.send(job).map_err(|_| DiskGone)?;
        result.await.map_err(|_| DiskGone)
    }
}
