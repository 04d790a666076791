//! Bundle archives: one `tar.gz` holding the bundle's files, a
//! `manifest.json` that lists the SHA-256 of every other file, and
//! `signatures.json` with detached Ed25519 signatures over the exact bytes of
//! `manifest.json`.
//!
//! Opening an archive is defensive: size limits on the compressed and the
//! unpacked bytes (a gzip bomb stops at the limit), regular files only, no
//! absolute or `..` paths, no duplicates. A [`VerifiedBundle`] can only be
//! made by [`verify`], so code that activates bundles can demand one.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use base64::Engine as _;
use ed25519_dalek::{Signature, Signer, SigningKey};
use flate2::Compression;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::keys::{TrustedKeys, key_id};
use super::{Bundle, BundleError, Manifest};

pub const MANIFEST: &str = "manifest.json";
pub const SIGNATURES: &str = "signatures.json";

/// Bounds on what an archive may expand to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArchiveLimits {
    /// Largest archive accepted, in bytes.
    pub max_archive_bytes: u64,
    /// Most bytes all files may unpack to.
    pub max_unpacked_bytes: u64,
    /// Most files.
    pub max_files: usize,
}

impl Default for ArchiveLimits {
    fn default() -> Self {
        Self {
            max_archive_bytes: 16 * 1024 * 1024,
            max_unpacked_bytes: 64 * 1024 * 1024,
            max_files: 10_000,
        }
    }
}

/// Why an archive was refused. Nothing of a refused archive is used.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("archive is {size} bytes, over the limit of {limit}")]
    ArchiveTooLarge { size: u64, limit: u64 },
    #[error("archive unpacks to more than {limit} bytes (a gzip bomb or a bundle over the limit)")]
    UnpackedTooLarge { limit: u64 },
    #[error("archive holds more than {limit} files")]
    TooManyFiles { limit: usize },
    #[error("archive is not a readable tar.gz: {0}")]
    Corrupt(String),
    #[error("archive entry `{0}` is not a plain relative path (absolute, `..` or empty)")]
    UnsafePath(String),
    #[error("archive entry `{0}` is not a regular file")]
    NotAFile(String),
    #[error("archive holds `{0}` twice")]
    Duplicate(String),
    #[error("archive has no manifest.json")]
    NoManifest,
    #[error("manifest.json is invalid: {0}")]
    BadManifest(String),
    #[error("signatures.json is invalid: {0}")]
    BadSignatures(String),
    #[error("bundle is not signed; sign it with `arbiter bundle sign`")]
    Unsigned,
    #[error(
        "bundle is signed only by keys that are not trusted ({0}); add the public key with --trusted-key"
    )]
    UntrustedKey(String),
    #[error(
        "signature by key {0} does not match the manifest (the manifest changed after signing?)"
    )]
    BadSignature(String),
    #[error("`{0}` is in the archive but not in the manifest")]
    Unlisted(String),
    #[error("`{0}` is listed in the manifest but missing from the archive")]
    Missing(String),
    #[error("`{0}` does not match its digest in the manifest (changed after the bundle was built)")]
    DigestMismatch(String),
    #[error("manifest lists no file digests; build the archive with `arbiter bundle build`")]
    NoDigests,
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error("cannot write the archive: {0}")]
    Write(String),
}

/// One detached signature over `manifest.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SignatureEntry {
    pub key_id: String,
    /// Always `ed25519` for now.
    pub algorithm: String,
    /// Base64 of the 64-byte signature.
    pub signature: String,
}

/// A bundle whose archive was signed by a trusted key and whose every file
/// matches the signed manifest.
#[derive(Debug, Clone)]
pub struct VerifiedBundle {
    bundle: Bundle,
    signer: String,
    digest: String,
}

impl VerifiedBundle {
    pub fn bundle(&self) -> &Bundle {
        &self.bundle
    }
    /// Key id of the trusted key whose signature verified.
    pub fn signer(&self) -> &str {
        &self.signer
    }
    /// SHA-256 (hex) of the archive bytes.
    pub fn digest(&self) -> &str {
        &self.digest
    }
}

/// The contents of an archive, unpacked safely but not yet verified.
#[derive(Debug, Clone)]
pub struct Unpacked {
    /// Every file but `signatures.json`, `manifest.json` included.
    pub files: BTreeMap<String, Vec<u8>>,
    pub manifest: Manifest,
    pub signatures: Vec<SignatureEntry>,
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Writes an unsigned archive of `bundle`, its manifest listing every file's digest.
pub fn build(bundle: &Bundle) -> Result<Vec<u8>, VerifyError> {
    let mut manifest = bundle.manifest.clone();
    manifest.files = bundle
        .files
        .iter()
        .filter(|(name, _)| *name != MANIFEST && *name != SIGNATURES)
        .map(|(name, bytes)| (name.clone(), sha256_hex(bytes)))
        .collect();
    let mut files = bundle.files.clone();
    files.remove(SIGNATURES);
    pack(&manifest, files, &[])
}

/// Adds (or replaces) `key`'s signature over the manifest. The archive's
/// digests are checked first: signing a tampered archive would bless it.
pub fn sign(
    archive: &[u8],
    key: &SigningKey,
    limits: &ArchiveLimits,
) -> Result<Vec<u8>, VerifyError> {
    let unpacked = unpack(archive, limits)?;
    check_digests(&unpacked)?;
    let manifest_bytes = &unpacked.files[MANIFEST];
    let id = key_id(&key.verifying_key());
    let entry = SignatureEntry {
        key_id: id.clone(),
        algorithm: "ed25519".into(),
        signature: base64::engine::general_purpose::STANDARD
            .encode(key.sign(manifest_bytes).to_bytes()),
    };
    let mut signatures: Vec<SignatureEntry> = unpacked
        .signatures
        .into_iter()
        .filter(|s| s.key_id != id)
        .collect();
    signatures.push(entry);
    let mut files = unpacked.files;
    let manifest_bytes = files.remove(MANIFEST).unwrap_or_default();
    write_tar(manifest_bytes, files, &signatures)
}

/// Opens, checks the signature against `trusted`, checks every digest, and
/// reads the bundle. `source` names the archive in messages.
pub fn verify(
    archive: &[u8],
    trusted: &TrustedKeys,
    limits: &ArchiveLimits,
    source: &Path,
) -> Result<VerifiedBundle, VerifyError> {
    let unpacked = unpack(archive, limits)?;
    let signer = check_signature(&unpacked, trusted)?;
    check_digests(&unpacked)?;
    let bundle = Bundle::from_files(unpacked.files, source)?;
    Ok(VerifiedBundle {
        bundle,
        signer,
        digest: sha256_hex(archive),
    })
}

fn check_signature(unpacked: &Unpacked, trusted: &TrustedKeys) -> Result<String, VerifyError> {
    if unpacked.signatures.is_empty() {
        return Err(VerifyError::Unsigned);
    }
    let manifest_bytes = &unpacked.files[MANIFEST];
    let mut bad = None;
    for s in &unpacked.signatures {
        let Some(key) = trusted.get(&s.key_id) else {
            continue;
        };
        let ok = s.algorithm == "ed25519"
            && base64::engine::general_purpose::STANDARD
                .decode(&s.signature)
                .ok()
                .and_then(|b| Signature::from_slice(&b).ok())
                .is_some_and(|sig| key.verify_strict(manifest_bytes, &sig).is_ok());
        if ok {
            return Ok(s.key_id.clone());
        }
        bad = Some(s.key_id.clone());
    }
    Err(match bad {
        Some(id) => VerifyError::BadSignature(id),
        None => VerifyError::UntrustedKey(
            unpacked
                .signatures
                .iter()
                .map(|s| s.key_id.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        ),
    })
}

/// Every file but the manifest is listed, every listed file is present, and
/// every digest matches.
pub fn check_digests(unpacked: &Unpacked) -> Result<(), VerifyError> {
    let listed = &unpacked.manifest.files;
    if listed.is_empty() {
        return Err(VerifyError::NoDigests);
    }
    for (name, bytes) in &unpacked.files {
        if name == MANIFEST {
            continue;
        }
        match listed.get(name) {
            None => return Err(VerifyError::Unlisted(name.clone())),
            Some(digest) if *digest != sha256_hex(bytes) => {
                return Err(VerifyError::DigestMismatch(name.clone()));
            }
            Some(_) => {}
        }
    }
    if let Some(name) = listed.keys().find(|n| !unpacked.files.contains_key(*n)) {
        return Err(VerifyError::Missing(name.clone()));
    }
    Ok(())
}

/// Reads an archive within `limits`, refusing anything but plain relative
/// regular files.
pub fn unpack(archive: &[u8], limits: &ArchiveLimits) -> Result<Unpacked, VerifyError> {
    if archive.len() as u64 > limits.max_archive_bytes {
        return Err(VerifyError::ArchiveTooLarge {
            size: archive.len() as u64,
            limit: limits.max_archive_bytes,
        });
    }
    let corrupt = |e: std::io::Error| VerifyError::Corrupt(e.to_string());
    let mut tar = tar::Archive::new(GzDecoder::new(archive));
    let mut files = BTreeMap::new();
    let mut signatures = None;
    let mut total: u64 = 0;
    for entry in tar.entries().map_err(corrupt)? {
        let mut entry = entry.map_err(corrupt)?;
        let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let name = safe_path(&raw)?;
        match entry.header().entry_type() {
            tar::EntryType::Regular => {}
            tar::EntryType::Directory => continue,
            _ => return Err(VerifyError::NotAFile(raw)),
        }
        if files.len() >= limits.max_files {
            return Err(VerifyError::TooManyFiles {
                limit: limits.max_files,
            });
        }
        // Read at most what is left of the budget, plus one byte to notice
        // going over it.
        let budget = limits.max_unpacked_bytes.saturating_sub(total);
        let mut bytes = Vec::new();
        (&mut entry)
            .take(budget + 1)
            .read_to_end(&mut bytes)
            .map_err(corrupt)?;
        total += bytes.len() as u64;
        if total > limits.max_unpacked_bytes {
            return Err(VerifyError::UnpackedTooLarge {
                limit: limits.max_unpacked_bytes,
            });
        }
        if name == SIGNATURES {
            if signatures.is_some() {
                return Err(VerifyError::Duplicate(name));
            }
            signatures = Some(
                serde_json::from_slice(&bytes)
                    .map_err(|e| VerifyError::BadSignatures(e.to_string()))?,
            );
        } else if files.insert(name.clone(), bytes).is_some() {
            return Err(VerifyError::Duplicate(name));
        }
    }
    let manifest_bytes = files.get(MANIFEST).ok_or(VerifyError::NoManifest)?;
    let manifest = serde_json::from_slice(manifest_bytes)
        .map_err(|e| VerifyError::BadManifest(e.to_string()))?;
    Ok(Unpacked {
        files,
        manifest,
        signatures: signatures.unwrap_or_default(),
    })
}

fn safe_path(raw: &str) -> Result<String, VerifyError> {
    let parts: Vec<&str> = raw
        .trim_end_matches('/')
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    let unsafe_part = |p: &&str| *p == ".." || p.contains('\\') || p.contains('\0');
    if raw.starts_with('/') || parts.is_empty() || parts.iter().any(unsafe_part) {
        return Err(VerifyError::UnsafePath(raw.to_owned()));
    }
    Ok(parts.join("/"))
}

fn pack(
    manifest: &Manifest,
    files: BTreeMap<String, Vec<u8>>,
    signatures: &[SignatureEntry],
) -> Result<Vec<u8>, VerifyError> {
    let manifest_bytes =
        serde_json::to_vec_pretty(manifest).map_err(|e| VerifyError::Write(e.to_string()))?;
    write_tar(manifest_bytes, files, signatures)
}

/// Deterministic: fixed order, times, modes and owners, so the same bundle
/// builds to the same bytes.
fn write_tar(
    manifest: Vec<u8>,
    mut files: BTreeMap<String, Vec<u8>>,
    signatures: &[SignatureEntry],
) -> Result<Vec<u8>, VerifyError> {
    files.remove(MANIFEST);
    let werr = |e: std::io::Error| VerifyError::Write(e.to_string());
    let mut tar = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::default()));
    let mut add = |name: &str, bytes: &[u8]| -> Result<(), VerifyError> {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        header.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut header, name, bytes).map_err(werr)
    };
    add(MANIFEST, &manifest)?;
    if !signatures.is_empty() {
        let sig =
            serde_json::to_vec_pretty(signatures).map_err(|e| VerifyError::Write(e.to_string()))?;
        add(SIGNATURES, &sig)?;
    }
    for (name, bytes) in &files {
        add(name, bytes)?;
    }
    tar.into_inner().map_err(werr)?.finish().map_err(werr)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::bundle::keys::TrustedKeys;

    fn example() -> Bundle {
        Bundle::read_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/documents"))
            .expect("example reads")
    }

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn trusted(keys: &[&SigningKey]) -> TrustedKeys {
        TrustedKeys::from_keys(keys.iter().map(|k| k.verifying_key()))
    }

    fn limits() -> ArchiveLimits {
        ArchiveLimits::default()
    }

    fn signed() -> Vec<u8> {
        sign(&build(&example()).expect("builds"), &key(1), &limits()).expect("signs")
    }

    fn verify_with(archive: &[u8], keys: &[&SigningKey]) -> Result<VerifiedBundle, VerifyError> {
        verify(archive, &trusted(keys), &limits(), Path::new("test.tar.gz"))
    }

    /// Rewrites an archive's entries through `edit`, keeping everything else.
    fn rewrite(
        archive: &[u8],
        edit: impl Fn(&str, Vec<u8>) -> Option<Vec<u8>>,
        extra: &[(&str, &[u8])],
    ) -> Vec<u8> {
        let mut tar = tar::Archive::new(GzDecoder::new(archive));
        let mut out = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::default()));
        for entry in tar.entries().expect("entries") {
            let mut entry = entry.expect("entry");
            let name = entry.path().expect("path").to_string_lossy().into_owned();
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).expect("read");
            if let Some(bytes) = edit(&name, bytes) {
                let mut h = tar::Header::new_gnu();
                h.set_size(bytes.len() as u64);
                h.set_mode(0o644);
                out.append_data(&mut h, &name, bytes.as_slice())
                    .expect("append");
            }
        }
        for (name, bytes) in extra {
            let mut h = tar::Header::new_gnu();
            h.set_size(bytes.len() as u64);
            h.set_mode(0o644);
            out.append_data(&mut h, name, *bytes).expect("append");
        }
        out.into_inner().expect("tar").finish().expect("gz")
    }

    /// A tar.gz with one raw entry whose name is written without checks.
    fn raw_entry(name: &[u8], kind: tar::EntryType, data: &[u8]) -> Vec<u8> {
        let mut out = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::default()));
        let mut h = tar::Header::new_old();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(kind);
        h.set_cksum();
        out.append(&h, data).expect("append");
        out.into_inner().expect("tar").finish().expect("gz")
    }

    #[test]
    fn signed_archive_round_trips_deterministically() {
        let a = build(&example()).expect("builds");
        assert_eq!(
            a,
            build(&example()).expect("builds again"),
            "same bundle, same bytes"
        );
        let v = verify_with(&signed(), &[&key(1)]).expect("verifies");
        assert_eq!(v.bundle().manifest.revision, "2026-11-24.1");
        assert_eq!(v.bundle().policies.len(), 2);
        assert!(v.bundle().files.contains_key("tests/cases.json"));
        assert_eq!(v.signer(), key_id(&key(1).verifying_key()));
        // A second key (rotation): either trusted key verifies.
        let both = sign(&signed(), &key(2), &limits()).expect("second signature");
        assert!(verify_with(&both, &[&key(2)]).is_ok());
        assert!(verify_with(&both, &[&key(3), &key(1)]).is_ok());
    }

    #[test]
    fn refuses_unsigned_and_untrusted() {
        let unsigned = build(&example()).expect("builds");
        assert!(matches!(
            verify_with(&unsigned, &[&key(1)]),
            Err(VerifyError::Unsigned)
        ));
        assert!(matches!(
            verify_with(&signed(), &[&key(2)]),
            Err(VerifyError::UntrustedKey(_))
        ));
    }

    #[test]
    fn refuses_tampering() {
        let archive = signed();
        let changed = rewrite(
            &archive,
            |n, b| {
                Some(if n == "documents.cedar" {
                    b"// gone".to_vec()
                } else {
                    b
                })
            },
            &[],
        );
        assert!(
            matches!(verify_with(&changed, &[&key(1)]), Err(VerifyError::DigestMismatch(n)) if n == "documents.cedar")
        );

        let extra = rewrite(
            &archive,
            |_, b| Some(b),
            &[(
                "backdoor.cedar",
                b"@id(\"x\") permit(principal, action, resource);",
            )],
        );
        assert!(
            matches!(verify_with(&extra, &[&key(1)]), Err(VerifyError::Unlisted(n)) if n == "backdoor.cedar")
        );

        let dropped = rewrite(&archive, |n, b| (n != "guards.cedar").then_some(b), &[]);
        assert!(
            matches!(verify_with(&dropped, &[&key(1)]), Err(VerifyError::Missing(n)) if n == "guards.cedar")
        );

        let manifest_edited = rewrite(
            &archive,
            |n, b| {
                Some(if n == MANIFEST {
                    String::from_utf8(b)
                        .expect("utf8")
                        .replace("2026-11-24.1", "9999")
                        .into_bytes()
                } else {
                    b
                })
            },
            &[],
        );
        assert!(matches!(
            verify_with(&manifest_edited, &[&key(1)]),
            Err(VerifyError::BadSignature(_))
        ));

        // Signing a tampered archive is refused too.
        let unsigned = build(&example()).expect("builds");
        let tampered = rewrite(
            &unsigned,
            |n, b| Some(if n == "guards.cedar" { Vec::new() } else { b }),
            &[],
        );
        assert!(matches!(
            sign(&tampered, &key(1), &limits()),
            Err(VerifyError::DigestMismatch(_))
        ));
    }

    #[test]
    fn refuses_unsafe_entries() {
        for name in [&b"../x"[..], b"/etc/passwd", b"a/../../x"] {
            let a = raw_entry(name, tar::EntryType::Regular, b"x");
            assert!(
                matches!(unpack(&a, &limits()), Err(VerifyError::UnsafePath(_))),
                "{}",
                String::from_utf8_lossy(name)
            );
        }
        let link = raw_entry(b"manifest.json", tar::EntryType::Symlink, b"");
        assert!(matches!(
            unpack(&link, &limits()),
            Err(VerifyError::NotAFile(_))
        ));
        let dup = rewrite(&signed(), |_, b| Some(b), &[("guards.cedar", b"x")]);
        assert!(
            matches!(unpack(&dup, &limits()), Err(VerifyError::Duplicate(n)) if n == "guards.cedar")
        );
        assert!(matches!(
            unpack(b"not a gzip", &limits()),
            Err(VerifyError::Corrupt(_))
        ));
    }

    #[test]
    fn stops_a_gzip_bomb_at_the_limit() {
        // 64 MiB of zeros compresses to about 64 KiB.
        let mut gz = GzEncoder::new(Vec::new(), Compression::best());
        {
            let mut tar = tar::Builder::new(&mut gz);
            let mut h = tar::Header::new_gnu();
            let size = 64 * 1024 * 1024u64;
            h.set_size(size);
            h.set_mode(0o644);
            tar.append_data(&mut h, "bomb.cedar", std::io::repeat(0).take(size))
                .expect("append");
            tar.finish().expect("finish");
        }
        gz.flush().expect("flush");
        let bomb = gz.finish().expect("gz");
        assert!(bomb.len() < 1024 * 1024);
        let small = ArchiveLimits {
            max_unpacked_bytes: 1024 * 1024,
            ..limits()
        };
        assert!(matches!(
            unpack(&bomb, &small),
            Err(VerifyError::UnpackedTooLarge { .. })
        ));
        let tiny = ArchiveLimits {
            max_archive_bytes: 1024,
            ..limits()
        };
        assert!(matches!(
            unpack(&bomb, &tiny),
            Err(VerifyError::ArchiveTooLarge { .. })
        ));
    }
}
