//! `arbiter bundle …` and `arbiter test`: build, sign, inspect and test
//! bundles. Each returns the text to print, or an error with its exit code.

use std::path::{Path, PathBuf};

use crate::bundle::Bundle;
use crate::bundle::archive::{self, ArchiveLimits};
use crate::bundle::keys::{self, TrustedKeys};
use crate::policy::{CompileOptions, Engine};
use crate::policytest;

/// A failed command: what to print and the exit code (after sysexits.h).
#[derive(Debug)]
pub struct Failure {
    pub message: String,
    pub code: u8,
}

impl Failure {
    pub(crate) fn data(message: impl ToString) -> Self {
        Self {
            message: message.to_string(),
            code: 65,
        }
    }
    /// A malformed argument (EX_USAGE).
    pub(crate) fn usage(message: impl ToString) -> Self {
        Self {
            message: message.to_string(),
            code: 64,
        }
    }
    pub(crate) fn io(message: impl ToString) -> Self {
        Self {
            message: message.to_string(),
            code: 74,
        }
    }
}

fn compile(dir: &Path) -> Result<(Bundle, Engine), Failure> {
    let bundle = Bundle::read_dir(dir).map_err(Failure::data)?;
    let engine = Engine::compile(&bundle, CompileOptions::default()).map_err(Failure::data)?;
    Ok((bundle, engine))
}

/// `arbiter test DIR [--junit FILE]`: exit 1 when a case fails.
pub fn test(dir: &Path, junit: Option<&Path>) -> Result<(String, bool), Failure> {
    let (bundle, engine) = compile(dir)?;
    let report = policytest::run(&bundle, &engine).map_err(Failure::data)?;
    if let Some(path) = junit {
        std::fs::write(path, report.junit())
            .map_err(|e| Failure::io(format!("cannot write `{}`: {e}", path.display())))?;
    }
    let mut text = report.render();
    if report.results.is_empty() {
        text = format!("{}: no tests (add tests/*.json)\n", report.bundle);
    }
    Ok((text, report.failed() == 0))
}

/// `arbiter bundle build DIR -o FILE [--sign-key KEY]`: validates, runs the
/// bundle's tests, refuses on failure, writes the archive.
pub fn build(dir: &Path, out: &Path, sign_key: Option<&Path>) -> Result<String, Failure> {
    let (bundle, engine) = compile(dir)?;
    let report = policytest::run(&bundle, &engine).map_err(Failure::data)?;
    if report.failed() > 0 {
        return Err(Failure::data(format!(
            "refusing to build: policy tests failed\n{}",
            report.render()
        )));
    }
    let mut bytes = archive::build(&bundle).map_err(Failure::data)?;
    let mut signed_by = String::from("unsigned");
    if let Some(key_path) = sign_key {
        let key = keys::load_signing_key(key_path).map_err(Failure::data)?;
        bytes = archive::sign(&bytes, &key, &ArchiveLimits::default()).map_err(Failure::data)?;
        signed_by = format!("signed by {}", keys::key_id(&key.verifying_key()));
    }
    std::fs::write(out, &bytes)
        .map_err(|e| Failure::io(format!("cannot write `{}`: {e}", out.display())))?;
    Ok(format!(
        "built {} revision {}: {} policies, {} files, {} tests passed, {signed_by}\nwrote {} ({} bytes)\n",
        bundle.manifest.name,
        bundle.manifest.revision,
        engine.policy_count(),
        bundle.files.len(),
        report.results.len(),
        out.display(),
        bytes.len()
    ))
}

/// `arbiter bundle keygen --out PREFIX`.
pub fn keygen(prefix: &Path) -> Result<String, Failure> {
    let (private, public, id) = keys::generate(prefix).map_err(Failure::io)?;
    Ok(format!(
        "key id {id}\nprivate key: {} (keep it secret)\npublic key:  {} (give it to sidecars with --trusted-key)\n",
        private.display(),
        public.display()
    ))
}

/// `arbiter bundle sign FILE --key KEY [-o OUT]`.
pub fn sign(file: &Path, key_path: &Path, out: Option<&Path>) -> Result<String, Failure> {
    let bytes = std::fs::read(file)
        .map_err(|e| Failure::io(format!("cannot read `{}`: {e}", file.display())))?;
    let key = keys::load_signing_key(key_path).map_err(Failure::data)?;
    let signed = archive::sign(&bytes, &key, &ArchiveLimits::default()).map_err(Failure::data)?;
    let out = out.unwrap_or(file);
    std::fs::write(out, signed)
        .map_err(|e| Failure::io(format!("cannot write `{}`: {e}", out.display())))?;
    Ok(format!(
        "signed {} with key {}\n",
        out.display(),
        keys::key_id(&key.verifying_key())
    ))
}

/// `arbiter bundle inspect FILE [--trusted-key KEY]...`.
pub fn inspect(file: &Path, trusted: &[PathBuf]) -> Result<String, Failure> {
    let bytes = std::fs::read(file)
        .map_err(|e| Failure::io(format!("cannot read `{}`: {e}", file.display())))?;
    let unpacked = archive::unpack(&bytes, &ArchiveLimits::default()).map_err(Failure::data)?;
    let m = &unpacked.manifest;
    let mut out = format!("bundle:     {}\nrevision:   {}\n", m.name, m.revision);
    if let Some(d) = &m.description {
        out.push_str(&format!("about:      {d}\n"));
    }
    let integrity = match archive::check_digests(&unpacked) {
        Ok(()) => "every file matches the manifest".to_owned(),
        Err(e) => format!("BROKEN: {e}"),
    };
    out.push_str(&format!("integrity:  {integrity}\n"));
    let signers: Vec<&str> = unpacked
        .signatures
        .iter()
        .map(|s| s.key_id.as_str())
        .collect();
    out.push_str(&format!(
        "signed by:  {}\n",
        if signers.is_empty() {
            "nobody (unsigned)".to_owned()
        } else {
            signers.join(", ")
        }
    ));
    if !trusted.is_empty() {
        let keys = TrustedKeys::load(trusted).map_err(Failure::data)?;
        let verdict = match archive::verify(&bytes, &keys, &ArchiveLimits::default(), file) {
            Ok(v) => format!("verified (signature by trusted key {})", v.signer()),
            Err(e) => format!("REFUSED: {e}"),
        };
        out.push_str(&format!("verdict:    {verdict}\n"));
    }
    if let Ok(bundle) = Bundle::from_files(unpacked.files.clone(), file) {
        let policies = Engine::compile(&bundle, CompileOptions::default())
            .map(|e| e.policy_count().to_string())
            .unwrap_or_else(|e| format!("invalid ({} problems)", e.problems.len()));
        out.push_str(&format!("policies:   {policies}\n"));
    }
    out.push_str("files:\n");
    for (name, digest) in &m.files {
        out.push_str(&format!("  {digest}  {name}\n"));
    }
    Ok(out)
}

pub(crate) fn admin(
    url: &str,
    token: &str,
    ca: Option<&Path>,
) -> Result<crate::controlplane::AdminClient, Failure> {
    crate::controlplane::AdminClient::new(url, token, std::time::Duration::from_secs(30), ca)
        .map_err(Failure::usage)
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::io(format!("cannot start the runtime: {e}")))
}

pub(crate) fn refused(e: crate::controlplane::FetchError) -> Failure {
    Failure {
        message: e.to_string(),
        code: 69,
    }
}

/// `arbiter bundle push FILE --to URL`: publishes; the control plane checks
/// the signature, the policies and their tests before storing it.
pub fn push(file: &Path, to: &str, token: &str, ca: Option<&Path>) -> Result<String, Failure> {
    let bytes = std::fs::read(file)
        .map_err(|e| Failure::io(format!("cannot read `{}`: {e}", file.display())))?;
    let name = archive::unpack(&bytes, &ArchiveLimits::default())
        .map_err(Failure::data)?
        .manifest
        .name;
    let client = admin(to, token, ca)?;
    let answer = runtime()?
        .block_on(client.push(&name, bytes.into()))
        .map_err(refused)?;
    Ok(format!("{answer}\n"))
}

/// `arbiter bundle rollback NAME --to-revision REV --control-plane URL`.
pub fn rollback(
    name: &str,
    revision: &str,
    url: &str,
    token: &str,
    ca: Option<&Path>,
) -> Result<String, Failure> {
    let client = admin(url, token, ca)?;
    let answer = runtime()?
        .block_on(client.rollback(name, revision))
        .map_err(refused)?;
    Ok(format!("{answer}\n"))
}

/// `arbiter bundle revisions NAME --control-plane URL`.
pub fn revisions(name: &str, url: &str, token: &str, ca: Option<&Path>) -> Result<String, Failure> {
    let client = admin(url, token, ca)?;
    let answer = runtime()?
        .block_on(client.revisions(name))
        .map_err(refused)?;
    let list: Vec<serde_json::Value> = serde_json::from_str(&answer).unwrap_or_default();
    let mut out = String::new();
    for r in list {
        out.push_str(&format!(
            "{} {:<24} {}  signer {}  {}\n",
            if r["active"].as_bool() == Some(true) {
                "*"
            } else {
                " "
            },
            r["revision"].as_str().unwrap_or(""),
            r["published_at"].as_str().unwrap_or(""),
            r["signer"].as_str().unwrap_or(""),
            r["digest"].as_str().unwrap_or("")
        ));
    }
    Ok(out)
}
