//! A policy bundle read from a directory: `manifest.json`, `*.cedar` policies,
//! `schema.cedarschema` and `entities.json`.
//!
//! This part knows files, not policy semantics: it reads and checks the shape of
//! what is on disk. `policy::Engine::compile` turns a [`Bundle`] into something
//! that decides. Signed archives and remote sources plug in here later.

use std::fs;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Largest policy, schema or entities file a bundle may hold.
const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// The bundle's identity, from `manifest.json`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Bundle name, e.g. `documents`.
    pub name: String,
    /// Revision string; every decision names the revision that made it.
    pub revision: String,
    /// Free text for people.
    #[serde(default)]
    pub description: Option<String>,
}

/// One `*.cedar` file, kept with its name so errors can point into it.
#[derive(Debug, Clone)]
pub struct PolicyFile {
    /// File name relative to the bundle directory.
    pub name: String,
    pub text: String,
}

/// Everything a bundle directory holds, read but not yet compiled.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub manifest: Manifest,
    pub policies: Vec<PolicyFile>,
    pub schema: String,
    /// Cedar entities JSON (an array); `[]` when the bundle has no `entities.json`.
    pub entities: serde_json::Value,
    /// Where it was read from, for messages.
    pub source: PathBuf,
}

/// Why a bundle directory could not be read.
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
}

impl Bundle {
    /// Reads a bundle directory. Policy files are read in name order so the
    /// result does not depend on the file system's listing order.
    pub fn read_dir(dir: &Path) -> Result<Self, BundleError> {
        let manifest_path = dir.join("manifest.json");
        let manifest: Manifest =
            serde_json::from_str(&read_text(&manifest_path)?).map_err(|e| {
                BundleError::Malformed {
                    path: manifest_path.clone(),
                    message: e.to_string(),
                }
            })?;
        if manifest.name.trim().is_empty() || manifest.revision.trim().is_empty() {
            return Err(BundleError::Malformed {
                path: manifest_path,
                message: "`name` and `revision` must not be empty".into(),
            });
        }

        let schema = read_text(&dir.join("schema.cedarschema"))?;

        let entities_path = dir.join("entities.json");
        let entities = if entities_path.exists() {
            let value: serde_json::Value = serde_json::from_str(&read_text(&entities_path)?)
                .map_err(|e| BundleError::Malformed {
                    path: entities_path.clone(),
                    message: e.to_string(),
                })?;
            if !value.is_array() {
                return Err(BundleError::Malformed {
                    path: entities_path,
                    message: "expected a JSON array of entities".into(),
                });
            }
            value
        } else {
            serde_json::Value::Array(Vec::new())
        };

        let mut names = Vec::new();
        let listing = fs::read_dir(dir).map_err(|source| BundleError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        for entry in listing {
            let entry = entry.map_err(|source| BundleError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".cedar") && entry.path().is_file() {
                names.push(name);
            }
        }
        names.sort();
        if names.is_empty() {
            return Err(BundleError::NoPolicies {
                dir: dir.to_path_buf(),
            });
        }
        let policies = names
            .into_iter()
            .map(|name| {
                let text = read_text(&dir.join(&name))?;
                Ok(PolicyFile { name, text })
            })
            .collect::<Result<Vec<_>, BundleError>>()?;

        Ok(Self {
            manifest,
            policies,
            schema,
            entities,
            source: dir.to_path_buf(),
        })
    }
}

fn read_text(path: &Path) -> Result<String, BundleError> {
    let io = |source| BundleError::Io {
        path: path.to_path_buf(),
        source,
    };
    let size = fs::metadata(path).map_err(io)?.len();
    if size > MAX_FILE_BYTES {
        return Err(BundleError::TooLarge {
            path: path.to_path_buf(),
            size,
        });
    }
    fs::read_to_string(path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        fs::write(dir.join(name), text).expect("write test file");
    }

    #[test]
    fn reads_files_in_name_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(
            dir.path(),
            "manifest.json",
            r#"{"name":"b","revision":"r1"}"#,
        );
        write(dir.path(), "schema.cedarschema", "entity User;");
        write(dir.path(), "z.cedar", "");
        write(dir.path(), "a.cedar", "");
        let bundle = Bundle::read_dir(dir.path()).expect("bundle reads");
        let names: Vec<_> = bundle.policies.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["a.cedar", "z.cedar"]);
        assert_eq!(bundle.entities, serde_json::json!([]));
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
