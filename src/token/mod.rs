//! The server token: the OAuth 1.0a credentials Apple issues per device-management server.
//!
//! Owns reading a token file — the decrypted JSON/text, or Apple's S/MIME `.p7m` decrypted
//! with the configured private key (via [`p7m`]) — and checking its expiry. The
//! file is read again at every run
//! ([`TokenConfig::load_token`](crate::config::TokenConfig::load_token)), so a renewed
//! token takes effect without a restart. The secret values never leave this module in
//! printable form: [`Secret`] redacts itself in `Debug` and `Display`, and no error
//! carries the file's contents.

use std::fmt;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub mod admin;
pub mod p7m;

/// A secret string that never prints its value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The value, for the one place that must use it (signing a request).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

/// The decrypted server token (docs/apple-dep-api.md §2.3).
#[derive(Clone, Debug)]
pub struct ServerToken {
    /// `CK_...`: identifies the server; not secret, but kept whole only here.
    pub consumer_key: String,
    /// `CS_...`.
    pub consumer_secret: Secret,
    /// `AT_...`.
    pub access_token: Secret,
    /// `AS_...`.
    pub access_secret: Secret,
    /// When Apple stops accepting the token (one year after download).
    pub access_token_expiry: DateTime<Utc>,
}

#[derive(Deserialize)]
struct RawToken {
    consumer_key: Option<String>,
    consumer_secret: Option<Secret>,
    access_token: Option<Secret>,
    access_secret: Option<Secret>,
    access_token_expiry: Option<String>,
}

fn read_hint(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::PermissionDenied => "; make it readable by the account adesync runs as, and by no one else (e.g. chgrp adesync FILE && chmod 0640 FILE)",
        std::io::ErrorKind::NotFound => "; check `token_file` in the config, or install the token with `adesync token import`",
        _ => "",
    }
}

/// Why a token file could not be used. Never contains the file's contents.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The file could not be read.
    #[error("cannot read server token file {path}: {source}{}", read_hint(.source))]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not the decrypted token JSON.
    #[error("server token file {path} is not a decrypted server token ({detail}); expected the JSON with consumer_key, consumer_secret, access_token, access_secret and access_token_expiry that ABM/ASM's token decrypts to")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong, without any secret value.
        detail: String,
    },
    /// The file is Apple's encrypted `.p7m` but no private key is configured.
    #[error("server token file {path} is Apple's encrypted S/MIME file (.p7m); set private_key_file in this token's [[tokens]] entry to the private key made with `adesync token keygen` (the key whose certificate was uploaded to Apple Business/School Manager)")]
    KeyRequired {
        /// The file.
        path: PathBuf,
    },
    /// The private key cannot be used.
    #[error(transparent)]
    Key(#[from] p7m::KeyError),
    /// The `.p7m` does not decrypt with the key.
    #[error("server token file {path}: {reason}")]
    Decrypt {
        /// The file.
        path: PathBuf,
        /// What went wrong (wrong key, not CMS, truncated...).
        reason: p7m::P7mError,
    },
    /// The `.p7m` decrypts, but not to a server token.
    #[error("server token file {path} decrypts, but not to a server token ({detail}); download the token again from Apple Business/School Manager")]
    Content {
        /// The file.
        path: PathBuf,
        /// What is wrong, without any secret value.
        detail: String,
    },
    /// The token's `access_token_expiry` has passed.
    #[error("the server token for \"{name}\" expired at {expiry}; in Apple Business/School Manager open Preferences → your MDM server → Download Token, then `adesync token import --name {name} FILE` (or replace {path})")]
    Expired {
        /// The token's configured name.
        name: String,
        /// When it expired.
        expiry: DateTime<Utc>,
        /// Where the new one goes.
        path: PathBuf,
    },
}

impl TokenError {
    /// Whether reading failed for want of a local resource (file descriptors, memory,
    /// an interrupted disk) rather than because of the file: time or the operator's fix of
    /// the machine heals it, so it never parks the token as if a new token were needed.
    pub fn is_local_resource(&self) -> bool {
        let io = match self {
            TokenError::Read { source, .. } => source,
            TokenError::Key(p7m::KeyError::Read { source, .. }) => source,
            _ => return false,
        };
        is_resource_error(io)
    }
}

/// EMFILE, ENFILE, ENOMEM, EAGAIN, EIO, ENOSPC: the machine, not the file.
pub(crate) fn is_resource_error(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(24 | 23 | 12 | 11 | 5 | 28))
        || matches!(
            e.kind(),
            std::io::ErrorKind::OutOfMemory | std::io::ErrorKind::Interrupted
        )
}

impl ServerToken {
    /// Reads and validates a token file that needs no key (the decrypted JSON or text);
    /// a `.p7m` is refused with [`TokenError::KeyRequired`].
    pub fn load(path: &Path) -> Result<Self, TokenError> {
        Self::load_with_key(path, None)
    }

    /// Reads and validates a token file: the decrypted JSON or text as is, or Apple's
    /// S/MIME `.p7m` decrypted with `private_key`. The format is told by the content, not
    /// the file name.
    pub fn load_with_key(path: &Path, private_key: Option<&Path>) -> Result<Self, TokenError> {
        let bytes = std::fs::read(path).map_err(|source| TokenError::Read {
            path: path.to_owned(),
            source,
        })?;
        if !p7m::is_smime(&bytes) {
            warn_if_others_can_read(path);
            let text = String::from_utf8(bytes).map_err(|_| TokenError::Format {
                path: path.to_owned(),
                detail: "neither UTF-8 text nor an S/MIME .p7m".into(),
            })?;
            return Self::parse(&text).map_err(|detail| TokenError::Format {
                path: path.to_owned(),
                detail,
            });
        }
        let key_path = private_key.ok_or_else(|| TokenError::KeyRequired {
            path: path.to_owned(),
        })?;
        let key = p7m::load_private_key(key_path)?;
        let plain = p7m::decrypt(&bytes, &key).map_err(|reason| TokenError::Decrypt {
            path: path.to_owned(),
            reason,
        })?;
        let text = String::from_utf8(plain).map_err(|_| TokenError::Content {
            path: path.to_owned(),
            detail: "the plaintext is not UTF-8 text".into(),
        })?;
        Self::parse(&text).map_err(|detail| TokenError::Content {
            path: path.to_owned(),
            detail,
        })
    }

    /// The decrypted token JSON, secrets included: only for writing a 0600 token file.
    pub fn to_secret_json(&self) -> String {
        serde_json::json!({
            "consumer_key": self.consumer_key,
            "consumer_secret": self.consumer_secret.expose(),
            "access_token": self.access_token.expose(),
            "access_secret": self.access_secret.expose(),
            "access_token_expiry": self
                .access_token_expiry
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        })
        .to_string()
    }

    /// Parses the decrypted token: either bare JSON or the MIME-wrapped form Apple's
    /// S/MIME payload decrypts to (headers, blank line, optional
    /// `-----BEGIN MESSAGE-----` / `-----END MESSAGE-----` lines, JSON possibly
    /// hard-wrapped). Robust rule from docs/apple-dep-api.md §2.3: drop the header block and marker lines,
    /// join the rest with no separator.
    pub fn parse(text: &str) -> Result<Self, String> {
        let json = extract_json(text);
        let raw: RawToken = serde_json::from_str(&json).map_err(|e| {
            // Only the category and position: serde_json's full message can quote a value,
            // and every value here is a secret.
            let what = match e.classify() {
                serde_json::error::Category::Io => "unreadable",
                serde_json::error::Category::Syntax => "not valid JSON",
                serde_json::error::Category::Data => "JSON of the wrong shape",
                serde_json::error::Category::Eof => "truncated JSON",
            };
            format!("{what} at line {} column {}", e.line(), e.column())
        })?;
        let mut missing = Vec::new();
        if raw.consumer_key.as_deref().is_none_or(str::is_empty) {
            missing.push("consumer_key");
        }
        if raw.consumer_secret.as_ref().is_none_or(|s| s.0.is_empty()) {
            missing.push("consumer_secret");
        }
        if raw.access_token.as_ref().is_none_or(|s| s.0.is_empty()) {
            missing.push("access_token");
        }
        if raw.access_secret.as_ref().is_none_or(|s| s.0.is_empty()) {
            missing.push("access_secret");
        }
        if raw.access_token_expiry.is_none() {
            missing.push("access_token_expiry");
        }
        if !missing.is_empty() {
            return Err(format!("missing field(s): {}", missing.join(", ")));
        }
        let expiry_text = raw.access_token_expiry.unwrap_or_default();
        let expiry = crate::model::parse_time(&expiry_text).ok_or_else(|| {
            format!("access_token_expiry {expiry_text:?} is not an RFC 3339 time")
        })?;
        Ok(Self {
            consumer_key: raw.consumer_key.unwrap_or_default(),
            consumer_secret: raw.consumer_secret.unwrap_or_else(|| Secret::new("")),
            access_token: raw.access_token.unwrap_or_else(|| Secret::new("")),
            access_secret: raw.access_secret.unwrap_or_else(|| Secret::new("")),
            access_token_expiry: expiry,
        })
    }

    /// Refuses an expired token before any call to Apple.
    pub fn check_not_expired(
        &self,
        name: &str,
        path: &Path,
        now: DateTime<Utc>,
    ) -> Result<(), TokenError> {
        if now >= self.access_token_expiry {
            return Err(TokenError::Expired {
                name: name.to_owned(),
                expiry: self.access_token_expiry,
                path: path.to_owned(),
            });
        }
        Ok(())
    }

    /// Whole days until expiry (negative once expired).
    pub fn days_left(&self, now: DateTime<Utc>) -> i64 {
        (self.access_token_expiry - now).num_days()
    }
}

impl crate::config::TokenConfig {
    /// Reads this token's file afresh (decrypting a `.p7m` with `private_key_file`). Each
    /// run calls it, so a renewed token file takes effect at the next run, no restart.
    pub fn load_token(&self) -> Result<ServerToken, TokenError> {
        ServerToken::load_with_key(&self.token_file, self.private_key_file.as_deref())
    }
}

/// Days before expiry from which a token "expires soon" and needs attention.
pub const EXPIRY_WARNING_DAYS: i64 = 30;

/// Where a token stands against its expiry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenExpiry {
    /// More than [`EXPIRY_WARNING_DAYS`] left.
    Ok,
    /// [`EXPIRY_WARNING_DAYS`] days or less left.
    ExpiresSoon,
    /// Expired: Apple refuses it.
    Expired,
}

impl TokenExpiry {
    /// The rule: expired at or after `expiry`; soon within [`EXPIRY_WARNING_DAYS`] days.
    pub fn of(expiry: DateTime<Utc>, now: DateTime<Utc>) -> Self {
        if now >= expiry {
            TokenExpiry::Expired
        } else if expiry - now <= chrono::Duration::days(EXPIRY_WARNING_DAYS) {
            TokenExpiry::ExpiresSoon
        } else {
            TokenExpiry::Ok
        }
    }

    /// Words for tables and JSON: `ok`, `expires soon`, `expired`.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenExpiry::Ok => "ok",
            TokenExpiry::ExpiresSoon => "expires soon",
            TokenExpiry::Expired => "expired",
        }
    }
}

/// A decrypted token holds every secret in clear: say so when any user may read it.
fn warn_if_others_can_read(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = std::fs::metadata(path) {
        if m.permissions().mode() & 0o004 != 0 {
            tracing::warn!(
                file = %path.display(),
                "the decrypted server token is readable by every user on this machine; restrict it: chmod 0600 (or chgrp adesync && chmod 0640)"
            );
        }
    }
}

fn extract_json(text: &str) -> String {
    let trimmed = text.trim_start_matches('\u{feff}').trim();
    if trimmed.starts_with('{') {
        return trimmed.to_owned();
    }
    // Drop the MIME-like header block (everything up to the first blank line) when the
    // text starts with header lines.
    let mut lines: Vec<&str> = trimmed.lines().collect();
    if lines.first().is_some_and(|l| looks_like_header(l)) {
        let blank = lines.iter().position(|l| l.trim().is_empty());
        lines = match blank {
            Some(i) => lines.split_off(i + 1),
            None => Vec::new(),
        };
    }
    lines
        .iter()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| {
            !l.starts_with("-----BEGIN MESSAGE-----") && !l.starts_with("-----END MESSAGE-----")
        })
        .collect::<String>()
        .trim()
        .to_owned()
}

fn looks_like_header(line: &str) -> bool {
    match line.split_once(':') {
        Some((name, _)) => {
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_expiry_rule_has_one_boundary() {
        let now = Utc::now();
        let d = chrono::Duration::days;
        assert_eq!(TokenExpiry::of(now + d(31), now), TokenExpiry::Ok);
        assert_eq!(TokenExpiry::of(now + d(30), now), TokenExpiry::ExpiresSoon);
        assert_eq!(
            TokenExpiry::of(now + chrono::Duration::seconds(1), now),
            TokenExpiry::ExpiresSoon
        );
        assert_eq!(TokenExpiry::of(now, now), TokenExpiry::Expired);
        assert_eq!(TokenExpiry::of(now - d(1), now), TokenExpiry::Expired);
    }

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/apple/");

    #[test]
    fn parses_plain_json_token() {
        let text =
            std::fs::read_to_string(format!("{FIXTURES}nanodep-decrypted-tokens.example.json"))
                .unwrap();
        let t = ServerToken::parse(&text).unwrap();
        assert_eq!(t.consumer_key, "CK_9af2f8218b150c351ad802c6f3d66abe");
        assert_eq!(
            t.access_token.expose(),
            "AT_9af2f8218b150c351ad802c6f3d66abe"
        );
        assert_eq!(
            t.access_token_expiry.to_rfc3339(),
            "2023-07-01T22:18:53+00:00"
        );
    }

    #[test]
    fn parses_apples_wrapped_mime_form_and_the_marker_form() {
        for file in [
            "apple-doc-token-decrypted-sample.txt",
            "synthetic-decrypted-token-with-markers.txt",
        ] {
            let text = std::fs::read_to_string(format!("{FIXTURES}{file}")).unwrap();
            let t = ServerToken::parse(&text).unwrap_or_else(|e| panic!("{file}: {e}"));
            assert!(t.consumer_key.starts_with("CK_"), "{file}");
            assert!(t.access_secret.expose().starts_with("AS_"), "{file}");
        }
    }

    #[test]
    fn missing_fields_are_named_and_secrets_never_printed() {
        let err = ServerToken::parse(r#"{"consumer_key":"CK_1","consumer_secret":"CS_topsecret"}"#)
            .unwrap_err();
        assert!(
            err.contains("access_token, access_secret, access_token_expiry"),
            "{err}"
        );
        let t = ServerToken::parse(
            r#"{"consumer_key":"CK_1","consumer_secret":"CS_topsecret","access_token":"AT_topsecret",
               "access_secret":"AS_topsecret","access_token_expiry":"2030-01-01T00:00:00Z"}"#,
        )
        .unwrap();
        let dbg = format!("{t:?}");
        assert!(!dbg.contains("topsecret"), "{dbg}");
        let bad =
            ServerToken::parse(r#"{"consumer_key": "CK_1", "consumer_secret": "CS_topsecret""#)
                .unwrap_err();
        assert!(!bad.contains("topsecret"), "{bad}");
    }

    #[test]
    fn expiry_is_enforced_at_the_boundary() {
        let t = ServerToken::parse(
            r#"{"consumer_key":"CK_1","consumer_secret":"CS_1","access_token":"AT_1",
               "access_secret":"AS_1","access_token_expiry":"2030-01-01T00:00:00Z"}"#,
        )
        .unwrap();
        let exp = t.access_token_expiry;
        let p = Path::new("/etc/adesync/acme.json");
        assert!(t
            .check_not_expired("acme", p, exp - chrono::Duration::seconds(1))
            .is_ok());
        let err = t.check_not_expired("acme", p, exp).unwrap_err().to_string();
        assert!(
            err.contains("\"acme\"") && err.contains("Download Token"),
            "{err}"
        );
    }
}
