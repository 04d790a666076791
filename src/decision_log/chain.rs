//! The hash chain: `hash_n = SHA-256(hash_{n-1} ‖ body_n)`, seq 1 chaining
//! from 32 zero bytes. Each body names its instance and sequence number, so a
//! gap, an edit or a reordering breaks the chain at a nameable place.
//!
//! The line form, used by the spool and by exports, is one JSON object per
//! line: `{"hash":"<hex>","record":<body>}`; the body's bytes are kept exactly
//! as hashed, so verifying never depends on re-serializing.

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

pub type Hash = [u8; 32];

/// What seq 1 chains from.
pub const GENESIS: Hash = [0; 32];

pub fn link(prev: &Hash, body: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(body);
    h.finalize().into()
}

/// Appends one line (with its newline) to `out`.
pub fn write_line(out: &mut Vec<u8>, hash: &Hash, body: &[u8]) {
    append_line(out, |out| out.extend_from_slice(body), |_| *hash);
}

/// Appends the line of the next record after `prev`, whose body `write_body`
/// appends; the body is hashed where it lies. Returns the record's hash.
pub fn append_next(out: &mut Vec<u8>, prev: &Hash, write_body: impl FnOnce(&mut Vec<u8>)) -> Hash {
    append_line(out, write_body, |body| link(prev, body))
}

fn append_line(
    out: &mut Vec<u8>,
    write_body: impl FnOnce(&mut Vec<u8>),
    hash_of: impl FnOnce(&[u8]) -> Hash,
) -> Hash {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    out.extend_from_slice(b"{\"hash\":\"");
    let hex_at = out.len();
    out.extend_from_slice(&[b'0'; 64]);
    out.extend_from_slice(b"\",\"record\":");
    let body_at = out.len();
    write_body(out);
    let hash = hash_of(&out[body_at..]);
    for (pair, b) in out[hex_at..hex_at + 64].chunks_exact_mut(2).zip(hash) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 15)];
    }
    out.extend_from_slice(b"}\n");
    hash
}

/// One line, parsed: the body borrowed exactly as written.
pub struct Line<'a> {
    pub hash: Hash,
    pub body: &'a [u8],
    pub seq: u64,
    pub instance: String,
}

#[derive(Deserialize)]
struct LineForm<'a> {
    hash: &'a str,
    #[serde(borrow)]
    record: &'a RawValue,
}

/// The fields of a body the chain needs.
#[derive(Deserialize)]
struct Position {
    seq: u64,
    instance: String,
}

pub fn parse_line(line: &[u8]) -> Result<Line<'_>, String> {
    let form: LineForm = serde_json::from_slice(line).map_err(|e| e.to_string())?;
    let hash = parse_hash(form.hash).ok_or("`hash` is not 64 hex digits")?;
    let body = form.record.get().as_bytes();
    let pos: Position = serde_json::from_slice(body).map_err(|e| format!("record: {e}"))?;
    Ok(Line {
        hash,
        body,
        seq: pos.seq,
        instance: pos.instance,
    })
}

fn parse_hash(text: &str) -> Option<Hash> {
    let bytes = text.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

/// Where and why a chain breaks.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Break {
    pub instance: String,
    /// The first sequence number that is missing, out of place or altered.
    pub seq: u64,
    pub reason: String,
}

impl std::fmt::Display for Break {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "chain of instance {} breaks at seq {}: {}",
            self.instance, self.seq, self.reason
        )
    }
}

/// Checks records in order, per instance.
#[derive(Debug, Default)]
pub struct Verifier {
    heads: HashMap<String, (u64, Hash)>,
    /// Instances whose first record seen was not seq 1: their first link
    /// could not be checked.
    pub partial: Vec<(String, u64)>,
    pub records: u64,
    /// A seq whose hash is kept per instance as it goes by (see
    /// [`Verifier::holds_head`]).
    watch: Option<u64>,
    watched: HashMap<String, Hash>,
}

impl Verifier {
    /// Continues a chain known to stand at `seq` with `hash`; `(0, GENESIS)`
    /// anchors it at its start, so a first record other than seq 1 is a gap.
    pub fn resume(&mut self, instance: &str, seq: u64, hash: Hash) {
        self.heads.insert(instance.to_owned(), (seq, hash));
    }

    /// The hash the chain of `instance` stands at, if it was resumed or
    /// pushed to.
    pub fn head(&self, instance: &str) -> Option<Hash> {
        self.heads.get(instance).map(|(_, h)| *h)
    }

    /// The instances read, with the seq each chain stands at.
    pub fn positions(&self) -> impl Iterator<Item = (&str, u64)> {
        self.heads.iter().map(|(i, (seq, _))| (i.as_str(), *seq))
    }

    /// Keeps each instance's hash at `seq` as its record goes by, for
    /// [`Verifier::holds_head`]; set before the records are pushed.
    pub fn watch(&mut self, seq: u64) {
        self.watch = Some(seq);
    }

    /// Whether the records read hold `instance`'s chain up to `head` (seq
    /// and hash, as `log verify` printed them when the chain was whole):
    /// what the chain alone cannot show, records cut from its end. A chain
    /// that goes on past the head is fine; the head's record must be the
    /// one read at its seq. Needs [`Verifier::watch`] at the head's seq.
    /// Returns how many records were read after the head.
    pub fn holds_head(&self, instance: &str, head: (u64, Hash)) -> Result<u64, Break> {
        let (seq, hash) = head;
        let broken = |at: u64, reason: String| Break {
            instance: instance.to_owned(),
            seq: at,
            reason,
        };
        let Some(&(last, _)) = self.heads.get(instance) else {
            return Err(broken(seq, "no record of this instance was read".into()));
        };
        if last < seq {
            return Err(broken(
                last + 1,
                format!(
                    "the chain read ends at seq {last}, before the head at seq {seq}: records {}..={seq} are missing (cut short)",
                    last + 1
                ),
            ));
        }
        match self.watched.get(instance) {
            Some(h) if *h == hash => Ok(last - seq),
            Some(_) => Err(broken(
                seq,
                "the record read at the head's seq is not the one the head names".into(),
            )),
            None => Err(broken(
                seq,
                "the head's seq is not in what was read (it starts later)".into(),
            )),
        }
    }

    /// The next record of `instance`. The first break is returned; after it
    /// the verifier re-anchors on the record, so later breaks are found too.
    pub fn push(
        &mut self,
        instance: &str,
        seq: u64,
        hash: &Hash,
        body: &[u8],
    ) -> Result<(), Break> {
        self.records += 1;
        let broken = |seq: u64, reason: String| Break {
            instance: instance.to_owned(),
            seq,
            reason,
        };
        let result = match self.heads.get(instance) {
            None if seq == 1 => check(&GENESIS, hash, body).map_err(|r| broken(1, r)),
            None => {
                self.partial.push((instance.to_owned(), seq));
                Ok(())
            }
            Some(&(last, prev)) if seq == last + 1 => {
                check(&prev, hash, body).map_err(|r| broken(seq, r))
            }
            Some(&(last, _)) if seq > last + 1 => Err(broken(
                last + 1,
                format!("records {}..={} are missing", last + 1, seq - 1),
            )),
            Some(&(last, _)) => Err(broken(
                last + 1,
                format!("seq {seq} appears after seq {last} (reordered or repeated)"),
            )),
        };
        self.heads.insert(instance.to_owned(), (seq, *hash));
        if self.watch == Some(seq) {
            self.watched.insert(instance.to_owned(), *hash);
        }
        result
    }
}

/// A head as `log verify` prints it and `--head` takes it: `SEQ:HASH`
/// (the hash in hex).
pub fn format_head(seq: u64, hash: &Hash) -> String {
    format!("{seq}:{}", crate::decision_log::mask::hex(hash))
}

pub fn parse_head(text: &str) -> Result<(u64, Hash), String> {
    let bad = || {
        format!(
            "`{text}` is not a head: expected SEQ:HASH (64 hex digits), as `arbiter log verify` prints it"
        )
    };
    let (seq, hash) = text.trim().split_once(':').ok_or_else(bad)?;
    let seq = seq.parse::<u64>().ok().filter(|s| *s > 0).ok_or_else(bad)?;
    Ok((seq, parse_hash(hash).ok_or_else(bad)?))
}

fn check(prev: &Hash, hash: &Hash, body: &[u8]) -> Result<(), String> {
    if link(prev, body) == *hash {
        Ok(())
    } else {
        Err("the record does not match its hash (edited, or its predecessor was)".into())
    }
}

/// Verifies an NDJSON export: the first break, if any (`log verify --file`
/// goes through [`verify_into`]).
#[cfg(test)]
pub fn verify_lines(text: &[u8]) -> Result<Verifier, Break> {
    let mut v = Verifier::default();
    verify_into(&mut v, text, None)?;
    Ok(v)
}

/// Checks the lines of `text` into `v`, which may hold the chain so far.
///
/// `segment: Some(first_seq)` says `text` is the newest spool segment, named
/// by its first seq, which may be written over a released one and may be
/// being appended to. Its end is then no break when it is a last line still
/// being written, or the older segment's bytes: behind the line torn where
/// the newer records end, consecutive records with seqs below `first_seq`;
/// or, all zeros, the unused rest of a prepared segment.
/// Returns how many bytes at the end were left unchecked (zeros are not).
pub fn verify_into(v: &mut Verifier, text: &[u8], segment: Option<u64>) -> Result<usize, Break> {
    let mut at = 0;
    let mut number = 0;
    while at < text.len() {
        let end = memchr::memchr(b'\n', &text[at..]).map_or(text.len(), |i| at + i);
        let line = &text[at..end];
        number += 1;
        if !line.iter().all(u8::is_ascii_whitespace) {
            let parsed = parse_line(line);
            if let Some(first) = segment {
                let suspect = parsed.as_ref().map_or(true, |p| p.seq < first);
                // A prepared segment's rest: no records, nothing to check.
                if suspect && text[at..].iter().all(|b| *b == 0) {
                    return Ok(0);
                }
                if suspect && older_bytes(&text[at..], first) {
                    return Ok(text.len() - at);
                }
            }
            let p = parsed.map_err(|e| {
                // Where the one chain read so far would go on (a file holds
                // one instance's chain); unknown otherwise.
                let (instance, seq) = match (v.heads.len(), v.heads.iter().next()) {
                    (1, Some((instance, (last, _)))) => (instance.clone(), last + 1),
                    _ => ("?".into(), 0),
                };
                Break {
                    instance,
                    seq,
                    reason: format!("line {number} is not a record: {e}"),
                }
            })?;
            v.push(&p.instance, p.seq, &p.hash, p.body)?;
        }
        at = end + 1;
    }
    Ok(0)
}

/// Whether `rest` is an older segment's records (consecutive seqs below
/// `first`), but for its first line (torn where newer bytes end) and its
/// last (being written) if those are not records.
fn older_bytes(rest: &[u8], first: u64) -> bool {
    let lines: Vec<&[u8]> = rest
        .split(|b| *b == b'\n')
        .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
        .collect();
    let last = lines.len().saturating_sub(1);
    let mut prev: Option<u64> = None;
    for (i, line) in lines.iter().enumerate() {
        match parse_line(line) {
            Ok(p) if p.seq < first && prev.is_none_or(|s| p.seq == s + 1) => prev = Some(p.seq),
            Ok(_) => return false,
            Err(_) if i == 0 || i == last => {}
            Err(_) => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: u64) -> Vec<Vec<u8>> {
        let mut prev = GENESIS;
        (1..=n)
            .map(|seq| {
                let body = format!(r#"{{"seq":{seq},"instance":"i1","outcome":"ALLOW"}}"#);
                prev = link(&prev, body.as_bytes());
                let mut line = Vec::new();
                write_line(&mut line, &prev, body.as_bytes());
                line
            })
            .collect()
    }

    #[test]
    fn an_intact_chain_verifies() {
        let v = verify_lines(&chain(5).concat()).expect("intact");
        assert_eq!(v.records, 5);
        assert!(v.partial.is_empty());
    }

    #[test]
    fn edits_gaps_and_reorderings_name_the_first_broken_seq() {
        let mut edited = chain(5);
        edited[2] = String::from_utf8(edited[2].clone())
            .expect("utf8")
            .replace("ALLOW", "DENY")
            .into_bytes();
        assert_eq!(verify_lines(&edited.concat()).expect_err("edited").seq, 3);

        let mut gap = chain(5);
        gap.remove(1);
        let b = verify_lines(&gap.concat()).expect_err("gap");
        assert_eq!((b.seq, b.reason.contains("missing")), (2, true));

        let mut swapped = chain(5);
        swapped.swap(3, 4);
        assert_eq!(verify_lines(&swapped.concat()).expect_err("swap").seq, 4);

        let b = verify_lines(b"not json\n").expect_err("garbage");
        assert!(b.reason.contains("line 1"), "{b}");

        // A mangled line is named by the seq it stands for.
        let mut mangled = chain(5);
        mangled[2] = b"{\"hash\":\"trunc\n".to_vec();
        let b = verify_lines(&mangled.concat()).expect_err("mangled");
        assert_eq!((b.instance.as_str(), b.seq), ("i1", 3), "{b}");
        assert!(b.reason.contains("line 3"), "{b}");
    }

    #[test]
    fn a_kept_head_shows_records_cut_from_the_end() {
        let lines = chain(6);
        let head_at = |v: &Verifier, seq: u64| {
            let line = String::from_utf8(lines[seq as usize - 1].clone()).expect("utf8");
            let hash = parse_line(line.trim_end().as_bytes()).expect("line").hash;
            v.holds_head("i1", parse_head(&format_head(seq, &hash)).expect("parses"))
        };
        let read = |n: usize, watch: u64| {
            let mut v = Verifier::default();
            v.watch(watch);
            verify_into(&mut v, &lines[..n].concat(), None).expect("intact");
            v
        };
        // Whole, and going on past the head: fine.
        assert_eq!(head_at(&read(6, 6), 6), Ok(0));
        assert_eq!(head_at(&read(6, 4), 4), Ok(2));
        // The last two records cut: intact as a chain, short of the head.
        let b = head_at(&read(4, 6), 6).expect_err("cut short");
        assert_eq!((b.seq, b.reason.contains("cut short")), (5, true), "{b}");
        // A head of another chain at that seq: named.
        let mut v = read(6, 4);
        v.watched.insert("i1".into(), [7; 32]);
        assert_eq!(head_at(&v, 4).expect_err("other record").seq, 4);
        // A head of an instance the file does not hold.
        assert!(read(6, 6).holds_head("i2", (6, [0; 32])).is_err());
        for bad in ["6", "0:00", "x:ab", "6:abc"] {
            assert!(parse_head(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_newest_segments_older_bytes_and_a_line_being_written_are_left_unchecked() {
        let lines = chain(9);
        let segment = |text: &[u8]| verify_into(&mut Verifier::default(), text, Some(6));
        // A released segment (seqs 1..=5) written over by seqs 6..=7: once
        // at a line boundary, once mid-line (the older line torn).
        let old = lines[..5].concat();
        let new = lines[5..7].concat();
        for torn in [0, 7] {
            let mut file = new.clone();
            file.extend_from_slice(&old[new.len() + torn..]);
            let unchecked = segment(&file).expect("older bytes are no break");
            assert_eq!(unchecked, file.len() - new.len());
            // The same bytes as an export are a break.
            assert!(verify_lines(&file).is_err());
        }
        // A prepared segment: zeros after the records are no records.
        let mut file = lines[5..7].concat();
        file.extend([0; 500]);
        assert_eq!(segment(&file).expect("zeros are no break"), 0);
        assert!(verify_lines(&file).is_err(), "in an export they are");
        file.push(b'\n');
        file.extend_from_slice(&lines[7..9].concat());
        assert!(
            segment(&file).is_err(),
            "records after zeros are not hidden"
        );
        // A last line still being written.
        let mut file = lines[5..8].concat();
        file.extend_from_slice(&lines[8][..30]);
        assert_eq!(segment(&file).expect("a torn last line is no break"), 30);

        // Still breaks: an edited last record; an older record followed by
        // a newer one; a torn line followed by newer records; older records
        // out of order (moved, not written over).
        let mut edited = lines[5..8].to_vec();
        edited[2] = String::from_utf8(edited[2].clone())
            .expect("utf8")
            .replace("ALLOW", "DENY")
            .into_bytes();
        assert_eq!(segment(&edited.concat()).expect_err("edited").seq, 8);
        let moved = [&lines[5][..], &lines[6], &lines[0], &lines[7]].concat();
        assert_eq!(segment(&moved).expect_err("moved").seq, 8);
        let torn = [&lines[5][..], &lines[6], &lines[7][..30], b"\n", &lines[8]].concat();
        assert!(segment(&torn).is_err());
        let shuffled = [&lines[5][..], &lines[6], &lines[2], &lines[0], &lines[1]].concat();
        assert!(segment(&shuffled).is_err());
    }
}
