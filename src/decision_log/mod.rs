//! The decision trail: one record per decision, masked, hash-chained,
//! spooled to disk and shipped to the control plane without loss.
//!
//! ```text
//! decision path ──try_send──▶ bounded queue ──▶ writer task ──▶ disk thread ──▶ spool segments ──▶ shipper ──gRPC──▶ control plane
//!   (no lock, no I/O)                       number, hash     append, fsync    (released only once    (batches, LZ4,
//!                                           (a few per turn)  per batch        acknowledged)          ack by seq)
//! ```
//!
//! Durability: `buffered` answers at once (a `kill -9` loses the records not
//! yet written: one batch interval's, 10 ms by default, while the writer
//! keeps up; up to the queue's capacity while it is behind or held at the
//! spool cap);
//! `durable` answers once the record is in the spool (fsynced). At the spool
//! cap, `block` (the default) refuses decisions it cannot record after a short
//! wait, `drop` keeps deciding and writes a `dropped` marker into the chain.

pub mod chain;
pub mod mask;
pub mod otlp;
pub mod record;
pub mod shipper;
pub mod spool;
pub mod time;
mod writer;

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::{mpsc, oneshot, watch};

pub use mask::MaskRules;
pub use record::Entry;

use crate::decision::{DecisionSink, Handoff};
use crate::telemetry::DecisionLogMetrics;

/// When a decision's answer may leave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Durability {
    /// At once; the record follows within one write cycle.
    #[default]
    Buffered,
    /// Only once its record is fsynced to the spool.
    Durable,
}

/// What happens when records cannot be kept (spool at its cap, or queue full).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Overflow {
    /// Wait up to the block timeout, then refuse the decision (UNAVAILABLE):
    /// no decision goes unrecorded.
    #[default]
    Block,
    /// Keep deciding; count the lost records and mark the loss in the chain.
    Drop,
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub spool_dir: PathBuf,
    pub durability: Durability,
    pub overflow: Overflow,
    pub max_spool_bytes: u64,
    pub segment_bytes: u64,
    pub block_timeout: Duration,
    pub queue_capacity: usize,
    pub batch_max: usize,
    /// `buffered`: how long the writer gathers records before a write.
    pub batch_interval: Duration,
    pub fsync: bool,
    /// Also write every chained line here (`-` = stdout), for local use.
    pub copy_to: Option<PathBuf>,
    /// Also export records (and spans of traced calls) to this OTLP/gRPC
    /// collector, e.g. `http://127.0.0.1:4317`.
    pub otlp_endpoint: Option<String>,
}

/// What the queue carries: a record without its chain position, and in
/// durable mode who waits for it.
pub(crate) struct Queued {
    tail: Vec<u8>,
    done: Option<oneshot::Sender<bool>>,
}

/// State the sink, writer and shipper share.
pub(crate) struct Shared {
    metrics: DecisionLogMetrics,
    /// Records lost to `drop` since the last marker.
    dropped: AtomicU64,
    spool_bytes: Arc<AtomicU64>,
    /// Every record up to this seq is acknowledged (set by the shipper).
    acked: Arc<AtomicU64>,
    /// The segment being written.
    spool_live: Arc<spool::Live>,
    full_logged: AtomicBool,
    /// Set when the writer stopped for good (its disk thread is gone, or it
    /// panicked).
    writer_failed: AtomicBool,
    /// Record buffers the writer is done with, for the decision path to
    /// fill again: no allocation per record, none freed across threads.
    spare: crossbeam_channel::Receiver<Vec<u8>>,
    spare_return: crossbeam_channel::Sender<Vec<u8>>,
}

/// Most record buffers kept for reuse, and the largest one kept.
const SPARE_BUFFERS: usize = 1024;
const SPARE_MAX_BYTES: usize = 4096;

impl Shared {
    /// Gives a written record's buffer back for the next record.
    fn reuse(&self, mut buffer: Vec<u8>) {
        if buffer.capacity() <= SPARE_MAX_BYTES {
            buffer.clear();
            let _ = self.spare_return.try_send(buffer);
        }
    }
}

/// The sink the decision path hands records to.
pub struct DecisionLog {
    tx: mpsc::Sender<Queued>,
    settings: Settings,
    shared: Arc<Shared>,
}

/// The running trail: what shutdown and the shipper need.
pub struct Running {
    pub instance: String,
    pub spool_dir: PathBuf,
    pub spool_bytes: Arc<AtomicU64>,
    pub spool_live: Arc<spool::Live>,
    /// The last spooled seq.
    pub spooled: watch::Receiver<u64>,
    pub metrics: DecisionLogMetrics,
    /// Every record up to this seq is acknowledged: the shipper says so,
    /// and the writer does not hold batches at the cap for a spool whose
    /// every record is (its newest segment is never released).
    pub acked: Arc<AtomicU64>,
    /// The spool's lock, for whatever works on the spool after the writer
    /// (the shipper releasing segments): a second sidecar stays out until
    /// every holder is done.
    pub spool_lock: Arc<std::fs::File>,
    stop: watch::Sender<bool>,
    writer: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Writes what is queued, then stops the writer.
    pub async fn close(self) {
        let _ = self.stop.send(true);
        let _ = self.writer.await;
    }
}

/// Opens the spool (recovering after a crash) and starts the writer.
pub fn start(
    settings: Settings,
    metrics: DecisionLogMetrics,
) -> std::io::Result<(Arc<DecisionLog>, Running)> {
    let copy: Option<CopyTarget> = match &settings.copy_to {
        None => None,
        Some(p) if p.as_os_str() == "-" => Some(Box::new(std::io::stdout())),
        Some(p) => Some(Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)?,
        )),
    };
    start_with_copy(settings, metrics, copy)
}

/// Where the NDJSON copy of the records goes.
type CopyTarget = Box<dyn std::io::Write + Send>;

fn start_with_copy(
    settings: Settings,
    metrics: DecisionLogMetrics,
    copy: Option<CopyTarget>,
) -> std::io::Result<(Arc<DecisionLog>, Running)> {
    let (spool, instance, head) = spool::Spool::open(&settings.spool_dir, settings.segment_bytes)?;
    let spool_live = spool.live.clone();
    let spool_lock = spool.lock()?;
    let (spare_return, spare) = crossbeam_channel::bounded(SPARE_BUFFERS);
    let shared = Arc::new(Shared {
        metrics: metrics.clone(),
        dropped: AtomicU64::new(0),
        spool_bytes: spool.bytes.clone(),
        acked: Arc::new(AtomicU64::new(0)),
        spool_live: spool_live.clone(),
        full_logged: AtomicBool::new(false),
        writer_failed: AtomicBool::new(false),
        spare,
        spare_return,
    });
    metrics
        .spool_bytes
        .set(shared.spool_bytes.load(Ordering::Relaxed) as i64);
    let (tx, rx) = mpsc::channel(settings.queue_capacity.max(1));
    let (spooled_tx, spooled) = watch::channel(head.seq);
    let otlp = settings.otlp_endpoint.as_ref().map(|endpoint| {
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(otlp::run(
            endpoint.clone(),
            instance.clone(),
            rx,
            metrics.clone(),
        ));
        tx
    });
    let (stop, stop_rx) = watch::channel(false);
    tracing::info!(
        %instance,
        spool = %settings.spool_dir.display(),
        resumes_after_seq = head.seq,
        durability = ?settings.durability,
        overflow = ?settings.overflow,
        "decision log open"
    );
    let w = writer::Writer {
        rx,
        disk: writer::Disk::start(spool, copy, settings.fsync, metrics.spool_write.clone())?,
        body_start: record::BodyStart::new(&instance),
        head,
        shared: shared.clone(),
        settings: settings.clone(),
        spooled: spooled_tx,
        stop: stop_rx,
        last_marker: None,
        otlp,
    };
    let failed = shared.clone();
    let writer = tokio::spawn(async move {
        // A panic ends the writer as a lost disk thread does: health says so.
        if let Err(e) = tokio::spawn(w.run()).await
            && e.is_panic()
        {
            tracing::error!(
                "decision log: the writer panicked; decisions are refused until the sidecar restarts"
            );
            failed.writer_failed.store(true, Ordering::Relaxed);
        }
    });
    let running = Running {
        instance,
        spool_dir: settings.spool_dir.clone(),
        spool_bytes: shared.spool_bytes.clone(),
        spool_live,
        spooled,
        metrics,
        acked: shared.acked.clone(),
        spool_lock,
        stop,
        writer,
    };
    Ok((
        Arc::new(DecisionLog {
            tx,
            settings,
            shared,
        }),
        running,
    ))
}

/// The writer's disk thread's nice value: below decisions, so a batch being
/// written gives way to a decision, yet with enough share (about a tenth of
/// a busy core) to keep up when decisions saturate the CPU.
const WRITER_NICE: i32 = 10;
/// The packer's: shipping may lag under saturation; the spool absorbs it.
const PACKER_NICE: i32 = 15;

/// Lowers the calling thread's CPU priority to `nice`, so the trail's work
/// does not show in decision latency.
pub(crate) fn background_priority(nice: i32) {
    #[cfg(target_os = "linux")]
    {
        let tid = rustix::thread::gettid();
        if let Err(e) = rustix::process::setpriority_process(Some(tid), nice) {
            tracing::debug!("cannot lower the decision log's thread priority: {e}");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = nice;
}

type Wait = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

impl DecisionSink for DecisionLog {
    fn record(&self, entry: Entry) -> Handoff {
        let durable = self.settings.durability == Durability::Durable;
        let (done, waiter) = if durable {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        // Serialized (and masked) here: one buffer crosses to the writer
        // instead of the request's many small allocations.
        let mut tail = self
            .shared
            .spare
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(1024));
        record::decision_tail(&entry, &mut tail);
        let queued = Queued { tail, done };
        let pending = match self.tx.try_send(queued) {
            Ok(()) => None,
            Err(mpsc::error::TrySendError::Full(q)) => match self.settings.overflow {
                Overflow::Drop => {
                    self.shared.dropped.fetch_add(1, Ordering::Relaxed);
                    self.shared.metrics.dropped.inc();
                    if !self.shared.full_logged.swap(true, Ordering::Relaxed) {
                        tracing::error!(
                            "decision log queue is full; dropping records (overflow = drop)"
                        );
                    }
                    // `durable` promises no answer without its record, as
                    // the writer does when it drops at the spool cap.
                    if durable {
                        self.shared.metrics.refused.inc();
                        return Handoff::Refused(
                            "the decision could not be recorded (decision log full, overflow = drop, durability = durable)".into(),
                        );
                    }
                    return Handoff::Done;
                }
                Overflow::Block => Some(q),
            },
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.shared.metrics.refused.inc();
                return Handoff::Refused(
                    "the decision log has stopped (shut down, or its spool writer failed): decisions are refused until the sidecar restarts".into(),
                );
            }
        };
        if pending.is_none() && waiter.is_none() {
            return Handoff::Done;
        }
        let (tx, timeout, metrics) = (
            self.tx.clone(),
            self.settings.block_timeout,
            self.shared.metrics.clone(),
        );
        let wait: Wait = Box::pin(async move {
            let recorded = tokio::time::timeout(timeout, async move {
                if let Some(q) = pending
                    && tx.send(q).await.is_err()
                {
                    return false;
                }
                match waiter {
                    Some(rx) => rx.await.unwrap_or(false),
                    None => true,
                }
            })
            .await;
            if recorded == Ok(true) {
                Ok(())
            } else {
                metrics.refused.inc();
                Err("the decision could not be recorded in time (decision log spool full or unwritable); retry later".into())
            }
        });
        Handoff::Wait(wait)
    }

    fn failure(&self) -> Option<String> {
        self.shared.writer_failed.load(Ordering::Relaxed).then(|| {
            "the decision log's spool writer failed; decisions are refused until the sidecar restarts".to_owned()
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::decision::{Decision, EntityRef, Request};

    /// A sink whose writer has failed for good, for tests of what reports it.
    pub(crate) struct Failed;

    impl DecisionSink for Failed {
        fn record(&self, _: Entry) -> Handoff {
            Handoff::Refused("failed".into())
        }
        fn failure(&self) -> Option<String> {
            Some("the spool writer failed".into())
        }
    }

    /// A decision record's entry, for tests here and elsewhere.
    pub(crate) fn entry() -> Entry {
        let e = |kind: &str| EntityRef {
            kind: kind.into(),
            id: "x".into(),
            properties: None,
        };
        Entry {
            time_us: 0,
            decision_id: uuid::Uuid::nil(),
            kind: "check",
            bundle: "b".into(),
            revision: "r".into(),
            request: Request {
                subject: e("User"),
                action: "view".into(),
                resource: e("Doc"),
                context: Default::default(),
                session_id: None,
            },
            decision: Arc::new(Decision::deny(vec![], vec![])),
            latency: Duration::ZERO,
            trace_id: None,
            span_id: None,
            mask: Arc::default(),
            links: Default::default(),
            depends_on_arguments: false,
        }
    }

    /// Settings for a spool in `dir` without fsync; tests change what they test.
    pub(crate) fn settings(dir: &tempfile::TempDir) -> Settings {
        Settings {
            spool_dir: dir.path().to_path_buf(),
            durability: Durability::Buffered,
            overflow: Overflow::Block,
            max_spool_bytes: 1 << 30,
            segment_bytes: 1 << 20,
            block_timeout: Duration::from_secs(5),
            queue_capacity: 16,
            batch_max: 16,
            batch_interval: Duration::ZERO,
            fsync: false,
            copy_to: None,
            otlp_endpoint: None,
        }
    }

    #[tokio::test]
    async fn durable_answers_only_recorded_decisions_even_under_drop() {
        let dir = tempfile::tempdir().expect("tmp");
        let settings = Settings {
            durability: Durability::Durable,
            overflow: Overflow::Drop,
            // Full after the first record.
            max_spool_bytes: 1,
            ..settings(&dir)
        };
        let metrics = DecisionLogMetrics::default();
        let (sink, running) = start(settings, metrics.clone()).expect("starts");
        assert!(sink.record(entry()).settle().await.is_ok(), "recorded");
        let refused = sink.record(entry()).settle().await;
        assert!(
            matches!(refused, Err(crate::decision::CheckError::NotRecorded(_))),
            "a dropped record is a refused durable decision"
        );
        assert!(metrics.dropped.get() >= 1 && metrics.refused.get() >= 1);
        running.close().await;
    }

    /// An NDJSON copy that holds each append on the disk thread until told
    /// to go on, so a test can act while a write is in flight.
    struct GatedCopy {
        written: Arc<std::sync::Mutex<Vec<u8>>>,
        entered: mpsc::UnboundedSender<()>,
        go: std::sync::mpsc::Receiver<()>,
    }

    impl std::io::Write for GatedCopy {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.written.lock().expect("lock").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            let _ = self.entered.send(());
            let _ = self.go.recv();
            Ok(())
        }
    }

    async fn within<T>(what: impl Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(5), what)
            .await
            .expect("in time")
    }

    #[tokio::test]
    async fn at_shutdown_a_record_is_written_or_refused_never_answered_and_lost() {
        let dir = tempfile::tempdir().expect("tmp");
        let written = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (entered_tx, mut entered) = mpsc::unbounded_channel();
        let (go, go_rx) = std::sync::mpsc::channel();
        let copy = GatedCopy {
            written: written.clone(),
            entered: entered_tx,
            go: go_rx,
        };
        let (sink, running) = start_with_copy(
            settings(&dir),
            DecisionLogMetrics::default(),
            Some(Box::new(copy)),
        )
        .expect("starts");
        let answered = |h: Handoff| matches!(h, Handoff::Done);
        let mut answers = Vec::new();
        answers.push(answered(sink.record(entry())));
        within(entered.recv()).await.expect("first write in flight");
        // Told to stop while a record is still on its way to the queue.
        let _ = running.stop.send(true);
        answers.push(answered(sink.record(entry())));
        go.send(()).expect("disk thread waits");
        within(entered.recv())
            .await
            .expect("the last write in flight");
        // Past the last drain: this one cannot be written any more.
        answers.push(answered(sink.record(entry())));
        go.send(()).expect("disk thread waits");
        within(running.writer).await.expect("writer ends");
        let lines = written
            .lock()
            .expect("lock")
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .count();
        assert_eq!(answers, [true, true, false], "the last record is refused");
        assert_eq!(lines, 2, "every answered record is written");
    }

    /// Checks the spool in `dir` as `log verify` does; returns its head.
    fn verified_head(dir: &std::path::Path) -> u64 {
        let mut v = chain::Verifier::default();
        let segments = spool::segments(dir).expect("list");
        for (i, (first, path)) in segments.iter().enumerate() {
            let newest = (i + 1 == segments.len()).then_some(*first);
            let bytes = std::fs::read(path).expect("read");
            chain::verify_into(&mut v, &bytes, newest).expect("intact chain");
        }
        let (_, _, head) = spool::Spool::open(dir, 1 << 20).expect("reopen");
        head.seq
    }

    #[tokio::test]
    async fn a_failed_spool_write_is_retried_in_place_and_nothing_is_lost() {
        let dir = tempfile::tempdir().expect("tmp");
        let metrics = DecisionLogMetrics::default();
        let (sink, running) = start(settings(&dir), metrics.clone()).expect("starts");
        let mut spooled = running.spooled.clone();
        assert!(sink.record(entry()).settle().await.is_ok());
        within(spooled.wait_for(|s| *s == 1))
            .await
            .expect("spooled");
        // The next three writes tear, then the disk recovers.
        spool::faults::fail_next_appends(dir.path(), 3, std::io::ErrorKind::Other);
        for _ in 0..6 {
            assert!(sink.record(entry()).settle().await.is_ok());
        }
        within(spooled.wait_for(|s| *s == 7))
            .await
            .expect("spooled");
        running.close().await;
        assert_eq!(verified_head(dir.path()), 7);
        assert_eq!(metrics.dropped.get(), 0);
    }

    #[tokio::test]
    async fn a_write_given_up_at_shutdown_ends_the_writer_and_counts_the_queue_as_dropped() {
        let dir = tempfile::tempdir().expect("tmp");
        // Batches of more than three records fail, after half of them are
        // on disk; shorter ones are written.
        spool::faults::fail_appends_longer_than(dir.path(), 3);
        let metrics = DecisionLogMetrics::default();
        let settings = Settings {
            batch_interval: Duration::from_millis(300),
            ..settings(&dir)
        };
        let (sink, running) = start(settings, metrics.clone()).expect("starts");
        for i in 0..10 {
            assert!(sink.record(entry()).settle().await.is_ok(), "answered");
            if i == 0 {
                // The writer has the first and gathers the batch.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        // Stopped while the writer gathers its batch: that turn is not its
        // last, and its write of ten fails until the writer gives up.
        let _ = running.stop.send(true);
        tokio::time::sleep(Duration::from_millis(200)).await;
        // Queued behind the failing batch.
        let late = [sink.record(entry()), sink.record(entry())];
        let mut answered = 10;
        for h in late {
            answered += u64::from(h.settle().await.is_ok());
        }
        // Giving up takes 2 s of failing writes.
        tokio::time::timeout(Duration::from_secs(10), running.writer)
            .await
            .expect("writer ends in time")
            .expect("writer ends");
        drop(running.spool_lock);

        // Whatever reached the spool is one intact chain (a later batch at
        // the given-up one's seqs would be written over its torn half), and
        // no answered record reached it: each is counted as dropped.
        assert_eq!(verified_head(dir.path()), 0);
        assert_eq!(metrics.dropped.get(), answered);
    }

    #[tokio::test]
    async fn a_writer_held_at_the_cap_stops_when_its_running_handle_is_dropped() {
        let dir = tempfile::tempdir().expect("tmp");
        let settings = Settings {
            // Full after the first record; `block` holds the next one.
            max_spool_bytes: 1,
            ..settings(&dir)
        };
        let (sink, running) = start(settings, DecisionLogMetrics::default()).expect("starts");
        let mut spooled = running.spooled.clone();
        assert!(sink.record(entry()).settle().await.is_ok());
        let first = tokio::time::timeout(Duration::from_secs(2), spooled.wait_for(|s| *s >= 1));
        assert!(first.await.is_ok(), "the first record is written");
        assert!(sink.record(entry()).settle().await.is_ok());
        // Dropped without `close` (a panic on the way, say): the writer
        // writes what it holds and ends instead of waiting on a stop that
        // can no longer come.
        drop(running);
        let held = tokio::time::timeout(Duration::from_secs(2), spooled.wait_for(|s| *s >= 2));
        assert!(
            matches!(held.await, Ok(Ok(_))),
            "the held record is written at shutdown"
        );
    }

    /// The writer runs on the decision runtime: a disk that stops answering
    /// must hold its disk thread, never that runtime. The NDJSON copy goes to
    /// a pipe nobody reads, so the disk thread blocks once the pipe is full.
    #[cfg(unix)]
    #[test]
    fn a_disk_that_does_not_answer_never_holds_the_decision_runtime() {
        use std::io::Read;
        let dir = tempfile::tempdir().expect("tmp");
        let fifo = dir.path().join("copy.pipe");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(made.is_ok_and(|s| s.success()), "mkfifo");
        // Read and write: opening never blocks, and this end reads later.
        let mut pipe = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&fifo)
            .expect("pipe");
        let settings = Settings {
            spool_dir: dir.path().join("spool"),
            queue_capacity: 4096,
            batch_max: 64,
            copy_to: Some(fifo),
            ..settings(&dir)
        };
        const RECORDS: u64 = 2000; // well over the pipe's 64 KiB
        let (answered, answers) = std::sync::mpsc::channel();
        let decisions = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let (sink, running) =
                    start(settings, DecisionLogMetrics::default()).expect("starts");
                for _ in 0..RECORDS {
                    assert!(sink.record(entry()).settle().await.is_ok());
                    tokio::task::yield_now().await;
                }
                // Timers still fire on this runtime while the disk is stuck.
                tokio::time::sleep(Duration::from_millis(50)).await;
                let stuck = *running.spooled.borrow();
                answered.send(stuck).expect("send");
                let mut spooled = running.spooled.clone();
                let all = tokio::time::timeout(
                    Duration::from_secs(20),
                    spooled.wait_for(|seq| *seq >= RECORDS),
                )
                .await;
                assert!(all.is_ok(), "all spooled once the pipe drains");
                running.close().await;
            });
        });
        let stuck = answers
            .recv_timeout(Duration::from_secs(10))
            .expect("decisions are answered while the disk thread is blocked");
        assert!(stuck < RECORDS, "the pipe filled up ({stuck} spooled)");
        // Drain the pipe: the disk thread goes on and everything is spooled.
        let drain = std::thread::spawn(move || {
            let mut buf = vec![0; 1 << 16];
            while pipe.read(&mut buf).is_ok_and(|n| n > 0) {}
        });
        decisions.join().expect("all records written");
        drop(drain);
    }

    /// A copy target whose first write panics, taking the disk thread down.
    struct PanicsOnWrite;

    impl std::io::Write for PanicsOnWrite {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            panic!("test: the disk thread dies");
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Without its disk thread nothing can be written: the batch's durable
    /// waiters hear so, and every later decision is refused, not answered
    /// without a record.
    #[tokio::test]
    async fn a_dead_disk_thread_refuses_decisions_instead_of_losing_records() {
        let dir = tempfile::tempdir().expect("tmp");
        let settings = Settings {
            durability: Durability::Durable,
            ..settings(&dir)
        };
        let metrics = DecisionLogMetrics::default();
        let (sink, running) =
            start_with_copy(settings, metrics.clone(), Some(Box::new(PanicsOnWrite)))
                .expect("starts");
        let first = sink.record(entry()).settle().await;
        assert!(first.is_err(), "its batch was never fully written");
        // The writer has ended with the thread: the queue is closed.
        let refused = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match sink.record(entry()) {
                    Handoff::Refused(why) => break why,
                    other => {
                        let _ = other.settle().await;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        })
        .await
        .expect("later decisions are refused");
        assert!(refused.contains("has stopped"), "{refused}");
        let before = metrics.refused.get();
        assert!(matches!(sink.record(entry()), Handoff::Refused(_)));
        assert_eq!(metrics.refused.get(), before + 1, "each refusal is counted");
        assert!(sink.failure().is_some_and(|f| f.contains("restarts")));
        running.close().await;
    }

    /// At the cap, a spool whose every record is acknowledged takes more:
    /// what is left is the segment being written, which is never released,
    /// and holding batches for it would block for good.
    #[tokio::test]
    async fn at_the_cap_a_fully_acknowledged_spool_takes_more() {
        let dir = tempfile::tempdir().expect("tmp");
        let settings = Settings {
            durability: Durability::Durable,
            fsync: true,
            max_spool_bytes: 1,
            block_timeout: Duration::from_millis(100),
            ..settings(&dir)
        };
        let (sink, running) = start(settings, DecisionLogMetrics::default()).expect("starts");
        assert!(sink.record(entry()).settle().await.is_ok(), "room at first");
        // At the cap with a record not yet acknowledged: held, and refused.
        assert!(sink.record(entry()).settle().await.is_err());
        assert_eq!(*running.spooled.borrow(), 1);
        // The control plane acknowledges all there is: the held batch goes.
        running.acked.store(1, Ordering::Relaxed);
        let mut spooled = running.spooled.clone();
        tokio::time::timeout(Duration::from_secs(5), spooled.wait_for(|s| *s == 2))
            .await
            .expect("written once all is acknowledged")
            .expect("writer alive");
        // But not while older segments are still counted (their release
        // failing): acknowledged is not yet freed.
        running.acked.store(2, Ordering::Relaxed);
        running.spool_bytes.fetch_add(1 << 30, Ordering::Relaxed);
        assert!(
            sink.record(entry()).settle().await.is_err(),
            "held at the cap"
        );
        assert_eq!(*running.spooled.borrow(), 2);
        running.close().await;
    }

    /// In `buffered` mode the decision was answered before its batch was
    /// lost with the disk thread: the loss is counted, not silent.
    #[tokio::test]
    async fn records_of_answered_decisions_lost_with_the_disk_thread_count_as_dropped() {
        let dir = tempfile::tempdir().expect("tmp");
        let metrics = DecisionLogMetrics::default();
        let (sink, running) = start_with_copy(
            settings(&dir),
            metrics.clone(),
            Some(Box::new(PanicsOnWrite)),
        )
        .expect("starts");
        assert!(
            sink.record(entry()).settle().await.is_ok(),
            "answered at once"
        );
        tokio::time::timeout(Duration::from_secs(5), async {
            while metrics.dropped.get() == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the lost record is counted");
        assert_eq!(metrics.dropped.get(), 1);
        running.close().await;
    }

    /// `close` returns once the spool is let go of: a sidecar restarted in
    /// the same process opens it again at once.
    #[tokio::test]
    async fn a_closed_log_lets_go_of_its_spool() {
        let dir = tempfile::tempdir().expect("tmp");
        let (sink, running) = start(settings(&dir), DecisionLogMetrics::default()).expect("starts");
        assert!(sink.record(entry()).settle().await.is_ok());
        let Err(e) = start(settings(&dir), DecisionLogMetrics::default()) else {
            panic!("two logs opened one spool");
        };
        assert!(e.to_string().contains("in use"), "{e}");
        // The shipper holds the lock too (it still releases segments while
        // it drains): the spool stays locked until it lets go.
        let shipper = running.spool_lock.clone();
        running.close().await;
        assert!(start(settings(&dir), DecisionLogMetrics::default()).is_err());
        drop(shipper);
        let (_, again) = start(settings(&dir), DecisionLogMetrics::default()).expect("reopens");
        assert_eq!(*again.spooled.borrow(), 1);
        again.close().await;
    }

    #[tokio::test]
    async fn a_backlog_is_written_without_waiting_an_interval_per_batch() {
        let dir = tempfile::tempdir().expect("tmp");
        let settings = Settings {
            queue_capacity: 1024,
            batch_max: 4,
            batch_interval: Duration::from_millis(200),
            ..settings(&dir)
        };
        let (sink, running) = start(settings, DecisionLogMetrics::default()).expect("starts");
        for _ in 0..64 {
            assert!(sink.record(entry()).settle().await.is_ok());
        }
        // 16 batches: one interval per batch would take 3.2 s.
        let mut spooled = running.spooled.clone();
        let all = tokio::time::timeout(
            Duration::from_millis(1500),
            spooled.wait_for(|seq| *seq >= 64),
        )
        .await;
        assert!(all.is_ok(), "only {} spooled", *running.spooled.borrow());
        running.close().await;
        // Written records' buffers wait in the pool, and the next record
        // takes one (before it finds the log closed).
        let pooled = sink.shared.spare.len();
        assert!(pooled > 0, "buffers are reused");
        assert!(sink.record(entry()).settle().await.is_err());
        assert_eq!(
            sink.shared.spare.len(),
            pooled - 1,
            "the next record took one"
        );
    }
}
