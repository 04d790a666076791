//! The disk spool: segment files of chained lines, each appended to in order
//! and named by the first sequence number it holds. Only the writer appends; only the shipper
//! releases, and only whole segments the control plane has acknowledged.
//!
//! ```text
//! spool/instance                       this sidecar's instance id (its chain)
//! spool/00000000000000000001.ndjson    seq 1 ..
//! spool/00000000000000004097.ndjson    seq 4097 .. (the newest: appended to)
//! spool/00000000000000000001.free      released, kept to be written over
//! spool/00000000000000000000.free      prepared (zeros), kept to be written over
//! spool/next.tmp                       the next segment, until its first batch is on disk
//! ```
//!
//! Released segments are written over rather than deleted (up to
//! [`FREE_KEEP`] of them), as databases recycle their log files: writing
//! into blocks a file already has makes each batch's fsync a data flush with
//! no journal commit, and spares allocating and freeing blocks and pages.
//! Such a segment holds an older part of the chain past what the writer has
//! reached, so its end is not where its records end: readers stop at
//! [`Live`], recovery after the last record that continues the chain (see
//! [`recover`]), and a finished segment is cut to its records before the
//! next one appears.
//!
//! Where no released segment is there to reuse (a new spool, or one growing
//! while the control plane is away), segments are prepared ahead: filled
//! with zeros and flushed, by a background thread once the spool runs,
//! and kept as released segments numbered 0 (below every real segment, so
//! recovery never takes one for newer records). A new spool's first
//! segment is prepared before it opens: its first batches' fsyncs are
//! cheap too. Zeros after the newest segment's records are no damage:
//! recovery leaves them, and the chain goes on over them after a restart.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use super::chain::{self, GENESIS, Hash};

const SUFFIX: &str = ".ndjson";
const FREE_SUFFIX: &str = ".free";
const NEXT: &str = "next.tmp";
/// A segment being prepared (filled with zeros) until it is flushed.
const PREPARE_TMP: &str = "prep.tmp";
/// The number a prepared segment is kept under (see the module docs).
const PREPARED_NUMBER: u64 = 0;
/// Most bytes a segment is prepared with: a larger one allocates the rest
/// as it is written, as without preparing.
const PREPARE_MAX_BYTES: u64 = 64 << 20;
/// Free space a segment is prepared only with, besides its own: preparing
/// must never take the room the records need.
const PREPARE_HEADROOM_BYTES: u64 = 64 << 20;
/// Held locked while a process writes the spool.
const LOCK: &str = "lock";
/// Released segments kept to be written over (disk beyond the spool cap:
/// this many segments, and one prepared segment).
pub const FREE_KEEP: usize = 2;

/// The segment the writer appends to, and how many of its bytes are records
/// (a reused segment holds older bytes after them).
/// Also the spool's instance, which every record in it names.
#[derive(Debug, Default)]
pub struct Live {
    span: Mutex<(u64, u64)>,
    instance: String,
}

impl Live {
    fn new(instance: &str) -> Self {
        Self {
            span: Mutex::default(),
            instance: instance.to_owned(),
        }
    }

    fn set(&self, first_seq: u64, len: u64) {
        *self.span.lock().unwrap_or_else(PoisonError::into_inner) = (first_seq, len);
    }

    /// The segment being written: its first seq and its length.
    pub(crate) fn get(&self) -> (u64, u64) {
        *self.span.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Where the chain stands: the last spooled record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub seq: u64,
    pub hash: Hash,
}

pub struct Spool {
    dir: PathBuf,
    segment_max: u64,
    file: File,
    /// The bytes of records in `file` (where the next batch goes).
    file_len: u64,
    /// Where the segment being started goes once its first batch is on disk.
    unnamed: Option<PathBuf>,
    /// A segment was named and the directory not yet synced.
    dir_unsynced: bool,
    /// Bytes of records in every segment, shared with the shipper that
    /// releases them.
    pub bytes: Arc<AtomicU64>,
    pub live: Arc<Live>,
    /// The directory's lock, held as long as this spool is open.
    /// Held for the process's whole use of the spool; see [`Spool::lock`].
    lock: File,
    /// The segment being prepared in the background, if one was started.
    preparing: Option<Preparing>,
}

struct Preparing {
    thread: std::thread::JoinHandle<()>,
    state: Arc<PrepareState>,
}

/// What the writer and a preparing thread share.
#[derive(Default)]
struct PrepareState {
    /// Tells the thread to stop and remove what it wrote.
    cancel: AtomicBool,
    /// Whether the thread is past putting its segment in place (placed,
    /// given up or failed), set with its rename under this lock: a thread
    /// that has placed its segment but not yet returned must not count as
    /// "still preparing", or a rotation taking that segment prepares none.
    settled: Mutex<bool>,
}

impl PrepareState {
    fn settled(&self) -> std::sync::MutexGuard<'_, bool> {
        self.settled.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Spool {
    /// Stops a segment being prepared and waits for it (one 1 MiB write at
    /// most), so the spool is left alone once it is closed.
    fn drop(&mut self) {
        if let Some(p) = self.preparing.take() {
            p.state.cancel.store(true, Ordering::Relaxed);
            let _ = p.thread.join();
        }
    }
}

/// The segments in `dir`, oldest first.
pub fn segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    files(dir, SUFFIX)
}

/// Files in `dir` named by a number and `suffix`, by number.
fn files(dir: &Path, suffix: &str) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if let Some(first) = numbered(&path, suffix) {
            out.push((first, path));
        }
    }
    out.sort();
    Ok(out)
}

/// The first seq a segment's file name gives, if it is named as one.
pub fn segment_first_seq(path: &Path) -> Option<u64> {
    numbered(path, SUFFIX)
}

fn numbered(path: &Path, suffix: &str) -> Option<u64> {
    path.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_suffix(suffix))
        .and_then(|n| n.parse::<u64>().ok())
}

fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("{first_seq:020}{SUFFIX}"))
}

impl Spool {
    /// Opens (or creates) the spool, recovering after a crash: what follows
    /// the last record of the chain is cut off (a torn line, older bytes),
    /// unless it is only zeros (the rest of a prepared segment, written over
    /// in place), and the chain resumes after that record.
    pub fn open(dir: &Path, segment_max: u64) -> io::Result<(Self, String, Head)> {
        fs::create_dir_all(dir)?;
        let lock = lock(dir)?;
        let mut instance = instance_id(dir)?;
        let mut head = Head {
            seq: 0,
            hash: GENESIS,
        };
        let segs = segments(dir)?;
        // Before recovery cuts anything: an empty segment is no sign of
        // records (versions before segments were named with their first
        // batch left one behind on a fresh spool).
        let had_bytes = segs
            .iter()
            .any(|(_, path)| fs::metadata(path).is_ok_and(|m| m.len() > 0));
        // The newest segment with records holds the head. Nothing is cut
        // yet: a crash before the decisions below are on disk must find
        // the same bytes again.
        let mut head_segment = None;
        let mut cut = None;
        for (first, path) in segs.iter().rev() {
            let (last, kept, zeros_after) = recover(path, *first, &instance)?;
            if let Some(last) = last {
                head = last;
                head_segment = Some(*first);
                cut = Some((path, kept, zeros_after));
                break;
            }
        }
        if head_segment.is_none() && had_bytes {
            // Records were spooled (a segment is named only once its first
            // batch is on disk), and none is left to go on from: the chain
            // cannot continue (the control plane would take its next seqs
            // for resends), so a new one starts under a new instance. The
            // new id is on disk before anything is removed, so a crash in
            // between cannot restart the old instance's chain at seq 1.
            tracing::error!(
                %instance,
                "decision spool: no readable record left in the spool; starting a new chain"
            );
            instance = new_instance_id(dir)?;
        }
        // A released segment named past the head (a partial restore, or
        // renames a crash kept out of order) would hold records newer than
        // the chain's: never written over.
        if let Some(head_first) = head_segment {
            for (first, free) in files(dir, FREE_SUFFIX)? {
                if first >= head_first {
                    fs::remove_file(free)?;
                }
            }
        }
        // Only zeros after the records (the rest of a prepared segment) are
        // kept: the chain goes on over them, as before the stop.
        let mut head_records = None;
        if let Some((path, kept, zeros_after)) = cut {
            if !zeros_after {
                cut_after(path, kept)?;
            }
            head_records = Some(kept);
        }
        // Segments after it have no records (only damage leaves one): the
        // chain goes on in a segment named by its next seq, as recovery
        // expects.
        for (first, path) in &segs {
            if head_segment.is_none_or(|h| *first > h) {
                fs::remove_file(path)?;
            }
        }
        // A segment being started when the sidecar stopped: never named, so
        // its records were never reported as spooled.
        let _ = fs::remove_file(dir.join(NEXT));
        let _ = fs::remove_file(dir.join(PREPARE_TMP));
        sync_dir(dir)?;
        let mut total = 0;
        for (first, path) in segments(dir)? {
            total += match head_records {
                Some(kept) if Some(first) == head_segment => kept,
                _ => fs::metadata(path)?.len(),
            };
        }
        // A new spool's first segment is started like every other: it is
        // named once its first batch is on disk.
        let first = head_segment.unwrap_or(1);
        let (path, unnamed) = match head_segment {
            Some(f) => (segment_path(dir, f), None),
            None => {
                if files(dir, FREE_SUFFIX)?.is_empty()
                    && let Err(e) = prepare_segment(dir, segment_max, &PrepareState::default())
                {
                    tracing::warn!("decision spool: cannot prepare its first segment: {e}");
                }
                take_free(dir)?;
                (dir.join(NEXT), Some(segment_path(dir, 1)))
            }
        };
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false) // recovered above: its records go on after the end
            .open(&path)?;
        // A segment being started holds no records yet, whatever its length;
        // the newest one holds its records, and perhaps zeros after them
        // (never its file's length: see above).
        let file_len = head_records.unwrap_or(0);
        let live = Arc::new(Live::new(&instance));
        live.set(first, file_len);
        let mut spool = Self {
            dir: dir.to_path_buf(),
            segment_max,
            file,
            file_len,
            unnamed,
            dir_unsynced: false,
            bytes: Arc::new(AtomicU64::new(total)),
            live,
            lock,
            preparing: None,
        };
        spool.keep_one_ready();
        Ok((spool, instance, head))
    }

    /// Another handle on the spool's lock: it is held until every handle
    /// is closed, so the shipper, which still releases segments after the
    /// writer has let go, keeps a second sidecar out until it is done too.
    pub fn lock(&self) -> io::Result<Arc<File>> {
        self.lock.try_clone().map(Arc::new)
    }

    /// Appends whole lines, then (if `sync`) flushes them to disk;
    /// `next_seq` is the first seq in `lines` (a new segment starting here is
    /// named by it). Readers see the lines only once this succeeded, and a
    /// failed call may be repeated with the same lines: they are written at
    /// the same place again, never twice.
    pub fn append(&mut self, lines: &[u8], next_seq: u64, sync: bool) -> io::Result<()> {
        if self.file_len >= self.segment_max && self.unnamed.is_none() {
            self.start_segment(next_seq)?;
        }
        #[cfg(test)]
        if let Some((part, kind)) = faults::torn_write(&self.dir, lines) {
            write_at(&self.file, part, self.file_len)?;
            let e = io::Error::new(kind, "a write failure the test asked for");
            self.on_write_error(&e);
            return Err(e);
        }
        write_at(&self.file, lines, self.file_len).inspect_err(|e| self.on_write_error(e))?;
        if sync || self.unnamed.is_some() {
            self.file
                .sync_data()
                .inspect_err(|e| self.on_write_error(e))?;
        }
        if let Some(path) = &self.unnamed {
            // A segment appears with its first batch on disk, so the newest
            // segment always continues the chain (recovery relies on it).
            fs::rename(self.dir.join(NEXT), path)?;
            self.unnamed = None;
            self.dir_unsynced = true;
        }
        if self.dir_unsynced {
            // The new name must survive a crash too.
            sync_dir(&self.dir)?;
            self.dir_unsynced = false;
        }
        self.file_len += lines.len() as u64;
        self.bytes.fetch_add(lines.len() as u64, Ordering::Relaxed);
        let first = self.live.get().0;
        self.live.set(first, self.file_len);
        Ok(())
    }

    /// A full disk gets back the released segments kept for reuse: their
    /// blocks are the spool's own, and the write is retried. A segment being
    /// prepared is given up (none is prepared while space is short).
    fn on_write_error(&self, e: &io::Error) {
        if !matches!(
            e.kind(),
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
        ) {
            return;
        }
        // Under the preparing thread's lock: one already past its last
        // check must not put its segment in place after the cleanup.
        let _settled = self.preparing.as_ref().map(|p| {
            p.state.cancel.store(true, Ordering::Relaxed);
            p.state.settled()
        });
        match files(&self.dir, FREE_SUFFIX) {
            Ok(free) => {
                for (_, path) in free {
                    let _ = fs::remove_file(path);
                }
            }
            Err(e) => tracing::warn!("decision spool: cannot list released segments: {e}"),
        }
    }

    /// Finishes the current segment (cut to its records, on disk) and opens
    /// the next under a temporary name: a released segment if one is kept.
    fn start_segment(&mut self, next_seq: u64) -> io::Result<()> {
        if self.file.metadata()?.len() > self.file_len {
            self.file.set_len(self.file_len)?;
        }
        self.file.sync_data()?;
        let next = self.dir.join(NEXT);
        take_free(&self.dir)?;
        self.keep_one_ready();
        // Not truncated: writing over the blocks it has is the point.
        self.file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(&next)?;
        self.file_len = 0;
        // Readers must not take the reused file's older bytes for records:
        // bound them before the segment can be listed.
        self.live.set(next_seq, 0);
        self.unnamed = Some(segment_path(&self.dir, next_seq));
        Ok(())
    }

    /// Starts preparing a segment for the next one to start in, unless a
    /// released one is there or one is being prepared. Best effort: without
    /// it the next segment is a new file, as before preparing.
    fn keep_one_ready(&mut self) {
        if self.preparing.as_ref().is_some_and(|p| !*p.state.settled()) {
            return;
        }
        match files(&self.dir, FREE_SUFFIX) {
            Ok(free) if free.is_empty() => {}
            Ok(_) => return,
            Err(e) => {
                tracing::warn!("decision spool: cannot list released segments: {e}");
                return;
            }
        }
        let (dir, len) = (self.dir.clone(), self.segment_max);
        let state = Arc::new(PrepareState::default());
        let shared = state.clone();
        let started = std::thread::Builder::new()
            .name("decision-log-prep".into())
            .spawn(move || {
                super::background_priority(PREPARE_NICE);
                let outcome = prepare_segment(&dir, len, &shared);
                *shared.settled() = true;
                match outcome {
                    Err(e) if e.kind() != io::ErrorKind::Interrupted => {
                        tracing::warn!("decision spool: cannot prepare a segment: {e}");
                    }
                    _ => {}
                }
            });
        match started {
            Ok(thread) => self.preparing = Some(Preparing { thread, state }),
            Err(e) => tracing::warn!("decision spool: cannot start preparing a segment: {e}"),
        }
    }

    /// Waits for the segment being prepared, if any.
    #[cfg(test)]
    fn wait_prepared(&mut self) {
        if let Some(p) = self.preparing.take() {
            p.thread.join().expect("prepared");
        }
    }
}

/// The preparing thread's nice value: the lowest priority, it is never in a
/// hurry (without its segment the next one is allocated as it is written).
const PREPARE_NICE: i32 = 19;

/// Puts a released segment in place as the next one to write, a prepared
/// one only when no other is left (theirs are older records, best written
/// over soon); with none, the next one is a new file.
fn take_free(dir: &Path) -> io::Result<()> {
    let free = files(dir, FREE_SUFFIX)?;
    let released = free.iter().find(|(n, _)| *n != PREPARED_NUMBER);
    if let Some((_, path)) = released.or(free.first()) {
        fs::rename(path, dir.join(NEXT))?;
    }
    Ok(())
}

/// Fills a segment with zeros and flushes it, then keeps it as a released
/// one (see the module docs): written over, its batches' fsyncs flush data
/// without a journal commit, and no block is allocated as records arrive.
/// Does nothing where the file system is short of space (see
/// [`PREPARE_HEADROOM_BYTES`]); `Interrupted` once `cancel` is set.
fn prepare_segment(dir: &Path, len: u64, state: &PrepareState) -> io::Result<()> {
    let len = len.min(PREPARE_MAX_BYTES);
    if !room_to_prepare(dir, len) {
        tracing::debug!("decision spool: short of disk space; no segment prepared");
        return Ok(());
    }
    let tmp = dir.join(PREPARE_TMP);
    let fill = || {
        let mut file = File::create(&tmp)?;
        let zeros = vec![0; 1 << 20];
        let mut left = len;
        while left > 0 {
            if state.cancel.load(Ordering::Relaxed) {
                return Err(io::ErrorKind::Interrupted.into());
            }
            let n = left.min(zeros.len() as u64) as usize;
            file.write_all(&zeros[..n])?;
            left -= n as u64;
        }
        file.sync_data()?;
        let mut settled = state.settled();
        if state.cancel.load(Ordering::Relaxed) {
            return Err(io::ErrorKind::Interrupted.into());
        }
        fs::rename(&tmp, free_path(dir, PREPARED_NUMBER))?;
        *settled = true;
        Ok(())
    };
    fill().inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
}

/// Whether the file system holding `dir` has room for a prepared segment
/// of `len` bytes and [`PREPARE_HEADROOM_BYTES`] besides; yes where it
/// cannot tell (a full disk then fails the write, which gives up).
fn room_to_prepare(dir: &Path, len: u64) -> bool {
    #[cfg(unix)]
    if let Ok(fs) = rustix::fs::statvfs(dir) {
        let available = fs.f_bavail.saturating_mul(fs.f_frsize);
        return available >= len.saturating_add(PREPARE_HEADROOM_BYTES);
    }
    let _ = (dir, len);
    true
}

/// Write failures for tests of what fails above the spool: a full or
/// failing disk cannot be had on demand.
#[cfg(test)]
pub(super) mod faults {
    use std::io::ErrorKind;
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    struct Fault {
        dir: PathBuf,
        /// Appends of more lines than this fail...
        longer_than: usize,
        /// ...this many times more (`None`: every time)...
        times: Option<u32>,
        /// ...with this error.
        kind: ErrorKind,
    }

    static FAULTS: Mutex<Vec<Fault>> = Mutex::new(Vec::new());

    /// Appends of more than `lines` lines to the spool in `dir` fail from
    /// now on, after writing half of their lines and half the next one (a
    /// torn write).
    pub fn fail_appends_longer_than(dir: &Path, lines: usize) {
        add(dir, lines, None, ErrorKind::Other);
    }

    /// The next `times` appends to the spool in `dir` fail the same way,
    /// with `kind`.
    pub fn fail_next_appends(dir: &Path, times: u32, kind: ErrorKind) {
        add(dir, 0, Some(times), kind);
    }

    fn add(dir: &Path, longer_than: usize, times: Option<u32>, kind: ErrorKind) {
        let mut faults = FAULTS.lock().expect("lock");
        faults.push(Fault {
            dir: dir.to_path_buf(),
            longer_than,
            times,
            kind,
        });
    }

    /// The part of `lines` written before the failure, and the error, if
    /// this one fails.
    pub(super) fn torn_write<'a>(dir: &Path, lines: &'a [u8]) -> Option<(&'a [u8], ErrorKind)> {
        let mut faults = FAULTS.lock().expect("lock");
        let ends: Vec<usize> = memchr::memchr_iter(b'\n', lines).collect();
        let fault = faults
            .iter_mut()
            .find(|f| f.dir == dir && ends.len() > f.longer_than && f.times != Some(0))?;
        if let Some(n) = &mut fault.times {
            *n -= 1;
        }
        // Half the lines, and half of the next one.
        let k = ends.len() / 2;
        let start = k.checked_sub(1).map_or(0, |i| ends[i] + 1);
        let next_end = ends.get(k).map_or(lines.len(), |e| e + 1);
        Some((&lines[..start + (next_end - start) / 2], fault.kind))
    }
}

/// Where a released (or prepared) segment numbered `first` is kept.
fn free_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("{first:020}{FREE_SUFFIX}"))
}

/// Locks the spool directory for this process: two sidecars writing one
/// spool would write over each other's segments under one instance id, and
/// break and lose both chains. The kernel lets go of the lock when the
/// process ends, `kill -9` included.
fn lock(dir: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(dir.join(LOCK))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            return Err(io::Error::new(
                io::ErrorKind::ResourceBusy,
                "in use by another process (it holds the spool's lock): give each sidecar a spool directory of its own",
            ));
        }
        // Some file systems cannot lock; the spool still works there.
        Err(fs::TryLockError::Error(e)) => tracing::warn!(
            "cannot lock the decision log spool {}: {e}; make sure no other sidecar uses it",
            dir.display()
        ),
    }
    Ok(file)
}

fn instance_id(dir: &Path) -> io::Result<String> {
    let kept = match fs::read_to_string(dir.join("instance")) {
        Ok(id) => id.trim().to_owned(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e),
    };
    match kept {
        id if !id.is_empty() => Ok(id),
        // Lost while records are spooled: they say whose chain they are
        // (a new id would ship them as another instance's, refused).
        _ => match instance_in_segments(dir)? {
            Some(id) => {
                tracing::warn!(%id, "decision spool: its instance file was missing; the spooled records name the instance");
                set_instance_id(dir, &id)?;
                Ok(id)
            }
            None => new_instance_id(dir),
        },
    }
}

/// The instance of the newest segment whose first line is its own first
/// record (a later line could be a reused segment's older bytes).
fn instance_in_segments(dir: &Path) -> io::Result<Option<String>> {
    for (first, path) in segments(dir)?.iter().rev() {
        let bytes = fs::read(path)?;
        let line = bytes.split(|b| *b == b'\n').next().unwrap_or_default();
        if let Ok(line) = chain::parse_line(line)
            && line.seq == *first
        {
            return Ok(Some(line.instance));
        }
    }
    Ok(None)
}

/// Mints an instance id and puts it in place of any older one, durably;
/// then deletes released segments, which hold an older chain's records
/// (written over by the new one, their bytes would read as its own).
fn new_instance_id(dir: &Path) -> io::Result<String> {
    let id = uuid::Uuid::new_v7(uuid::Timestamp::now(uuid::NoContext)).to_string();
    set_instance_id(dir, &id)?;
    for (_, free) in files(dir, FREE_SUFFIX)? {
        fs::remove_file(free)?;
    }
    Ok(id)
}

/// Puts `id` in place of any instance id, durably.
fn set_instance_id(dir: &Path, id: &str) -> io::Result<()> {
    let tmp = dir.join("instance.tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(id.as_bytes())?;
    f.sync_all()?;
    fs::rename(&tmp, dir.join("instance"))?;
    sync_dir(dir)
}

/// Makes the directory's entries (new, renamed, removed files) durable.
/// Where directories cannot be synced (some file systems say EINVAL; not
/// on Windows at all), there is nothing more to do: that is no failure.
fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    match File::open(dir).and_then(|d| d.sync_all()) {
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::InvalidInput | io::ErrorKind::Unsupported
            ) =>
        {
            Ok(())
        }
        other => other,
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

/// Fewer bytes than any spooled line (`{"hash":"` and 64 hex digits alone
/// are 74): how many records damaged bytes can stand for, at most.
const MIN_LINE_BYTES: u64 = 64;

/// Writes all of `buf` at `offset`, whatever the file's cursor.
fn write_at(file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    #[cfg(unix)]
    {
        std::os::unix::fs::FileExt::write_all_at(file, buf, offset)
    }
    #[cfg(not(unix))]
    {
        use std::io::{Seek, SeekFrom};
        let mut file = file;
        file.seek(SeekFrom::Start(offset))?;
        file.write_all(buf)
    }
}

/// Keeps a segment's records up to the last whole line that continues the
/// chain from its first seq, and cuts the rest: a record torn by a crash, or
/// a reused segment's older bytes. Lines damaged where they lie (unreadable,
/// or this instance's record at the expected seq with a hash that does not
/// link) are kept when a later record of the chain follows them, its seq
/// past the ones they stand for by no more than their bytes can hold:
/// cutting there would delete intact records that were never shipped, and
/// the chain would go on over their seqs without a break to show it. A
/// reused segment's older bytes hold lower seqs, so they never pass for
/// such a record, nor does another instance's. Returns its last record and
/// how many of its bytes to keep ([`cut_after`] cuts the rest).
fn recover(path: &Path, first_seq: u64, instance: &str) -> io::Result<(Option<Head>, u64, bool)> {
    let mut bytes = Vec::new();
    File::open(path)?.read_to_end(&mut bytes)?;
    let mut kept = 0;
    let mut last: Option<Head> = None;
    let mut at = 0;
    while let Some(nl) = memchr::memchr(b'\n', &bytes[at..]) {
        let next = at + nl + 1;
        // Damaged lines since the last record kept.
        let damaged = at - kept;
        let Ok(line) = chain::parse_line(&bytes[at..at + nl]) else {
            at = next;
            continue;
        };
        let Some(expected) = last.map_or(Some(first_seq), |h| h.seq.checked_add(1)) else {
            break;
        };
        let links = last.is_none_or(|h| chain::link(&h.hash, line.body) == line.hash);
        let ours = line.instance == instance;
        if line.seq == expected && !links && ours {
            // Edited or flipped where it lies: damage, as an unreadable line.
            at = next;
            continue;
        }
        let in_order = line.seq == expected && links;
        let most_skipped = damaged as u64 / MIN_LINE_BYTES + 1;
        let past_damage =
            damaged > 0 && ours && line.seq > expected && line.seq - expected <= most_skipped;
        if !(in_order || past_damage) {
            // A record whose own seq (or instance) was damaged, right
            // before the next record: damage where it lies, like an
            // unreadable line. Anything else ends what the segment holds.
            if (line.seq != expected || !ours)
                && holds_record(&bytes[next..], expected + 1, instance)
            {
                at = next;
                continue;
            }
            break;
        }
        last = Some(Head {
            seq: line.seq,
            hash: line.hash,
        });
        kept = next;
        at = next;
    }
    let zeros_after = bytes[kept..].iter().all(|b| *b == 0);
    Ok((last, kept as u64, zeros_after))
}

/// Whether `bytes` start with a whole line that is record `seq` of `instance`.
fn holds_record(bytes: &[u8], seq: u64, instance: &str) -> bool {
    memchr::memchr(b'\n', bytes).is_some_and(|nl| {
        chain::parse_line(&bytes[..nl]).is_ok_and(|p| p.seq == seq && p.instance == instance)
    })
}

/// Cuts a segment to its first `kept` bytes (see [`recover`]).
fn cut_after(path: &Path, kept: u64) -> io::Result<()> {
    let len = fs::metadata(path)?.len();
    if kept < len {
        tracing::warn!(
            segment = %path.display(),
            cut = len - kept,
            "decision spool: cut what follows the last whole record (torn by a crash, or older bytes of a reused segment)"
        );
        let f = OpenOptions::new().write(true).open(path)?;
        f.set_len(kept)?;
        f.sync_all()?;
    }
    Ok(())
}

/// Releases segments whose every record is at or below `acked`, never the
/// newest (the writer appends to it) nor `open` (a reader's, which must not
/// see it written over): kept for reuse up to [`FREE_KEEP`], else deleted.
/// Returns the bytes of records released.
fn release_acked(dir: &Path, acked: u64, bytes: &AtomicU64, open: Option<u64>) -> io::Result<u64> {
    let segs = segments(dir)?;
    // A prepared segment is kept besides them: it holds no records.
    let mut kept = files(dir, FREE_SUFFIX)?
        .iter()
        .filter(|(n, _)| *n != PREPARED_NUMBER)
        .count();
    let mut freed = 0;
    for pair in segs.windows(2) {
        let ((first, path), (next_first, _)) = (&pair[0], &pair[1]);
        if next_first.saturating_sub(1) > acked || open == Some(*first) {
            break;
        }
        let len = fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        if kept < FREE_KEEP {
            fs::rename(path, free_path(dir, *first))?;
            kept += 1;
        } else {
            fs::remove_file(path)?;
        }
        bytes.fetch_sub(len.min(bytes.load(Ordering::Relaxed)), Ordering::Relaxed);
        freed += len;
    }
    Ok(freed)
}

/// Reads chained lines in order, following the writer across segments.
pub struct Reader {
    dir: PathBuf,
    live: Arc<Live>,
    /// The segment being read (by first seq) and how far.
    current: Option<(u64, File)>,
    read: u64,
    pending: Vec<u8>,
    /// The seq of the line just before `pending`'s first, where known: an
    /// unreadable line right after the last one shipped stands for the next
    /// seq, and is shipped as evidence rather than skipped.
    before_pending: Option<u64>,
    /// Chunks starting at or before this seq have every line checked, not
    /// only the last (see [`Reader::check_every_line_until`]).
    careful_until: u64,
}

/// Whole spooled lines, ready to ship as they are.
pub struct Chunk {
    pub first_seq: u64,
    pub count: u32,
    pub lines: Vec<u8>,
}

impl Reader {
    /// Appends up to one read's worth of the current segment to `pending`:
    /// in the segment being written, only as far as its records go.
    fn read_more(&mut self) -> io::Result<bool> {
        const READ: u64 = 64 * 1024;
        let Some((first, f)) = &mut self.current else {
            return Ok(false);
        };
        let limit = match self.live.get() {
            (live, len) if live == *first => len.saturating_sub(self.read).min(READ),
            _ => READ,
        };
        // Straight into `pending`'s spare room (no zeroing, no extra copy).
        self.pending.reserve(limit as usize);
        let n = f.take(limit).read_to_end(&mut self.pending)?;
        self.read += n as u64;
        Ok(n > 0)
    }

    pub fn new(dir: &Path, live: Arc<Live>) -> Self {
        Self {
            dir: dir.to_path_buf(),
            live,
            current: None,
            read: 0,
            pending: Vec::new(),
            before_pending: None,
            careful_until: 0,
        }
    }

    /// Checks every line of the chunks that start at or before `seq`, not
    /// only each chunk's last: after the control plane refused a batch, so
    /// that damage which merged and split records in one chunk (the count
    /// comes out right at the end, wrong in between) is found. Costs a
    /// parse per line, so only as far as the refused batches went.
    pub fn check_every_line_until(&mut self, seq: u64) {
        self.careful_until = seq;
    }

    /// Releases the segments the control plane has acknowledged entirely
    /// (see [`release_acked`]); returns the bytes released.
    pub fn release(&self, acked: u64, bytes: &AtomicU64) -> io::Result<u64> {
        let open = self.current.as_ref().map(|(first, _)| *first);
        release_acked(&self.dir, acked, bytes, open)
    }

    /// Up to `max_lines` whole lines (about `max_bytes`) after seq `after`;
    /// `None` when there is nothing new yet.
    pub fn next_chunk(
        &mut self,
        after: u64,
        max_lines: usize,
        max_bytes: usize,
    ) -> io::Result<Option<Chunk>> {
        let mut first_seq = None;
        let mut placed = false;
        let mut undecided = false;
        let mut taken = 0; // bytes of `pending` that go into the chunk
        let mut count = 0u32;
        loop {
            // Take whole lines from what is buffered.
            while let Some(nl) = memchr::memchr(b'\n', &self.pending[taken..]) {
                let line = &self.pending[taken..taken + nl];
                if first_seq.is_none() {
                    // Only the first line of a chunk is parsed: the rest
                    // follow it without gaps (one writer numbers them).
                    let parsed = chain::parse_line(line);
                    match parsed {
                        // Damaged (unreadable, or its own seq or instance
                        // changed), right
                        // after the last line shipped and right before the
                        // record after next: it is the next seq, and goes as
                        // evidence (the control plane keeps it there and the
                        // chain breaks there). Taking a damaged seq would
                        // skip the records up to it. Damage that merged or
                        // split records cannot be placed so.
                        _ if !self.is_record(&parsed, after + 1)
                            && self.before_pending == Some(after)
                            && self.holds_at(taken + nl + 1, after + 2) =>
                        {
                            first_seq = Some(after + 1);
                            placed = true;
                        }
                        // The same, with the line after it not read yet:
                        // read on before judging (where a read or a segment
                        // ends must not decide), or wait for it.
                        _ if !self.is_record(&parsed, after + 1)
                            && self.before_pending == Some(after)
                            && memchr::memchr(b'\n', &self.pending[taken + nl + 1..]).is_none() =>
                        {
                            undecided = true;
                            break;
                        }
                        Ok(p) if p.seq <= after => {
                            let seq = p.seq;
                            self.pending.drain(..=taken + nl);
                            self.before_pending = Some(seq);
                            continue;
                        }
                        Ok(p) => first_seq = Some(p.seq),
                        Err(e) => {
                            tracing::warn!("decision spool: skipping an unreadable line: {e}");
                            self.pending.drain(..=taken + nl);
                            self.before_pending = None;
                            continue;
                        }
                    }
                }
                taken += nl + 1;
                count += 1;
                // A placed line goes with the one after it, whose seq shows
                // the control plane where it stands.
                if (count as usize >= max_lines || taken >= max_bytes) && !(placed && count < 2) {
                    break;
                }
            }
            if undecided {
                undecided = false;
                if self.fill(after)? {
                    continue;
                }
                return Ok(None);
            }
            let full = count as usize >= max_lines || taken >= max_bytes;
            if full || !self.fill(after)? {
                break;
            }
        }
        let Some(first_seq) = first_seq.filter(|_| count > 0) else {
            return Ok(None);
        };
        let careful = first_seq <= self.careful_until;
        let (count, taken) = in_place(
            &self.pending[..taken],
            (first_seq, &self.live.instance),
            count,
            careful,
        );
        self.before_pending = Some(first_seq + u64::from(count) - 1);
        // The chunk keeps the buffer; only the partial rest is copied.
        let rest = self.pending.split_off(taken);
        Ok(Some(Chunk {
            first_seq,
            count,
            lines: std::mem::replace(&mut self.pending, rest),
        }))
    }

    /// Whether the line at `at` in `pending` is whole and the record `seq`.
    fn holds_at(&self, at: usize, seq: u64) -> bool {
        holds_record(
            &self.pending[at.min(self.pending.len())..],
            seq,
            &self.live.instance,
        )
    }

    /// Whether a parsed line is this spool's record `seq`.
    fn is_record(&self, parsed: &Result<chain::Line<'_>, String>, seq: u64) -> bool {
        parsed
            .as_ref()
            .is_ok_and(|p| p.seq == seq && p.instance == self.live.instance)
    }

    /// Reads more bytes; false when nothing new is there yet.
    fn fill(&mut self, after: u64) -> io::Result<bool> {
        if self.read_more()? {
            return Ok(true);
        }
        // At the end of the current segment: list, then read once more.
        // Once a newer segment is listed the current one is complete, so
        // what that read finds is all it will ever hold.
        let segs = segments(&self.dir)?;
        if self.read_more()? {
            return Ok(true);
        }
        let next = match &self.current {
            // Start in the last segment whose first seq is <= after + 1.
            None => segs
                .iter()
                .rev()
                .find(|(first, _)| *first <= after + 1)
                .or(segs.first()),
            Some((first, _)) => segs.iter().find(|(f, _)| f > first),
        };
        match next {
            Some((first, path)) => {
                // A partial line at the end of a finished segment cannot be
                // completed (a crash tore it): drop it, keep whole lines.
                let whole = self
                    .pending
                    .iter()
                    .rposition(|b| *b == b'\n')
                    .map_or(0, |i| i + 1);
                self.pending.truncate(whole);
                if self.pending.is_empty() {
                    // A segment is named by its first line's seq.
                    self.before_pending = first.checked_sub(1);
                }
                self.current = Some((*first, File::open(path)?));
                self.read = 0;
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

/// How many of a chunk's `count` whole lines, and how many of its bytes, are
/// at the seqs counting from `first_seq` gives them: all of them, unless
/// damage in between merged or split records and a readable line after it
/// is out of place; then those up to the last readable line in its place (a
/// misnumbered record would make the control plane refuse the batch on
/// every resend). The rest is read again as the
/// next chunk's start, where a line that cannot be placed is skipped into a
/// gap the control plane flags. Parses the last line when all is well,
/// every line when not or when `careful`.
fn in_place(
    lines: &[u8],
    (first_seq, instance): (u64, &str),
    count: u32,
    careful: bool,
) -> (u32, usize) {
    let body = &lines[..lines.len().saturating_sub(1)];
    let last_start = memchr::memrchr(b'\n', body).map_or(0, |i| i + 1);
    let last_seq = first_seq + u64::from(count) - 1;
    let ours = |p: &chain::Line<'_>, seq: u64| p.seq == seq && p.instance == instance;
    if count == 1
        || !careful && chain::parse_line(&body[last_start..]).is_ok_and(|p| ours(&p, last_seq))
    {
        return (count, lines.len());
    }
    // The first line is in place: read, or a damaged one already placed.
    let mut whole = lines.split_inclusive(|b| *b == b'\n');
    let first_len = whole.next().map_or(0, <[u8]>::len);
    let (mut kept, mut kept_bytes, mut at) = (1, first_len, first_len);
    for (i, line) in whole.enumerate() {
        at += line.len();
        match chain::parse_line(&line[..line.len() - 1]) {
            Ok(p) if ours(&p, first_seq + i as u64 + 1) => (kept, kept_bytes) = (i as u32 + 2, at),
            Ok(_) => break,
            // Unreadable lines go where they are counted, as evidence, until
            // a readable one shows the count is off.
            Err(_) if at == lines.len() => return (count, lines.len()),
            Err(_) => {}
        }
    }
    if kept == count {
        return (count, lines.len());
    }
    tracing::warn!(
        "decision spool: damage after seq {} merged or split records; shipping up to it",
        first_seq + u64::from(kept) - 1
    );
    (kept, kept_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Opens a spool whose instance is `i`, as `lines` writes records of
    /// (unless the directory already names one).
    fn open_as_i(dir: &Path, segment_max: u64) -> io::Result<(Spool, String, Head)> {
        fs::create_dir_all(dir)?;
        if !dir.join("instance").exists() {
            fs::write(dir.join("instance"), "i")?;
        }
        Spool::open(dir, segment_max)
    }

    fn lines(from: u64, to: u64, prev: &mut Hash) -> Vec<u8> {
        lines_of("i", from, to, prev)
    }

    /// Chained lines of records `from..=to` of `instance`.
    fn lines_of(instance: &str, from: u64, to: u64, prev: &mut Hash) -> Vec<u8> {
        let mut out = Vec::new();
        for seq in from..=to {
            let body = format!(r#"{{"seq":{seq},"instance":"{instance}"}}"#);
            *prev = chain::link(prev, body.as_bytes());
            chain::write_line(&mut out, prev, body.as_bytes());
        }
        out
    }

    #[test]
    fn a_spool_in_use_cannot_be_opened_again_until_it_is_closed() {
        let dir = tempfile::tempdir().expect("tmp");
        let (spool, instance, _) = open_as_i(dir.path(), 200).expect("open");
        let Err(e) = open_as_i(dir.path(), 200) else {
            panic!("a second writer opened the spool");
        };
        assert_eq!(e.kind(), io::ErrorKind::ResourceBusy);
        assert!(e.to_string().contains("in use by another process"), "{e}");
        drop(spool);
        let (_, again, _) = open_as_i(dir.path(), 200).expect("open once closed");
        assert_eq!(again, instance);
    }

    #[test]
    fn appends_rotates_reads_back_and_deletes_only_what_is_acked() {
        let dir = tempfile::tempdir().expect("tmp");
        let (mut spool, instance, head) = open_as_i(dir.path(), 200).expect("open");
        assert_eq!(head.seq, 0);
        // A new spool's first segment too is named with its first batch.
        assert!(segments(dir.path()).expect("list").is_empty());
        let mut prev = GENESIS;
        append_batches(&mut spool, 1, 5, &mut prev);
        assert!(segments(dir.path()).expect("list").len() > 1, "rotated");

        let mut reader = Reader::new(dir.path(), spool.live.clone());
        let mut got = Vec::new();
        let mut after = 6;
        while let Some(chunk) = reader.next_chunk(after, 5, usize::MAX).expect("read") {
            for line in chunk.lines.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                got.push(chain::parse_line(line).expect("line").seq);
            }
            assert_eq!(chunk.first_seq, after + 1);
            after += u64::from(chunk.count);
        }
        assert_eq!(got, (7..=20).collect::<Vec<_>>());

        let before = spool.bytes.load(Ordering::Relaxed);
        let freed = reader.release(10, &spool.bytes).expect("release");
        assert!(freed > 0 && spool.bytes.load(Ordering::Relaxed) == before - freed);
        let firsts: Vec<u64> = segments(dir.path())
            .expect("list")
            .iter()
            .map(|s| s.0)
            .collect();
        assert!(
            firsts[0] <= 11,
            "a segment holding seq 11 is kept: {firsts:?}"
        );

        // Restart: same instance, chain resumes after seq 20.
        drop(spool);
        let (_, again, head) = open_as_i(dir.path(), 200).expect("reopen");
        assert_eq!((again, head.seq, head.hash), (instance, 20, prev));
    }

    #[test]
    fn a_torn_tail_is_cut_on_open() {
        let dir = tempfile::tempdir().expect("tmp");
        let (mut spool, _, _) = open_as_i(dir.path(), 1 << 20).expect("open");
        let mut prev = GENESIS;
        spool
            .append(&lines(1, 3, &mut prev), 1, true)
            .expect("append");
        spool
            .append(br#"{"hash":"00","rec"#, 4, true)
            .expect("torn");
        drop(spool);
        let (spool, _, head) = open_as_i(dir.path(), 1 << 20).expect("reopen");
        assert_eq!((head.seq, head.hash), (3, prev));
        let on_disk = fs::read(segment_path(dir.path(), 1)).expect("read");
        assert!(on_disk.ends_with(b"}\n"));
        assert_eq!(spool.bytes.load(Ordering::Relaxed), on_disk.len() as u64);
    }

    /// Damage in the middle of the segment being written (a line garbled
    /// where it lies; records merged into one line, one split in two) is
    /// no end of the chain: reopening keeps every record after it, and the
    /// chain goes on after the last.
    #[test]
    fn reopening_keeps_the_records_after_damage_in_the_newest_segment() {
        type Damage = fn(&mut Vec<u8>, &[usize]);
        let garble: Damage =
            |text, breaks| text[breaks[2] + 1..breaks[2] + 9].copy_from_slice(b"#garble#");
        let merge_and_split: Damage = |text, breaks| {
            text[breaks[2]] = b' ';
            text[breaks[5] + 10] = b'\n';
        };
        // A flipped hex digit of a hash: the line still reads, and does not
        // link.
        let flip: Damage = |text, breaks| {
            let at = breaks[2] + 10;
            text[at] = if text[at] == b'0' { b'1' } else { b'0' };
        };
        // A record's own seq changed: it reads, in the wrong place.
        let renumber: Damage = |text, _| {
            let at = memchr::memmem::find(text, b"\"seq\":3,").expect("record 3");
            text.splice(at..at + 7, b"\"seq\":900000".iter().copied());
        };
        // Its instance changed (the first digit of the id).
        let other_instance: Damage = |text, breaks| {
            let line = breaks[1] + 1;
            let at = line
                + memchr::memmem::find(&text[line..], b"\"instance\":\"").expect("instance")
                + 12;
            text[at] = if text[at] == b'0' { b'1' } else { b'0' };
        };
        for damage in [garble, merge_and_split, flip, renumber, other_instance] {
            let dir = tempfile::tempdir().expect("tmp");
            let (mut spool, instance, _) = open_as_i(dir.path(), 1 << 20).expect("open");
            let mut prev = GENESIS;
            let mut text = lines_of(&instance, 1, 10, &mut prev);
            let breaks: Vec<usize> = memchr::memchr_iter(b'\n', &text).collect();
            damage(&mut text, &breaks);
            spool.append(&text, 1, true).expect("append");
            drop(spool);
            let (_, again, head) = open_as_i(dir.path(), 1 << 20).expect("reopen");
            assert_eq!((again, head.seq, head.hash), (instance, 10, prev));
            let on_disk = fs::read(segment_path(dir.path(), 1)).expect("read");
            // The records, then the prepared segment's zeros.
            assert!(on_disk.starts_with(&text), "nothing cut");
            assert!(on_disk[text.len()..].iter().all(|b| *b == 0));
        }
        // A torn record after damage is still cut, and so are a reused
        // segment's older records after it.
        let dir = tempfile::tempdir().expect("tmp");
        let (spool, instance, _) = open_as_i(dir.path(), 1 << 20).expect("open");
        drop(spool);
        let mut prev = GENESIS;
        let mut text = lines_of(&instance, 5, 8, &mut prev);
        let breaks: Vec<usize> = memchr::memchr_iter(b'\n', &text).collect();
        text[breaks[0] + 1..breaks[0] + 9].copy_from_slice(b"#garble#");
        let whole = text.len();
        text.extend_from_slice(br#"{"hash":"00","rec"#);
        text.extend_from_slice(&lines_of(&instance, 1, 2, &mut GENESIS.clone()));
        fs::write(segment_path(dir.path(), 5), &text).expect("segment");
        let (_, _, head) = open_as_i(dir.path(), 1 << 20).expect("reopen");
        assert_eq!((head.seq, head.hash), (8, prev));
        let on_disk = fs::read(segment_path(dir.path(), 5)).expect("read");
        assert_eq!(on_disk.len(), whole);
        // Nor is another instance's record after damage taken for this
        // chain's, nor one of this instance whose seq is further past the
        // damage than the damaged bytes could hold (a flipped digit of a
        // seq); and a released segment named past the head is not kept for
        // reuse.
        for (whose, seq) in [("another", 5), ("this", 800)] {
            let dir = tempfile::tempdir().expect("tmp");
            let (spool, instance, _) = open_as_i(dir.path(), 1 << 20).expect("open");
            drop(spool);
            let mut prev = GENESIS;
            let mut text = lines_of(&instance, 1, 3, &mut prev);
            text.extend_from_slice(b"#garble#\n");
            let after = if whose == "this" { &instance } else { whose };
            text.extend_from_slice(&lines_of(after, seq, seq, &mut GENESIS.clone()));
            fs::write(segment_path(dir.path(), 1), &text).expect("segment");
            let stale = free_path(dir.path(), 700);
            fs::write(&stale, lines_of(&instance, 700, 701, &mut GENESIS.clone())).expect("free");
            let (_, _, head) = open_as_i(dir.path(), 1 << 20).expect("reopen");
            assert_eq!((head.seq, head.hash), (3, prev), "{after} {seq}");
            assert!(!stale.exists(), "a released segment past the head is gone");
        }
    }

    /// A spool whose instance file went missing goes on as the instance
    /// its records name, not as a new one whose batches would hold another
    /// instance's records.
    #[test]
    fn a_lost_instance_file_is_found_again_in_the_records() {
        let dir = tempfile::tempdir().expect("tmp");
        let (mut spool, instance, _) = open_as_i(dir.path(), 1 << 20).expect("open");
        let mut prev = GENESIS;
        let text = lines_of(&instance, 1, 3, &mut prev);
        spool.append(&text, 1, true).expect("append");
        drop(spool);
        fs::remove_file(dir.path().join("instance")).expect("lose it");
        let (_, again, head) = open_as_i(dir.path(), 1 << 20).expect("reopen");
        assert_eq!((again.as_str(), head.seq), (instance.as_str(), 3));
        let kept = fs::read_to_string(dir.path().join("instance")).expect("restored");
        assert_eq!(kept, instance);

        // Only a segment's own first record names it: a later line could
        // be a reused segment's older bytes, of another chain.
        let dir = tempfile::tempdir().expect("tmp");
        let (spool, instance, _) = open_as_i(dir.path(), 1 << 20).expect("open");
        drop(spool);
        let mut text = b"#garble#\n".to_vec();
        text.extend_from_slice(&lines_of("older", 2, 2, &mut GENESIS.clone()));
        fs::write(segment_path(dir.path(), 1), &text).expect("segment");
        fs::remove_file(dir.path().join("instance")).expect("lose it");
        let (_, minted, _) = open_as_i(dir.path(), 1 << 20).expect("reopen");
        assert!(minted != "older" && minted != instance, "{minted}");
    }

    /// Recovery reads before it cuts: the cut is made only once what the
    /// spool goes on as (its head, or a new chain's id) is decided.
    #[test]
    fn recovery_reads_a_segment_without_changing_it() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = segment_path(dir.path(), 1);
        let mut prev = GENESIS;
        let mut text = lines_of("i", 1, 2, &mut prev);
        let whole = text.len() as u64;
        text.extend_from_slice(br#"{"hash":"00","rec"#);
        fs::write(&path, &text).expect("segment");
        let (head, kept, _) = recover(&path, 1, "i").expect("recover");
        assert_eq!((head.map(|h| h.seq), kept), (Some(2), whole));
        assert_eq!(fs::read(&path).expect("read"), text, "not cut yet");
        cut_after(&path, kept).expect("cut");
        assert_eq!(fs::metadata(&path).expect("len").len(), whole);
    }

    /// Appends `batches` batches of four records from seq `from`.
    fn append_batches(spool: &mut Spool, from: u64, batches: u64, prev: &mut Hash) {
        for k in 0..batches {
            let first = from + k * 4;
            spool
                .append(&lines(first, first + 3, prev), first, true)
                .expect("append");
        }
    }

    /// Zeros a segment is prepared with in the tests below.
    const PREPARED_BYTES: u64 = 64 * 1024;

    #[test]
    fn a_new_spool_writes_its_first_records_over_a_prepared_segment() {
        let dir = tempfile::tempdir().expect("tmp");
        let (mut spool, _, _) = open_as_i(dir.path(), PREPARED_BYTES).expect("open");
        let next = dir.path().join(NEXT);
        let before = fs::read(&next).expect("next");
        assert_eq!(before.len() as u64, PREPARED_BYTES);
        assert!(before.iter().all(|b| *b == 0), "filled with zeros");

        let mut prev = GENESIS;
        let batch = lines(1, 3, &mut prev);
        spool.append(&batch, 1, true).expect("append");
        let first = segment_path(dir.path(), 1);
        // Written over in place: the file did not grow, nor shrink.
        assert_eq!(fs::metadata(&first).expect("seg").len(), PREPARED_BYTES);
        assert_eq!(spool.bytes.load(Ordering::Relaxed), batch.len() as u64);
        let mut reader = Reader::new(dir.path(), spool.live.clone());
        assert_eq!(read_all(&mut reader, 0), vec![1, 2, 3]);

        // Stopped (or killed) there: the zeros after the records stay, and
        // the chain goes on over them.
        drop(spool);
        let (mut spool, _, head) = open_as_i(dir.path(), PREPARED_BYTES).expect("reopen");
        assert_eq!((head.seq, head.hash), (3, prev));
        assert_eq!(spool.bytes.load(Ordering::Relaxed), batch.len() as u64);
        // A reader made at open (as the shipper's is) stops at the records,
        // and finds the next batch where it is written.
        let mut shipping = Reader::new(dir.path(), spool.live.clone());
        assert_eq!(read_all(&mut shipping, 0), vec![1, 2, 3]);
        let more = lines(4, 5, &mut prev);
        spool.append(&more, 4, true).expect("append");
        assert_eq!(read_all(&mut shipping, 3), vec![4, 5]);
        let on_disk = fs::read(&first).expect("seg");
        assert_eq!(
            on_disk.len() as u64,
            PREPARED_BYTES,
            "written over in place"
        );
        assert_eq!(&on_disk[..batch.len() + more.len()], [batch, more].concat());
        let mut reader = Reader::new(dir.path(), spool.live.clone());
        assert_eq!(read_all(&mut reader, 0), (1..=5).collect::<Vec<_>>());
        drop(spool);
        let (_, _, head) = open_as_i(dir.path(), PREPARED_BYTES).expect("reopen");
        assert_eq!((head.seq, head.hash), (5, prev));
    }

    #[test]
    fn a_segment_is_prepared_ahead_for_the_next_one() {
        let dir = tempfile::tempdir().expect("tmp");
        let (mut spool, _, _) = open_as_i(dir.path(), PREPARED_BYTES).expect("open");
        spool.wait_prepared();
        let prepared = free_path(dir.path(), PREPARED_NUMBER);
        let bytes = fs::read(&prepared).expect("prepared");
        assert_eq!(bytes.len() as u64, PREPARED_BYTES);
        assert!(bytes.iter().all(|b| *b == 0));

        // Nothing acknowledged, so nothing released: each segment started
        // is the prepared one, and another is prepared behind it. Batches
        // of about a third of a segment: a fourth starts the next one.
        let mut prev = GENESIS;
        let mut rotations = 0;
        for k in 0..12 {
            let from = 1 + k * 200;
            let batch = lines(from, from + 199, &mut prev);
            assert!((PREPARED_BYTES / 4..PREPARED_BYTES / 2).contains(&(batch.len() as u64)));
            let before = segments(dir.path()).expect("segments").len();
            spool.append(&batch, from, true).expect("append");
            let after = segments(dir.path()).expect("segments");
            if after.len() > before && before > 0 {
                rotations += 1;
                // Started in the prepared file: as long as it, not as the batch.
                let (first, live) = after.last().expect("live");
                assert_eq!(*first, from);
                assert_eq!(fs::metadata(live).expect("live").len(), PREPARED_BYTES);
                spool.wait_prepared();
                assert!(prepared.exists(), "another one prepared");
            }
        }
        assert_eq!(rotations, 3);
        let mut reader = Reader::new(dir.path(), spool.live.clone());
        assert_eq!(read_all(&mut reader, 0), (1..=2400).collect::<Vec<_>>());
        drop(spool);
        let (_, _, head) = open_as_i(dir.path(), PREPARED_BYTES).expect("reopen");
        assert_eq!((head.seq, head.hash), (2400, prev));
        assert_eq!(seqs_on_disk(dir.path()), (1..=2400).collect::<Vec<_>>());
    }

    #[test]
    fn preparing_gives_way_to_records() {
        let dir = tempfile::tempdir().expect("tmp");
        // Stopped (closing, or the disk full): nothing of it is left.
        let stopped = PrepareState::default();
        stopped.cancel.store(true, Ordering::Relaxed);
        let e = prepare_segment(dir.path(), PREPARED_BYTES, &stopped).expect_err("stopped");
        assert_eq!(e.kind(), io::ErrorKind::Interrupted);
        // Where the disk has no room for a segment and the headroom besides,
        // none is prepared (this one asks for more than any disk has).
        assert!(!room_to_prepare(dir.path(), u64::MAX / 2));
        assert!(room_to_prepare(dir.path(), PREPARED_BYTES));
        let names: Vec<_> = fs::read_dir(dir.path()).expect("dir").collect();
        assert!(names.is_empty(), "{names:?}");
        // One a crash left half written is removed on open.
        fs::write(dir.path().join(PREPARE_TMP), [0; 100]).expect("tmp");
        let (mut spool, _, _) = open_as_i(dir.path(), PREPARED_BYTES).expect("open");
        spool.wait_prepared();
        assert!(!dir.path().join(PREPARE_TMP).exists());
    }

    #[test]
    fn recovery_tells_a_prepared_segments_zeros_from_other_bytes() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("seg");
        let mut prev = GENESIS;
        let mut bytes = lines(1, 2, &mut prev);
        let records = bytes.len() as u64;
        bytes.extend([0; 100]);
        fs::write(&path, &bytes).expect("write");
        let (head, kept, zeros) = recover(&path, 1, "i").expect("recover");
        assert_eq!((head.map(|h| h.seq), kept, zeros), (Some(2), records, true));
        bytes.extend(b"{\"torn");
        fs::write(&path, &bytes).expect("write");
        let (_, kept, zeros) = recover(&path, 1, "i").expect("recover");
        assert_eq!((kept, zeros), (records, false));
    }

    /// Every seq in the segment files, in order, each file checked to hold
    /// a run of consecutive records and nothing else (but for zeros after
    /// the newest one's: the rest of a prepared segment).
    fn seqs_on_disk(dir: &Path) -> Vec<u64> {
        let mut all = Vec::new();
        let segs = segments(dir).expect("list");
        let newest = segs.last().map(|(first, _)| *first);
        for (first, path) in segs {
            let mut bytes = fs::read(&path).expect("read");
            if Some(first) == newest {
                // The rest of a prepared segment.
                let records = bytes.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
                bytes.truncate(records);
            }
            assert!(bytes.is_empty() || bytes.ends_with(b"\n"), "{path:?}");
            let seqs: Vec<u64> = bytes
                .split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
                .map(|l| chain::parse_line(l).expect("only records").seq)
                .collect();
            let want: Vec<u64> = (first..first + seqs.len() as u64).collect();
            assert_eq!(seqs, want, "{path:?}");
            all.extend(seqs);
        }
        all
    }

    fn read_all(reader: &mut Reader, mut after: u64) -> Vec<u64> {
        let mut got = Vec::new();
        while let Some(chunk) = reader.next_chunk(after, 3, usize::MAX).expect("read") {
            assert_eq!(chunk.first_seq, after + 1);
            for line in chunk.lines.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                got.push(chain::parse_line(line).expect("line").seq);
            }
            after += u64::from(chunk.count);
        }
        got
    }

    /// A line damaged in place right after the last one shipped goes out
    /// at its seq, as evidence; it is not skipped into a gap.
    #[test]
    fn a_damaged_line_is_shipped_at_its_seq() {
        // Line 3 mangled where it lies.
        let (dir, spool, _) = damaged_spool(5, |text, breaks| {
            text[breaks[1] + 1..breaks[1] + 9].copy_from_slice(b"#garble#")
        });
        let mut reader = Reader::new(dir.path(), spool.live.clone());
        let first = reader
            .next_chunk(0, 2, usize::MAX)
            .expect("read")
            .expect("1..=2");
        assert_eq!((first.first_seq, first.count), (1, 2));
        let next = reader
            .next_chunk(2, 10, usize::MAX)
            .expect("read")
            .expect("3..=5");
        assert_eq!((next.first_seq, next.count), (3, 3));
        assert!(next.lines.starts_with(b"#garble#"));
        // Read afresh (a new session) from after seq 2: the same.
        let mut fresh = Reader::new(dir.path(), spool.live.clone());
        assert_eq!(chunk_at(&mut fresh, 2), (3, 3));

        // Damage that merged two records into one line cannot be placed:
        // skipped, the next record goes at its own seq (a gap the control
        // plane flags), never misnumbered.
        let (dir, spool, _) = damaged_spool(5, |text, breaks| {
            text[breaks[2]] = b' ';
            text[breaks[1] + 1..breaks[1] + 9].copy_from_slice(b"#garble#");
        });
        let mut reader = Reader::new(dir.path(), spool.live.clone());
        assert_eq!(chunk_at(&mut reader, 2), (5, 1));
    }

    /// A record whose own seq was damaged (higher or lower) goes out at
    /// the seq it stands at, as evidence: taking its seq would skip every
    /// record up to it, or pass it over as already shipped.
    #[test]
    fn a_record_whose_seq_was_damaged_is_shipped_at_its_place() {
        // Its seq higher, lower, or its instance another.
        for claimed in [
            "\"seq\":70000,\"instance\":\"i\"",
            "\"seq\":1,\"instance\":\"i\"",
            "\"seq\":3,\"instance\":\"j\"",
        ] {
            let (dir, spool, _) = damaged_spool(5, |text, _| {
                let at =
                    memchr::memmem::find(text, b"\"seq\":3,\"instance\":\"i\"").expect("record 3");
                text.splice(at..at + 22, claimed.bytes());
            });
            let mut reader = Reader::new(dir.path(), spool.live.clone());
            // Mid-chunk it rides along at its place.
            assert_eq!(chunk_at(&mut reader, 0), (1, 5), "{claimed}");
            let mut fresh = Reader::new(dir.path(), spool.live.clone());
            assert_eq!(chunk_at(&mut fresh, 2), (3, 3), "{claimed}");
            // Never alone: the record after it shows where it stands.
            let mut fresh = Reader::new(dir.path(), spool.live.clone());
            let one = fresh
                .next_chunk(2, 1, usize::MAX)
                .expect("read")
                .expect("3..=4");
            assert_eq!((one.first_seq, one.count), (3, 2), "{claimed}");
        }
    }

    /// Where a segment (or a read) ends does not decide: a damaged record
    /// last in its segment is placed by the first record of the next, and
    /// one whose next record is not written yet waits for it.
    #[test]
    fn a_damaged_record_last_in_its_segment_is_placed_by_the_next() {
        let dir = tempfile::tempdir().expect("tmp");
        // Segments of one four-record batch each.
        let (mut spool, _, _) = open_as_i(dir.path(), 100).expect("open");
        let mut prev = GENESIS;
        append_batches(&mut spool, 1, 1, &mut prev);
        let first = segment_path(dir.path(), 1);
        let text = String::from_utf8(fs::read(&first).expect("read")).expect("utf-8");
        assert!(
            text.trim_end_matches('\0')
                .ends_with("\"seq\":4,\"instance\":\"i\"}}\n")
        );
        // Same length: the segment being written is read as far as its
        // records go.
        let damaged = text.replacen("\"seq\":4,", "\"seq\":9,", 1);
        fs::write(&first, damaged).expect("damage");
        let mut reader = Reader::new(dir.path(), spool.live.clone());
        let head = reader
            .next_chunk(0, 3, usize::MAX)
            .expect("read")
            .expect("1..=3");
        assert_eq!((head.first_seq, head.count), (1, 3));
        // Record 5 not written yet: no jump to seq 9, nothing yet.
        assert!(
            reader
                .next_chunk(3, 100, usize::MAX)
                .expect("read")
                .is_none()
        );
        append_batches(&mut spool, 5, 1, &mut prev);
        assert_eq!(chunk_at(&mut reader, 3), (4, 5), "placed by record 5");
        let mut fresh = Reader::new(dir.path(), spool.live.clone());
        assert_eq!(chunk_at(&mut fresh, 3), (4, 5), "read afresh");
    }

    /// A spool holding records 1..=`to` as one batch, `damage`d first (it
    /// gets the lines and where each ends); returned with a reader of it
    /// and the lines as written.
    fn damaged_spool(
        to: u64,
        damage: impl FnOnce(&mut Vec<u8>, &[usize]),
    ) -> (tempfile::TempDir, Spool, Vec<u8>) {
        let dir = tempfile::tempdir().expect("tmp");
        let (mut spool, _, _) = open_as_i(dir.path(), 1 << 20).expect("open");
        let mut text = lines(1, to, &mut GENESIS.clone());
        let breaks: Vec<usize> = memchr::memchr_iter(b'\n', &text).collect();
        damage(&mut text, &breaks);
        spool.append(&text, 1, true).expect("append");
        (dir, spool, text)
    }

    /// The first seq and line count of the next chunk after `after`.
    fn chunk_at(reader: &mut Reader, after: u64) -> (u64, u32) {
        let c = reader
            .next_chunk(after, 100, usize::MAX)
            .expect("read")
            .expect("a chunk");
        (c.first_seq, c.count)
    }

    /// Damage in the middle of a chunk that merged or split records: the
    /// chunk stops before it, and what follows goes at its own seqs after
    /// a gap, so the control plane can take every batch.
    #[test]
    fn damage_that_moved_line_breaks_mid_chunk_ends_the_chunk_before_it() {
        for merge in [true, false] {
            let (dir, spool, text) = damaged_spool(8, |text, breaks| {
                if merge {
                    text[breaks[3]] = b' '; // records 4 and 5 on one line
                } else {
                    text[breaks[2] + 10] = b'\n'; // record 4 in two lines
                }
            });
            let mut reader = Reader::new(dir.path(), spool.live.clone());
            let head = reader
                .next_chunk(0, 100, usize::MAX)
                .expect("read")
                .expect("1..=3");
            assert_eq!((head.first_seq, head.count), (1, 3), "merge {merge}");
            let third_ends = memchr::memchr_iter(b'\n', &text).nth(2).expect("3 lines");
            assert_eq!(head.lines, text[..=third_ends]);
            let tail = reader
                .next_chunk(3, 100, usize::MAX)
                .expect("read")
                .expect("the rest");
            let first_after = if merge { 6 } else { 5 };
            assert_eq!(
                (tail.first_seq, tail.count),
                (first_after, 9 - first_after as u32),
                "merge {merge}"
            );
            let seqs: Vec<u64> = tail
                .lines
                .split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
                .map(|l| chain::parse_line(l).expect("line").seq)
                .collect();
            assert_eq!(seqs, (first_after..=8).collect::<Vec<_>>());
        }

        // A merge and a split in one chunk: the count comes out right at
        // the end, so only a reader told to check every line finds it.
        let (dir, spool, _) = damaged_spool(8, |text, breaks| {
            text[breaks[2]] = b' '; // records 3 and 4 on one line
            text[breaks[5] + 10] = b'\n'; // record 7 in two lines
        });
        let mut hasty = Reader::new(dir.path(), spool.live.clone());
        assert_eq!(chunk_at(&mut hasty, 0), (1, 8), "the count alone passes");
        let mut careful = Reader::new(dir.path(), spool.live.clone());
        careful.check_every_line_until(1);
        assert_eq!(chunk_at(&mut careful, 0), (1, 2));
        // An intact chunk read carefully is whole.
        let (dir, spool, _) = damaged_spool(5, |_, _| {});
        let mut careful = Reader::new(dir.path(), spool.live.clone());
        careful.check_every_line_until(5);
        assert_eq!(chunk_at(&mut careful, 0), (1, 5));

        // Damaged lines at a chunk's end with no readable line after them
        // to show the count is off go where they are counted, as evidence.
        let (dir, spool, _) = damaged_spool(4, |text, breaks| {
            text[breaks[2] + 1..breaks[2] + 9].copy_from_slice(b"#garble#")
        });
        let mut reader = Reader::new(dir.path(), spool.live.clone());
        assert_eq!(chunk_at(&mut reader, 0), (1, 4));
    }

    #[test]
    fn released_segments_are_written_over_without_their_older_records_showing() {
        let dir = tempfile::tempdir().expect("tmp");
        let (mut spool, _, _) = open_as_i(dir.path(), 200).expect("open");
        let mut prev = GENESIS;
        // Five segments of four records each (a batch fills a segment).
        append_batches(&mut spool, 1, 5, &mut prev);
        let mut reader = Reader::new(dir.path(), spool.live.clone());
        assert_eq!(read_all(&mut reader, 0), (1..=20).collect::<Vec<_>>());
        // The first three are acknowledged: two are kept for reuse (the
        // prepared segment besides them).
        spool.wait_prepared();
        assert!(free_path(dir.path(), PREPARED_NUMBER).exists());
        let before = spool.bytes.load(Ordering::Relaxed);
        let freed = reader.release(12, &spool.bytes).expect("release");
        assert_eq!(spool.bytes.load(Ordering::Relaxed), before - freed);
        let released = files(dir.path(), FREE_SUFFIX).expect("free");
        let released = released.iter().filter(|(n, _)| *n != PREPARED_NUMBER);
        assert_eq!(released.count(), FREE_KEEP);
        assert_eq!(seqs_on_disk(dir.path()), (13..=20).collect::<Vec<_>>());

        // One record per batch now: a reused segment is longer than what is
        // written into it, and the reader must stop where its records end.
        for seq in 21..=40 {
            spool
                .append(&lines(seq, seq, &mut prev), seq, true)
                .expect("append");
            assert_eq!(read_all(&mut reader, seq - 1), vec![seq], "after {seq}");
        }
        let left = files(dir.path(), FREE_SUFFIX).expect("free");
        assert!(
            left.iter().all(|(n, _)| *n == PREPARED_NUMBER),
            "both released segments were written over: {left:?}"
        );
        assert_eq!(seqs_on_disk(dir.path()), (13..=40).collect::<Vec<_>>());
        let mut fresh = Reader::new(dir.path(), spool.live.clone());
        assert_eq!(read_all(&mut fresh, 12), (13..=40).collect::<Vec<_>>());

        drop(spool);
        let (_, _, head) = open_as_i(dir.path(), 200).expect("reopen");
        assert_eq!((head.seq, head.hash), (40, prev));
    }

    #[test]
    fn a_segment_taken_before_its_thread_returned_is_followed_by_another() {
        let dir = tempfile::tempdir().expect("tmp");
        let (mut spool, _, _) = open_as_i(dir.path(), 200).expect("open");
        spool.wait_prepared();
        assert!(free_path(dir.path(), PREPARED_NUMBER).exists());
        // The thread that prepared it has put it in place but not returned
        // yet (a busy machine can hold it there for a while).
        let (go, held) = std::sync::mpsc::channel::<()>();
        let state = Arc::new(PrepareState::default());
        *state.settled() = true;
        let thread = std::thread::spawn(move || {
            let _ = held.recv();
        });
        spool.preparing = Some(Preparing { thread, state });
        // The second batch starts a segment in the prepared one.
        let mut prev = GENESIS;
        append_batches(&mut spool, 1, 2, &mut prev);
        drop(go);
        spool.wait_prepared();
        assert!(
            free_path(dir.path(), PREPARED_NUMBER).exists(),
            "another is prepared behind it"
        );

        // One still being written is left to come: none is started beside it.
        let state = Arc::new(PrepareState::default());
        let writing = state.clone();
        let (go, held) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let _ = held.recv();
            *writing.settled() = true;
        });
        let waited_for = thread.thread().id();
        fs::remove_file(free_path(dir.path(), PREPARED_NUMBER)).expect("rm");
        spool.preparing = Some(Preparing { thread, state });
        append_batches(&mut spool, 9, 1, &mut prev);
        let still = spool.preparing.as_ref().expect("kept");
        assert_eq!(still.thread.thread().id(), waited_for, "none started");
        drop(go);
        spool.wait_prepared();
    }

    #[test]
    fn a_full_disk_gets_the_kept_segments_back_and_the_write_is_retried_in_place() {
        let dir = tempfile::tempdir().expect("tmp");
        let (mut spool, _, _) = open_as_i(dir.path(), PREPARED_BYTES).expect("open");
        spool.wait_prepared();
        assert_eq!(files(dir.path(), FREE_SUFFIX).expect("free").len(), 1);
        let mut prev = GENESIS;
        let batch = lines(1, 3, &mut prev);
        // Any other failure keeps them for reuse.
        faults::fail_next_appends(dir.path(), 1, io::ErrorKind::Other);
        spool.append(&batch, 1, true).expect_err("failing");
        assert_eq!(files(dir.path(), FREE_SUFFIX).expect("free").len(), 1);
        faults::fail_next_appends(dir.path(), 1, io::ErrorKind::StorageFull);
        let e = spool.append(&batch, 1, true).expect_err("disk full");
        assert_eq!(e.kind(), io::ErrorKind::StorageFull);
        // The prepared segment's blocks are the spool's own: given back.
        assert!(files(dir.path(), FREE_SUFFIX).expect("free").is_empty());
        // Retried over the torn half, the batch is there once.
        spool.append(&batch, 1, true).expect("retried");
        let mut reader = Reader::new(dir.path(), spool.live.clone());
        assert_eq!(read_all(&mut reader, 0), vec![1, 2, 3]);
        drop(spool);
        let (_, _, head) = open_as_i(dir.path(), PREPARED_BYTES).expect("reopen");
        assert_eq!((head.seq, head.hash), (3, prev));
    }

    #[test]
    fn a_crash_in_a_reused_segment_keeps_only_its_own_records() {
        let dir = tempfile::tempdir().expect("tmp");
        let (mut spool, _, _) = open_as_i(dir.path(), 200).expect("open");
        let mut prev = GENESIS;
        append_batches(&mut spool, 1, 3, &mut prev);
        let reader = Reader::new(dir.path(), spool.live.clone());
        reader.release(8, &spool.bytes).expect("release");
        // The next segment reuses a released one and gets one record; the
        // older records after it are still in the file when the crash comes.
        spool
            .append(&lines(13, 13, &mut prev), 13, true)
            .expect("append");
        let reused = segment_path(dir.path(), 13);
        assert!(fs::metadata(&reused).expect("reused").len() > 200);
        // A crash while the segment after it was being started.
        fs::write(dir.path().join(NEXT), b"half a batch").expect("next");
        drop(spool);

        let (mut spool, _, head) = open_as_i(dir.path(), 200).expect("reopen");
        assert_eq!((head.seq, head.hash), (13, prev));
        assert_eq!(seqs_on_disk(dir.path()), (9..=13).collect::<Vec<_>>());
        let on_disk: u64 = segments(dir.path())
            .expect("list")
            .iter()
            .map(|(_, p)| fs::metadata(p).expect("len").len())
            .sum();
        assert_eq!(spool.bytes.load(Ordering::Relaxed), on_disk);
        // The chain goes on from there, through the left-over next segment.
        append_batches(&mut spool, 14, 3, &mut prev);
        assert_eq!(seqs_on_disk(dir.path()), (9..=25).collect::<Vec<_>>());
        drop(spool);
        let (_, _, head) = open_as_i(dir.path(), 200).expect("reopen");
        assert_eq!((head.seq, head.hash), (25, prev));
    }

    #[test]
    fn recovery_stops_at_a_line_that_does_not_continue_the_chain() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut prev = GENESIS;
        let mut bytes = lines(1, 3, &mut prev);
        let good = prev;
        // Records of another chain, and an older seq: neither continues it.
        let mut other = [7u8; 32];
        bytes.extend(lines(4, 4, &mut other));
        bytes.extend(lines(2, 2, &mut prev));
        fs::write(segment_path(dir.path(), 1), &bytes).expect("write");
        let (_, _, head) = open_as_i(dir.path(), 1 << 20).expect("open");
        assert_eq!((head.seq, head.hash), (3, good));
        assert_eq!(seqs_on_disk(dir.path()), vec![1, 2, 3]);
    }

    #[test]
    fn segments_without_records_go_and_a_lost_chain_starts_anew() {
        let dir = tempfile::tempdir().expect("tmp");
        let (mut spool, instance, _) = open_as_i(dir.path(), 200).expect("open");
        let mut prev = GENESIS;
        spool
            .append(&lines(1, 4, &mut prev), 1, true)
            .expect("append");
        drop(spool);
        // Damage: a later segment with nothing readable in it.
        fs::write(segment_path(dir.path(), 9), b"\0\0\0").expect("write");
        let (mut spool, again, head) = open_as_i(dir.path(), 1 << 20).expect("reopen");
        assert_eq!((again.as_str(), head.seq), (instance.as_str(), 4));
        assert!(!segment_path(dir.path(), 9).exists());
        spool
            .append(&lines(5, 6, &mut prev), 5, true)
            .expect("append");
        drop(spool);
        let (_, _, head) = open_as_i(dir.path(), 1 << 20).expect("reopen");
        assert_eq!((head.seq, head.hash), (6, prev));
        assert_eq!(seqs_on_disk(dir.path()), (1..=6).collect::<Vec<_>>());

        // Every record gone, the chain's place unknown: a new instance, whose
        // seq 1 the control plane cannot mistake for a resend.
        fs::remove_file(segment_path(dir.path(), 1)).expect("remove");
        fs::write(segment_path(dir.path(), 7), b"torn").expect("write");
        // (with a released segment of the old chain, which must go too)
        let free = free_path(dir.path(), 3);
        fs::write(&free, lines(3, 4, &mut GENESIS.clone())).expect("write");
        let (spool, other, head) = open_as_i(dir.path(), 1 << 20).expect("reopen");
        assert_ne!(other, instance);
        assert_eq!(head.seq, 0);
        assert!(!free.exists());
        drop(spool);

        // An empty first segment is no lost record (older versions left one).
        fs::write(segment_path(dir.path(), 1), b"").expect("write");
        let (spool, same, head) = open_as_i(dir.path(), 1 << 20).expect("reopen");
        assert_eq!((same.as_str(), head.seq), (other.as_str(), 0));
        drop(spool);

        // But a lost first segment is: its records may have been shipped.
        fs::write(segment_path(dir.path(), 1), b"torn").expect("write");
        let (_, third, head) = open_as_i(dir.path(), 1 << 20).expect("reopen");
        assert_ne!(third, other);
        assert_eq!(head.seq, 0);
    }
}
