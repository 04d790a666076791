//! Masking rules: which request fields a decision record must not carry.
//! They live in the bundle (`masking.json`), so the team that writes the
//! policies also says what their inputs may reveal:
//!
//! ```json
//! { "erase": ["/context/card_number"], "hash": ["/subject/properties/email"], "salt": "…" }
//! ```
//!
//! Paths are JSON pointers (RFC 6901) into the record's request form
//! (`/subject/{type,id,properties}`, `/action/name`, `/resource/…`,
//! `/context/…`). `erase` removes the member; `hash` replaces the value with
//! `sha256:<hex>` of the salt and the value's JSON, so equal values can still
//! be correlated without being revealed.

use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// The bundle file holding masking rules.
pub const FILE: &str = "masking.json";

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MaskRules {
    erase: Vec<Vec<String>>,
    hash: Vec<Vec<String>>,
    salt: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    #[serde(default)]
    erase: Vec<String>,
    #[serde(default)]
    hash: Vec<String>,
    #[serde(default)]
    salt: String,
}

const ROOTS: [&str; 4] = ["subject", "action", "resource", "context"];

impl MaskRules {
    /// Parses `masking.json`; the error names the offending path.
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let file: RulesFile = serde_json::from_slice(bytes).map_err(|e| format!("{FILE}: {e}"))?;
        let split = |paths: Vec<String>| {
            paths
                .into_iter()
                .map(|p| {
                    let tokens = pointer_tokens(&p)
                        .ok_or_else(|| format!("{FILE}: `{p}` is not a JSON pointer (it must start with `/`)"))?;
                    if !tokens.first().is_some_and(|t| ROOTS.contains(&t.as_str())) || tokens.len() < 2 {
                        return Err(format!(
                            "{FILE}: `{p}` must point inside /subject, /action, /resource or /context"
                        ));
                    }
                    Ok(tokens)
                })
                .collect::<Result<Vec<_>, String>>()
        };
        Ok(Self {
            erase: split(file.erase)?,
            hash: split(file.hash)?,
            salt: file.salt,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.erase.is_empty() && self.hash.is_empty()
    }

    /// Applies the rules to a request in record form. Paths that are absent
    /// in this request are skipped.
    pub fn apply(&self, request: &mut Value) {
        for path in &self.hash {
            if let Some(v) = lookup(request, path) {
                let mut h = Sha256::new();
                h.update(self.salt.as_bytes());
                h.update(serde_json::to_vec(v).unwrap_or_default());
                *v = Value::String(format!("sha256:{}", hex(&h.finalize())));
            }
        }
        for path in &self.erase {
            let (last, parent) = path.split_last().expect("paths have two tokens or more");
            match lookup(request, parent) {
                Some(Value::Object(map)) => {
                    map.remove(last);
                }
                Some(Value::Array(items)) => {
                    if let Some(item) = last.parse::<usize>().ok().and_then(|i| items.get_mut(i)) {
                        *item = Value::Null;
                    }
                }
                _ => {}
            }
        }
    }
}

fn pointer_tokens(p: &str) -> Option<Vec<String>> {
    let rest = p.strip_prefix('/')?;
    Some(
        rest.split('/')
            .map(|t| t.replace("~1", "/").replace("~0", "~"))
            .collect(),
    )
}

fn lookup<'a>(mut v: &'a mut Value, path: &[String]) -> Option<&'a mut Value> {
    for token in path {
        v = match v {
            Value::Object(map) => map.get_mut(token)?,
            Value::Array(items) => items.get_mut(token.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(v)
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 15)] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn erases_and_hashes_without_touching_the_rest() {
        let rules = MaskRules::parse(
            br#"{"erase": ["/context/card", "/context/tags/1", "/context/absent/x"],
                 "hash": ["/subject/properties/email"], "salt": "s"}"#,
        )
        .expect("valid");
        let mut req = json!({
            "subject": {"type": "User", "id": "alice", "properties": {"email": "a@x.test"}},
            "action": {"name": "pay"},
            "resource": {"type": "Card", "id": "c1"},
            "context": {"card": "4111111111111111", "tags": ["a", "secret"], "amount": 5}
        });
        rules.apply(&mut req);
        let text = req.to_string();
        assert!(!text.contains("4111"), "{text}");
        assert!(!text.contains("a@x.test"), "{text}");
        assert!(!text.contains("secret"), "{text}");
        assert_eq!(req["context"]["amount"], 5);
        assert_eq!(req["context"]["tags"], json!(["a", null]));
        let hashed = req["subject"]["properties"]["email"]
            .as_str()
            .expect("hashed");
        assert!(hashed.starts_with("sha256:") && hashed.len() == 7 + 64);
        assert_eq!(hex(&[0x00, 0x9f, 0xa0, 0xff]), "009fa0ff");
    }

    #[test]
    fn bad_rules_are_refused_with_the_path() {
        for (rules, needle) in [
            (r#"{"erase": ["context/x"]}"#, "context/x"),
            (r#"{"erase": ["/secrets/x"]}"#, "/secrets/x"),
            (r#"{"hash": ["/context"]}"#, "/context"),
            (r#"{"mask": []}"#, "unknown field"),
        ] {
            let err = MaskRules::parse(rules.as_bytes()).expect_err(rules);
            assert!(err.contains(needle), "{err}");
        }
    }
}
