//! The disk spool: append-only segment files of chained lines, named by the
//! first sequence number they hold. Only the writer appends; only the shipper
//! deletes, and only whole segments the control plane has acknowledged.
//!
//! ```text
//! spool/instance                       this sidecar's instance id (its chain)
//! spool/00000000000000000001.ndjson    seq 1 ..
//! spool/00000000000000004097.ndjson    seq 4097 .. (the newest: appended to)
//! ```

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::chain::{self, GENESIS, Hash};

const SUFFIX: &str = ".ndjson";

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
    file_len: u64,
    /// Bytes in every segment file, shared with the shipper that deletes.
    pub bytes: Arc<AtomicU64>,
}

/// The segments in `dir`, oldest first.
pub fn segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let first = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(SUFFIX))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(first) = first {
            out.push((first, path));
        }
    }
    out.sort();
    Ok(out)
}

fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("{first_seq:020}{SUFFIX}"))
}

impl Spool {
    /// Opens (or creates) the spool, recovering after a crash: a torn last
    /// line is cut off, and the chain resumes after the last whole record.
    pub fn open(dir: &Path, segment_max: u64) -> io::Result<(Self, String, Head)> {
        fs::create_dir_all(dir)?;
        let instance = instance_id(dir)?;
        let mut head = Head {
            seq: 0,
            hash: GENESIS,
        };
        let segs = segments(dir)?;
        // The newest non-empty segment holds the head.
        for (_, path) in segs.iter().rev() {
            if let Some(last) = recover(path)? {
                head = last;
                break;
            }
        }
        let mut total = 0;
        for (_, path) in &segs {
            total += fs::metadata(path)?.len();
        }
        let path = match segs.last() {
            Some((_, p)) => p.clone(),
            None => segment_path(dir, 1),
        };
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let file_len = file.metadata()?.len();
        let spool = Self {
            dir: dir.to_path_buf(),
            segment_max,
            file,
            file_len,
            bytes: Arc::new(AtomicU64::new(total)),
        };
        Ok((spool, instance, head))
    }

    /// Appends whole lines; `next_seq` is the first seq in `lines` (a new
    /// segment starting here is named by it).
    pub fn append(&mut self, lines: &[u8], next_seq: u64) -> io::Result<()> {
        if self.file_len >= self.segment_max {
            let path = segment_path(&self.dir, next_seq);
            self.file.sync_data()?;
            self.file = OpenOptions::new().create(true).append(true).open(path)?;
            self.file_len = 0;
            // The new file's name must survive a crash too.
            if let Ok(d) = File::open(&self.dir) {
                let _ = d.sync_all();
            }
        }
        self.file.write_all(lines)?;
        self.file_len += lines.len() as u64;
        self.bytes.fetch_add(lines.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    pub fn sync(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }
}

fn instance_id(dir: &Path) -> io::Result<String> {
    let path = dir.join("instance");
    match fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => Ok(id.trim().to_owned()),
        _ => {
            let id = uuid::Uuid::new_v7(uuid::Timestamp::now(uuid::NoContext)).to_string();
            let tmp = dir.join("instance.tmp");
            let mut f = File::create(&tmp)?;
            f.write_all(id.as_bytes())?;
            f.sync_all()?;
            fs::rename(&tmp, &path)?;
            Ok(id)
        }
    }
}

/// Cuts a torn tail off a segment; returns its last record.
fn recover(path: &Path) -> io::Result<Option<Head>> {
    let mut bytes = Vec::new();
    File::open(path)?.read_to_end(&mut bytes)?;
    let mut kept = bytes.len();
    let mut last = None;
    // Walk back over lines until one parses: anything after it is torn.
    while kept > 0 {
        let end = if bytes[kept - 1] == b'\n' {
            kept - 1
        } else {
            kept
        };
        let start = bytes[..end]
            .iter()
            .rposition(|b| *b == b'\n')
            .map_or(0, |i| i + 1);
        if bytes[kept - 1] == b'\n'
            && let Ok(line) = chain::parse_line(&bytes[start..end])
        {
            last = Some(Head {
                seq: line.seq,
                hash: line.hash,
            });
            break;
        }
        kept = start;
    }
    if kept < bytes.len() {
        tracing::warn!(
            segment = %path.display(),
            cut = bytes.len() - kept,
            "decision spool: cut a torn record left by a crash"
        );
        let f = OpenOptions::new().write(true).open(path)?;
        f.set_len(kept as u64)?;
        f.sync_all()?;
    }
    Ok(last)
}

/// Deletes segments whose every record is at or below `acked`, never the
/// newest (the writer appends to it). Returns the bytes freed.
pub fn delete_acked(dir: &Path, acked: u64, bytes: &AtomicU64) -> io::Result<u64> {
    let segs = segments(dir)?;
    let mut freed = 0;
    for pair in segs.windows(2) {
        let ((_, path), (next_first, _)) = (&pair[0], &pair[1]);
        if next_first.saturating_sub(1) > acked {
            break;
        }
        let len = fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        fs::remove_file(path)?;
        bytes.fetch_sub(len.min(bytes.load(Ordering::Relaxed)), Ordering::Relaxed);
        freed += len;
    }
    Ok(freed)
}

/// Reads chained lines in order, following the writer across segments.
pub struct Reader {
    dir: PathBuf,
    current: Option<(u64, File)>,
    pending: Vec<u8>,
}

/// Whole spooled lines, ready to ship as they are.
pub struct Chunk {
    pub first_seq: u64,
    pub count: u32,
    pub lines: Vec<u8>,
}

impl Reader {
    /// Appends up to one read's worth of the current segment to `pending`.
    fn read_more(&mut self) -> io::Result<bool> {
        const READ: u64 = 64 * 1024;
        let Some((_, f)) = &mut self.current else {
            return Ok(false);
        };
        // Straight into `pending`'s spare room (no zeroing, no extra copy).
        self.pending.reserve(READ as usize);
        let n = f.take(READ).read_to_end(&mut self.pending)?;
        Ok(n > 0)
    }

    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            current: None,
            pending: Vec::new(),
        }
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
        let mut taken = 0; // bytes of `pending` that go into the chunk
        let mut count = 0u32;
        loop {
            // Take whole lines from what is buffered.
            while let Some(nl) = memchr::memchr(b'\n', &self.pending[taken..]) {
                let line = &self.pending[taken..taken + nl];
                if first_seq.is_none() {
                    // Only the first line of a chunk is parsed: the rest
                    // follow it without gaps (one writer numbers them).
                    match chain::parse_line(line) {
                        Ok(p) if p.seq <= after => {
                            self.pending.drain(..=taken + nl);
                            continue;
                        }
                        Ok(p) => first_seq = Some(p.seq),
                        Err(e) => {
                            tracing::warn!("decision spool: skipping an unreadable line: {e}");
                            self.pending.drain(..=taken + nl);
                            continue;
                        }
                    }
                }
                taken += nl + 1;
                count += 1;
                if count as usize >= max_lines || taken >= max_bytes {
                    break;
                }
            }
            let full = count as usize >= max_lines || taken >= max_bytes;
            if full || !self.fill(after)? {
                break;
            }
        }
        Ok(first_seq.filter(|_| count > 0).map(|first_seq| {
            // The chunk keeps the buffer; only the partial rest is copied.
            let rest = self.pending.split_off(taken);
            Chunk {
                first_seq,
                count,
                lines: std::mem::replace(&mut self.pending, rest),
            }
        }))
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
                self.current = Some((*first, File::open(path)?));
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(from: u64, to: u64, prev: &mut Hash) -> Vec<u8> {
        let mut out = Vec::new();
        for seq in from..=to {
            let body = format!(r#"{{"seq":{seq},"instance":"i"}}"#);
            *prev = chain::link(prev, body.as_bytes());
            chain::write_line(&mut out, prev, body.as_bytes());
        }
        out
    }

    #[test]
    fn appends_rotates_reads_back_and_deletes_only_what_is_acked() {
        let dir = tempfile::tempdir().expect("tmp");
        let (mut spool, instance, head) = Spool::open(dir.path(), 200).expect("open");
        assert_eq!(head.seq, 0);
        let mut prev = GENESIS;
        for k in 0..5 {
            spool
                .append(&lines(k * 4 + 1, k * 4 + 4, &mut prev), k * 4 + 1)
                .expect("append");
        }
        assert!(segments(dir.path()).expect("list").len() > 1, "rotated");

        let mut reader = Reader::new(dir.path());
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
        let freed = delete_acked(dir.path(), 10, &spool.bytes).expect("delete");
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
        let (_, again, head) = Spool::open(dir.path(), 200).expect("reopen");
        assert_eq!((again, head.seq, head.hash), (instance, 20, prev));
    }

    #[test]
    fn a_torn_tail_is_cut_on_open() {
        let dir = tempfile::tempdir().expect("tmp");
        let (mut spool, _, _) = Spool::open(dir.path(), 1 << 20).expect("open");
        let mut prev = GENESIS;
        spool.append(&lines(1, 3, &mut prev), 1).expect("append");
        spool.append(br#"{"hash":"00","rec"#, 4).expect("torn");
        drop(spool);
        let (spool, _, head) = Spool::open(dir.path(), 1 << 20).expect("reopen");
        assert_eq!((head.seq, head.hash), (3, prev));
        let on_disk = fs::read(segment_path(dir.path(), 1)).expect("read");
        assert!(on_disk.ends_with(b"}\n"));
        assert_eq!(spool.bytes.load(Ordering::Relaxed), on_disk.len() as u64);
    }
}
