//! The shipper: streams spooled records to the control plane (bidirectional
//! gRPC, LZ4), keeps a few batches in flight, and deletes spool segments
//! only once the control plane has acknowledged every record in them. After
//! any failure it reconnects with backoff and resumes after the last
//! acknowledged sequence number, so nothing is skipped and the control plane
//! de-duplicates what is sent twice.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::Running;
use super::chain::{self, Hash};
use super::spool::{self, Reader};
use crate::api::pb::v1::{RecordBatch, decision_log_client::DecisionLogClient};
use crate::telemetry::DecisionLogMetrics;

#[derive(Debug, Clone)]
pub struct ShipSettings {
    /// Base URL of the control plane.
    pub url: String,
    pub ca_file: Option<PathBuf>,
    /// The sidecar's credential at the control plane, if it requires one.
    pub token: Option<String>,
    pub batch_max: usize,
    /// Batches sent ahead of their acknowledgement.
    pub window: usize,
    /// Least time between sends: records that arrive meanwhile go together.
    pub interval: Duration,
    pub connect_timeout: Duration,
    pub max_backoff: Duration,
    /// How long to keep shipping after shutdown starts.
    pub drain_for: Duration,
}

/// Most bytes of record bodies in one batch (well under gRPC's 4 MiB).
const BATCH_BYTES: usize = 1 << 20;

struct Ship {
    settings: ShipSettings,
    instance: String,
    dir: PathBuf,
    spool_bytes: Arc<AtomicU64>,
    spool_live: Arc<spool::Live>,
    /// Held by the packer thread of each session for its whole life: one of
    /// a session that ended may still be releasing segments, and the next
    /// one's reader must not open a segment it is handing back for reuse.
    packer_turn: Arc<std::sync::Mutex<()>>,
    /// The spool's lock, held while this and any packer thread may still
    /// release segments.
    spool_lock: Arc<std::fs::File>,
    /// Every record up to this seq is acknowledged (the writer reads it).
    acked_through: Arc<AtomicU64>,
    spooled: watch::Receiver<u64>,
    metrics: DecisionLogMetrics,
    acked: u64,
    /// Set once a session got its first acknowledgement.
    connected: bool,
    /// The last seq sent when the control plane last refused a batch: the
    /// spool is read line by line up to there (see
    /// [`Reader::check_every_line_until`]).
    careful_until: u64,
}

/// Ships until `stop`, then for at most `drain_for` more while records remain.
pub fn run(
    settings: ShipSettings,
    running: &Running,
    stop: watch::Receiver<bool>,
) -> impl Future<Output = ()> + Send + 'static {
    let ship = Ship {
        settings,
        instance: running.instance.clone(),
        dir: running.spool_dir.clone(),
        spool_bytes: running.spool_bytes.clone(),
        spool_live: running.spool_live.clone(),
        packer_turn: Arc::default(),
        spool_lock: running.spool_lock.clone(),
        acked_through: running.acked.clone(),
        spooled: running.spooled.clone(),
        metrics: running.metrics.clone(),
        acked: 0,
        connected: false,
        careful_until: 0,
    };
    ship_loop(ship, stop)
}

async fn ship_loop(mut ship: Ship, mut stop: watch::Receiver<bool>) {
    let mut backoff = Duration::from_millis(100);
    let mut failing = false;
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        let result = ship.session(&mut stop, &mut deadline).await;
        match result {
            Ok(()) => return,
            Err(e) => {
                if !failing {
                    tracing::warn!(url = %ship.settings.url, "decision log: shipping interrupted: {e}; records stay in the spool");
                    failing = true;
                }
            }
        }
        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            return;
        }
        let jitter = Duration::from_millis(fastrand::u64(0..=backoff.as_millis() as u64 / 5 + 1));
        // Draining, the backoff ends with the drain time: no later.
        let wake = tokio::time::Instant::now() + backoff + jitter;
        let wake = deadline.map_or(wake, |d| wake.min(d));
        tokio::select! {
            () = tokio::time::sleep_until(wake) => {}
            _ = stop.wait_for(|s| *s), if deadline.is_none() => {
                deadline = Some(tokio::time::Instant::now() + ship.settings.drain_for);
            }
        }
        backoff = (backoff * 2).min(ship.settings.max_backoff);
        if std::mem::take(&mut ship.connected) {
            // The last session got going: the next failure is news again.
            failing = false;
            backoff = Duration::from_millis(100);
        }
    }
}

impl Ship {
    async fn session(
        &mut self,
        stop: &mut watch::Receiver<bool>,
        deadline: &mut Option<tokio::time::Instant>,
    ) -> Result<(), String> {
        let channel = crate::controlplane::client::grpc_channel(
            &self.settings.url,
            self.settings.connect_timeout,
            self.settings.ca_file.as_deref(),
        )
        .map_err(|e| e.to_string())?;
        let auth = crate::controlplane::client::SidecarAuth::new(self.settings.token.as_deref())
            .map_err(|e| e.to_string())?;
        let mut client = DecisionLogClient::with_interceptor(channel, auth);
        let (tx, rx) = mpsc::channel::<RecordBatch>(self.settings.window + 1);
        let hello = RecordBatch {
            instance_id: self.instance.clone(),
            ..RecordBatch::default()
        };
        tx.send(hello).await.map_err(|_| "stream closed")?;
        let mut acks = client
            .ship(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map_err(|s| s.message().to_owned())?
            .into_inner();
        let first = acks
            .message()
            .await
            .map_err(|s| s.message().to_owned())?
            .ok_or("the control plane closed the stream")?;
        // The control plane's record is the truth: resend anything after it.
        self.acked = first.acked_seq;
        self.connected = true;
        let lz4 = first.accepts_lz4;
        tracing::info!(instance = %self.instance, acked_seq = self.acked, lz4, "decision log: shipping to the control plane");
        if !lz4 {
            tracing::warn!(
                "decision log: the control plane predates LZ4 batches; shipping DEFLATE (more CPU per record) until it is upgraded"
            );
        }
        let mut packer = Packer::start(self, lz4)?;
        let mut sent = self.acked;
        let spooled = *self.spooled.borrow();
        // Whether this spool forked from the stored chain: it lost records
        // it had shipped (damage, `fsync = false` and a power loss, a
        // restored copy) and numbered new ones with their seqs. Where the
        // spool still holds the stored head's seq, its record's hash
        // decides; elsewhere, whether the control plane holds more than the
        // spool (not the hash-less check alone: the spooled watch can lag
        // what is on disk while a copy write is slow).
        let ours = match first.acked_hash.len() == 32 {
            true => packer
                .hash_at(self.acked)
                .await
                .map_err(|e| format!("reading the spool: {e}"))?,
            false => None,
        };
        let forked = match ours {
            Some(ours) => ours[..] != first.acked_hash[..],
            None => self.acked > spooled,
        };
        if forked {
            // Ship all the spool holds, and release nothing on the strength
            // of the control plane's seq: it keeps the records it cannot
            // chain apart as forked, puts the fork on record and counts it.
            tracing::error!(
                instance = %self.instance,
                acked_seq = self.acked,
                spooled_seq = spooled,
                "decision log: this spool forked from the chain the control plane stores; shipping the whole spool, and its records numbered up to the stored head will be kept apart as a fork"
            );
            sent = 0;
            // Nothing of this spool is known to be acknowledged yet.
            self.acked_through.store(0, Ordering::Relaxed);
        } else {
            // Set, not raised: a control plane restored from a backup may
            // now hold less than it acknowledged before.
            self.acked_through
                .store(self.acked.min(spooled), Ordering::Relaxed);
            packer.forget(self.acked);
        }
        // (first seq, last seq) of each batch sent and not yet answered.
        let mut in_flight: std::collections::VecDeque<(u64, u64)> = Default::default();
        // False once the writer is gone: its watch then reports a change at
        // once, every time, and waiting on it would spin.
        let mut writer_alive = true;
        let mut next_send = tokio::time::Instant::now();
        loop {
            let now = tokio::time::Instant::now();
            if now >= next_send && in_flight.len() < self.settings.window {
                while in_flight.len() < self.settings.window {
                    let Some((first_seq, count, lines)) = packer
                        .next(sent, self.settings.batch_max)
                        .await
                        .map_err(|e| format!("reading the spool: {e}"))?
                    else {
                        break;
                    };
                    let (lines_lz4, lines_deflate) = match lz4 {
                        true => (lines, Vec::new()),
                        false => (Vec::new(), lines),
                    };
                    let last = first_seq + u64::from(count) - 1;
                    let batch = RecordBatch {
                        instance_id: String::new(),
                        first_seq,
                        count,
                        lines_lz4,
                        lines_deflate,
                    };
                    if tx.send(batch).await.is_err() {
                        // Closed by the control plane: its answer says why.
                        let why = match tokio::time::timeout(Duration::from_secs(1), async {
                            loop {
                                match acks.message().await {
                                    Ok(Some(_)) => continue,
                                    Ok(None) => return None,
                                    Err(status) => return Some(status),
                                }
                            }
                        })
                        .await
                        {
                            Ok(Some(status)) => status,
                            _ => return Err("the stream closed".into()),
                        };
                        return Err(self.stream_failed(why, sent));
                    }
                    self.metrics.shipped.inc_by(u64::from(count));
                    sent = last;
                    in_flight.push_back((first_seq, last));
                }
                next_send = now + self.settings.interval;
            }
            let spooled = *self.spooled.borrow();
            if deadline.is_some() && in_flight.is_empty() && sent >= spooled {
                return Ok(());
            }
            let more = spooled > sent && in_flight.len() < self.settings.window;
            let until =
                deadline.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                // Answers first: a refusal must be seen as one, not as the
                // closed stream a send would find next.
                biased;
                ack = acks.message() => {
                    let ack = match ack {
                        Ok(ack) => ack.ok_or("the control plane closed the stream")?,
                        Err(status) => return Err(self.stream_failed(status, sent)),
                    };
                    if ack.chain_breaks > 0 {
                        self.metrics.chain_breaks.inc_by(u64::from(ack.chain_breaks));
                        tracing::error!(breaks = ack.chain_breaks, "decision log: the control plane reports chain breaks");
                    }
                    if ack.batch_last_seq > 0 {
                        // It names the batch it answers, stored on the chain
                        // or kept apart as a fork: that batch's records may
                        // leave the spool. By batch, not by the control
                        // plane's head, which after a fork stays above this
                        // spool's seqs until they pass it.
                        match in_flight.pop_front() {
                            Some((first, last)) if last == ack.batch_last_seq => {
                                self.metrics.acknowledged.inc_by(last + 1 - first);
                                packer.forget(last);
                            }
                            _ => {
                                return Err(format!(
                                    "the control plane answered batch ..{} out of turn",
                                    ack.batch_last_seq
                                ));
                            }
                        }
                        self.acked = self.acked.max(ack.acked_seq);
                    } else {
                        // A control plane from before forks were kept apart:
                        // by its head (it drops a fork's records anyway).
                        while in_flight.front().is_some_and(|b| b.1 <= ack.acked_seq) {
                            in_flight.pop_front();
                        }
                        if ack.acked_seq > self.acked {
                            self.metrics.acknowledged.inc_by(ack.acked_seq - self.acked);
                            self.acked = ack.acked_seq;
                            packer.forget(self.acked);
                        }
                    }
                }
                _ = stop.wait_for(|s| *s), if deadline.is_none() => {
                    *deadline = Some(tokio::time::Instant::now() + self.settings.drain_for);
                    next_send = tokio::time::Instant::now();
                }
                changed = self.spooled.changed(), if !more && writer_alive => {
                    writer_alive = changed.is_ok();
                }
                () = tokio::time::sleep_until(next_send), if more => {}
                () = tokio::time::sleep_until(until) => return Ok(()),
            }
        }
    }

    /// Why a session ended, from the control plane's status. A batch it
    /// refused (damage the quick check let through) has the spool read line
    /// by line up to the last seq `sent` from then on.
    fn stream_failed(&mut self, status: tonic::Status, sent: u64) -> String {
        if status.code() == tonic::Code::InvalidArgument {
            self.careful_until = self.careful_until.max(sent);
        }
        status.message().to_owned()
    }
}

/// Reads and compresses spooled batches, and deletes acknowledged
/// segments, on a thread of its own at the lowest priority: a batch takes a
/// millisecond or so of CPU and file I/O, which must not delay a decision.
struct Packer {
    ask: std::sync::mpsc::Sender<Ask>,
    /// Shared with the writer: every record up to it is acknowledged.
    acked: Arc<AtomicU64>,
}

type Packed = std::io::Result<Option<(u64, u32, Vec<u8>)>>;

enum Ask {
    /// After seq, at most this many records.
    Next(u64, usize, tokio::sync::oneshot::Sender<Packed>),
    Forget(u64),
    /// The hash of the spooled record at seq, if the spool still holds it.
    HashAt(
        u64,
        tokio::sync::oneshot::Sender<std::io::Result<Option<Hash>>>,
    ),
}

impl Packer {
    /// `lz4`: pack batches as LZ4 frames, else as DEFLATE.
    fn start(ship: &Ship, lz4: bool) -> Result<Self, String> {
        let (ask, asks) = std::sync::mpsc::channel::<Ask>();
        let dir = ship.dir.clone();
        let (bytes, metrics) = (ship.spool_bytes.clone(), ship.metrics.clone());
        let live = ship.spool_live.clone();
        let mut reader = Reader::new(&dir, live.clone());
        reader.check_every_line_until(ship.careful_until);
        let turn = ship.packer_turn.clone();
        let lock = ship.spool_lock.clone();
        std::thread::Builder::new()
            .name("decision-log-packer".into())
            .spawn(move || {
                let _lock = lock;
                let _turn = turn
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                super::background_priority(super::PACKER_NICE);
                // Ends when the session drops its Packer.
                for ask in asks {
                    match ask {
                        Ask::Next(after, max, reply) => {
                            let packed = reader.next_chunk(after, max, BATCH_BYTES).and_then(|c| {
                                c.map(|c| pack(&c.lines, lz4).map(|z| (c.first_seq, c.count, z)))
                                    .transpose()
                            });
                            let _ = reply.send(packed);
                        }
                        Ask::HashAt(seq, reply) => {
                            // A reader of its own: the batches' reader keeps
                            // its place.
                            let found = Reader::new(&dir, live.clone())
                                .next_chunk(seq.saturating_sub(1), 1, 1)
                                .map(|c| {
                                    let c = c.filter(|c| c.first_seq == seq)?;
                                    let line = c.lines.strip_suffix(b"\n").unwrap_or(&c.lines);
                                    chain::parse_line(line).ok().map(|l| l.hash)
                                });
                            let _ = reply.send(found);
                        }
                        Ask::Forget(acked) => match reader.release(acked, &bytes) {
                            Ok(_) => {
                                metrics
                                    .spool_bytes
                                    .set(bytes.load(Ordering::Relaxed) as i64);
                            }
                            Err(e) => tracing::warn!(
                                "decision log: cannot delete acknowledged segments: {e}"
                            ),
                        },
                    }
                }
            })
            .map_err(|e| format!("cannot start the packer thread: {e}"))?;
        Ok(Self {
            ask,
            acked: ship.acked_through.clone(),
        })
    }

    /// The next batch after `after`, compressed; `None` if nothing is new.
    async fn next(&mut self, after: u64, max: usize) -> Packed {
        let (reply, packed) = tokio::sync::oneshot::channel();
        let gone = || std::io::Error::other("the packer thread stopped");
        self.ask
            .send(Ask::Next(after, max, reply))
            .map_err(|_| gone())?;
        packed.await.map_err(|_| gone())?
    }

    /// The hash of the spooled record at `seq`; `None` if it is not (or no
    /// longer) in the spool.
    async fn hash_at(&self, seq: u64) -> std::io::Result<Option<Hash>> {
        let (reply, found) = tokio::sync::oneshot::channel();
        let gone = || std::io::Error::other("the packer thread stopped");
        self.ask.send(Ask::HashAt(seq, reply)).map_err(|_| gone())?;
        found.await.map_err(|_| gone())?
    }

    /// Deletes segments the control plane has acknowledged entirely.
    fn forget(&self, acked: u64) {
        self.acked.fetch_max(acked, Ordering::Relaxed);
        let _ = self.ask.send(Ask::Forget(acked));
    }
}

/// A batch's lines packed for the control plane: one LZ4 frame if it reads
/// them, else raw DEFLATE (control planes from before LZ4).
fn pack(bytes: &[u8], lz4: bool) -> std::io::Result<Vec<u8>> {
    use std::io::Write;
    if lz4 {
        return compress(bytes);
    }
    let out = Vec::with_capacity(bytes.len() / 6 + 64);
    let mut z = flate2::write::DeflateEncoder::new(out, flate2::Compression::fast());
    z.write_all(bytes)?;
    z.finish()
}

/// One LZ4 frame (linked blocks): records are repetitive JSON, which LZ4
/// shrinks about tenfold for a third of DEFLATE level 1's CPU.
pub(crate) fn compress(bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    use std::io::Write;
    let mut info = lz4_flex::frame::FrameInfo::new();
    info.block_mode = lz4_flex::frame::BlockMode::Linked;
    let out = Vec::with_capacity(bytes.len() / 8 + 64);
    let mut frame = lz4_flex::frame::FrameEncoder::with_frame_info(info, out);
    frame.write_all(bytes)?;
    frame.finish().map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::DecisionSink;
    use crate::decision_log::tests::{entry, settings};

    /// The shipper still releases segments after the writer has closed (it
    /// drains at shutdown): until it is done, the spool stays locked and a
    /// second sidecar stays out.
    #[tokio::test]
    async fn the_shipper_keeps_the_spool_locked_until_it_is_done() {
        let dir = tempfile::tempdir().expect("tmp");
        let start = || crate::decision_log::start(settings(&dir), Default::default());
        let (sink, running) = start().expect("starts");
        assert!(sink.record(entry()).settle().await.is_ok());
        let ship = ShipSettings {
            // Nothing listens there: the shipper retries until it stops.
            url: "http://127.0.0.1:9".into(),
            ca_file: None,
            token: None,
            batch_max: 16,
            window: 4,
            interval: Duration::from_millis(10),
            connect_timeout: Duration::from_millis(200),
            max_backoff: Duration::from_secs(1),
            drain_for: Duration::from_millis(300),
        };
        let (stop, stopping) = watch::channel(false);
        let shipper = tokio::spawn(run(ship, &running, stopping));
        running.close().await;
        assert!(start().is_err(), "locked while the shipper runs");
        let _ = stop.send(true);
        tokio::time::timeout(Duration::from_secs(10), shipper)
            .await
            .expect("the shipper stops after its drain")
            .expect("no panic");
        let (_, again) = start().expect("let go once the shipper is done");
        again.close().await;
    }

    #[test]
    fn compressed_batches_unpack_to_the_same_lines() {
        use std::io::Read;
        let lines: Vec<u8> = (0..5000)
            .flat_map(|i| {
                format!("{{\"hash\":\"{i:064}\",\"record\":{{\"seq\":{i}}}}}\n").into_bytes()
            })
            .collect();
        let z = super::compress(&lines).expect("compresses");
        assert!(z.len() < lines.len() / 3);
        let mut back = Vec::new();
        lz4_flex::frame::FrameDecoder::new(&z[..])
            .read_to_end(&mut back)
            .expect("inflates");
        assert_eq!(back, lines);
        // Either packing, in the field it goes in, is what the control
        // plane reads back.
        for lz4 in [true, false] {
            let packed = super::pack(&lines, lz4).expect("packs");
            assert!(packed.len() < lines.len() / 3);
            let batch = crate::api::pb::v1::RecordBatch {
                count: 5000,
                lines_lz4: if lz4 { packed.clone() } else { Vec::new() },
                lines_deflate: if lz4 { Vec::new() } else { packed },
                ..Default::default()
            };
            let text = crate::controlplane::trail::unpack(&batch).expect("unpacks");
            assert_eq!(text, lines, "lz4: {lz4}");
        }
    }
}
