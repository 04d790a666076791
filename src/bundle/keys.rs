//! Ed25519 signing keys as ordinary PEM files (PKCS#8 private, SPKI public),
//! and the set of keys a sidecar trusts. Several trusted keys allow rotation.

use std::path::{Path, PathBuf};

use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key `{path}`: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write key `{path}`: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`{path}` is not an Ed25519 {kind} key in PEM form: {message}")]
    Parse {
        path: PathBuf,
        kind: &'static str,
        message: String,
    },
    #[error("no randomness for a new key: {0}")]
    Random(String),
}

/// A short, stable name for a public key: the first 8 bytes of the SHA-256
/// of its raw bytes, in hex.
pub fn key_id(key: &VerifyingKey) -> String {
    let digest = Sha256::digest(key.to_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes a new key pair as `PREFIX.key.pem` (private, mode 0600) and
/// `PREFIX.pub.pem`; returns both paths and the key id.
pub fn generate(prefix: &Path) -> Result<(PathBuf, PathBuf, String), KeyError> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| KeyError::Random(e.to_string()))?;
    let signing = SigningKey::from_bytes(&seed);
    let private = PathBuf::from(format!("{}.key.pem", prefix.display()));
    let public = PathBuf::from(format!("{}.pub.pem", prefix.display()));
    let pem = signing
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| KeyError::Random(e.to_string()))?;
    write_private(&private, pem.as_bytes())?;
    let public_pem = signing
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .map_err(|e| KeyError::Random(e.to_string()))?;
    std::fs::write(&public, public_pem).map_err(|source| KeyError::Write {
        path: public.clone(),
        source,
    })?;
    Ok((private, public, key_id(&signing.verifying_key())))
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), KeyError> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let write = |source| KeyError::Write {
        path: path.to_path_buf(),
        source,
    };
    options
        .open(path)
        .map_err(write)?
        .write_all(bytes)
        .map_err(write)
}

fn read(path: &Path) -> Result<String, KeyError> {
    std::fs::read_to_string(path).map_err(|source| KeyError::Read {
        path: path.to_path_buf(),
        source,
    })
}

pub fn load_signing_key(path: &Path) -> Result<SigningKey, KeyError> {
    SigningKey::from_pkcs8_pem(&read(path)?).map_err(|e| KeyError::Parse {
        path: path.to_path_buf(),
        kind: "private",
        message: e.to_string(),
    })
}

pub fn load_verifying_key(path: &Path) -> Result<VerifyingKey, KeyError> {
    VerifyingKey::from_public_key_pem(&read(path)?).map_err(|e| KeyError::Parse {
        path: path.to_path_buf(),
        kind: "public",
        message: e.to_string(),
    })
}

/// The public keys whose signatures a sidecar accepts, by key id.
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys {
    keys: Vec<(String, VerifyingKey)>,
}

impl TrustedKeys {
    pub fn load(paths: &[PathBuf]) -> Result<Self, KeyError> {
        let keys = paths
            .iter()
            .map(|p| load_verifying_key(p).map(|k| (key_id(&k), k)))
            .collect::<Result<_, _>>()?;
        Ok(Self { keys })
    }

    pub fn from_keys(keys: impl IntoIterator<Item = VerifyingKey>) -> Self {
        Self {
            keys: keys.into_iter().map(|k| (key_id(&k), k)).collect(),
        }
    }

    pub fn get(&self, key_id: &str) -> Option<&VerifyingKey> {
        self.keys
            .iter()
            .find(|(id, _)| id == key_id)
            .map(|(_, k)| k)
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|(id, _)| id.as_str())
    }
}
