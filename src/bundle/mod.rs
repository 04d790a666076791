//! Policy bundles: a named set of files — `manifest.json`, `*.cedar`
//! policies, `schema.cedarschema`, `entities.json`, and `tests/` — read from a
//! directory (development) or from a signed archive (`archive`, verified
//! before anything else sees it).
//!
//! This part knows files, digests and signatures, not policy semantics:
//! `policy::Engine::compile` turns a [`Bundle`] into something that decides.

pub mod archive;
pub mod keys;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use archive::{ArchiveLimits, VerifiedBundle, VerifyError};

/// Largest single file a bundle may hold.
const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;
/// Most files a bundle directory may hold, and how deep it may nest.
const MAX_FILES: usize = 10_000;
const MAX_DEPTH: usize = 8;

/// The bundle's identity, from `manifest.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Bundle name, e.g. `documents`.
    pub name: String,
    /// Revision string; every decision names the revision that made it.
    pub revision: String,
    /// Free text for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// SHA-256 (hex) of every other file, by path; written by `bundle build`,
    /// checked when an archive is opened. Absent in a source directory.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub files: BTreeMap<String, String>,
}

/// One `*.cedar` file, kept with its name so errors can point into it.
#[derive(Debug, Clone)]
pub struct PolicyFile {
    /// File name relative to the bundle root.
    pub name: String,
    pub text: String,
}

/// Everything a bundle holds, read but not yet compiled.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub manifest: Manifest,
    pub policies: Vec<PolicyFile>,
    pub schema: String,
    /// Cedar entities JSON (an array); `[]` when the bundle has no `entities.json`.
    pub entities: serde_json::Value,
    /// Every file by path relative to the bundle root (`/`-separated), the
    /// manifest included: what an archive carries and tests read.
    pub files: BTreeMap<String, Vec<u8>>,
    /// Where it was read from, for messages.
    pub source: PathBuf,
}

/// Why a bundle could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("cannot read `{path}`: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`{path}` is {size} bytes, over the {MAX_FILE_BYTES}-byte limit for a bundle file")]
    TooLarge { path: PathBuf, size: u64 },
    #[error("`{path}` is not valid: {message}")]
    Malformed { path: PathBuf, message: String },
    #[error("bundle `{dir}` has no `*.cedar` policy files")]
    NoPolicies { dir: PathBuf },
    #[error(
        "bundle `{dir}` has more than {MAX_FILES} files or nests deeper than {MAX_DEPTH} levels"
    )]
    TooManyFiles { dir: PathBuf },
}

impl Bundle {
    /// Reads a bundle directory (every regular file below it, hidden ones
    /// excepted).
    pub fn read_dir(dir: &Path) -> Result<Self, BundleError> {
        let mut files = BTreeMap::new();
        collect(dir, dir, 0, &mut files)?;
        Self::from_files(files, dir)
    }

    /// Makes a bundle from its files. Policy files are the top-level
    /// `*.cedar` files, in name order.
    pub fn from_files(
        files: BTreeMap<String, Vec<u8>>,
        source: &Path,
    ) -> Result<Self, BundleError> {
        let text = |name: &str| -> Result<Option<String>, BundleError> {
            files
                .get(name)
                .map(|bytes| {
                    String::from_utf8(bytes.clone()).map_err(|_| BundleError::Malformed {
                        path: source.join(name),
                        message: "not UTF-8 text".into(),
                    })
                })
                .transpose()
        };
        let missing = |name: &str| BundleError::Io {
            path: source.join(name),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "missing from the bundle"),
        };
        let manifest_path = source.join("manifest.json");
        let manifest: Manifest =
            serde_json::from_str(&text("manifest.json")?.ok_or_else(|| missing("manifest.json"))?)
                .map_err(|e| BundleError::Malformed {
                    path: manifest_path.clone(),
                    message: e.to_string(),
                })?;
        if manifest.name.trim().is_empty() || manifest.revision.trim().is_empty() {
            return Err(BundleError::Malformed {
                path: manifest_path,
                message: "`name` and `revision` must not be empty".into(),
            });
        }
        let schema = text("schema.cedarschema")?.ok_or_else(|| missing("schema.cedarschema"))?;
        let entities = match text("entities.json")? {
            Some(t) => {
                let path = source.join("entities.json");
                let value: serde_json::Value =
                    serde_json::from_str(&t).map_err(|e| BundleError::Malformed {
                        path: path.clone(),
                        message: e.to_string(),
                    })?;
                if !value.is_array() {
                    return Err(BundleError::Malformed {
                        path,
                        message: "expected a JSON array of entities".into(),
                    });
                }
                value
            }
            None => serde_json::Value::Array(Vec::new()),
        };
        let mut policies = Vec::new();
        for name in files
            .keys()
            .filter(|n| n.ends_with(".cedar") && !n.contains('/'))
        {
            policies.push(PolicyFile {
                name: name.clone(),
                text: text(name)?.unwrap_or_default(),
            });
        }
        if policies.is_empty() {
            return Err(BundleError::NoPolicies {
                dir: source.to_path_buf(),
            });
        }
        Ok(Self {
            manifest,
            policies,
            schema,
            entities,
            files,
            source: source.to_path_buf(),
        })
    }
}

fn collect(
    root: &Path,
    dir: &Path,
    depth: usize,
    out: &mut BTreeMap<String, Vec<u8>>,
) -> Result<(), BundleError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| BundleError::Io { path, source }
    };
    if depth > MAX_DEPTH {
        return Err(BundleError::TooManyFiles {
            dir: root.to_path_buf(),
        });
    }
    for entry in fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        let kind = entry.file_type().map_err(io(&path))?;
        if kind.is_dir() {
            collect(root, &path, depth + 1, out)?;
        } else if kind.is_file() {
            let size = entry.metadata().map_err(io(&path))?.len();
            if size > MAX_FILE_BYTES {
                return Err(BundleError::TooLarge { path, size });
            }
            if out.len() >= MAX_FILES {
                return Err(BundleError::TooManyFiles {
                    dir: root.to_path_buf(),
                });
            }
            let rel = path
                .strip_prefix(root)
                .unwrap_or(&path)
                .components()
                .map(|c| c.as_os_str().to_string_lossy())
                .collect::<Vec<_>>()
                .join("/");
            out.insert(rel, fs::read(&path).map_err(io(&path))?);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        if let Some(parent) = dir.join(name).parent() {
            fs::create_dir_all(parent).expect("mkdir");
        }
        fs::write(dir.join(name), text).expect("write test file");
    }

    #[test]
    fn reads_files_in_name_order_and_keeps_every_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(
            dir.path(),
            "manifest.json",
            r#"{"name":"b","revision":"r1"}"#,
        );
        write(dir.path(), "schema.cedarschema", "entity User;");
        write(dir.path(), "z.cedar", "");
        write(dir.path(), "a.cedar", "");
        write(dir.path(), "tests/cases.json", "[]");
        write(dir.path(), ".hidden", "x");
        let bundle = Bundle::read_dir(dir.path()).expect("bundle reads");
        let names: Vec<_> = bundle.policies.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["a.cedar", "z.cedar"]);
        assert_eq!(bundle.entities, serde_json::json!([]));
        let all: Vec<_> = bundle.files.keys().map(String::as_str).collect();
        assert_eq!(
            all,
            [
                "a.cedar",
                "manifest.json",
                "schema.cedarschema",
                "tests/cases.json",
                "z.cedar"
            ]
        );
    }

    #[test]
    fn missing_manifest_names_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = Bundle::read_dir(dir.path()).expect_err("no manifest");
        assert!(err.to_string().contains("manifest.json"), "{err}");
    }

    #[test]
    fn unknown_manifest_field_is_rejected() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(
            dir.path(),
            "manifest.json",
            r#"{"name":"b","revision":"r1","extra":1}"#,
        );
        let err = Bundle::read_dir(dir.path()).expect_err("unknown field");
        assert!(err.to_string().contains("extra"), "{err}");
    }
}
