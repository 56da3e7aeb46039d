//! The `webhook` sink: events POSTed as JSON and signed with HMAC-SHA256, so a receiver
//! can tell that a request comes from adesync, unaltered and recent.
//!
//! Signature scheme, version 1 (the README shows how to verify it):
//!
//! ```text
//! X-Adesync-Timestamp: <unix time in seconds when the request was signed>
//! X-Adesync-Signature: v1=<lowercase hex of HMAC-SHA256(secret, "<timestamp>.<body>")>
//! ```
//!
//! The receiver recomputes the HMAC over the raw body bytes, compares in constant time,
//! and rejects a timestamp further than its window (5 minutes suggested) from its own
//! clock, so a captured request cannot be replayed later. A retry is signed afresh; its
//! body, and so its event ids, are those of the first attempt.
//!
//! Answers: 2xx = delivered; 408, 429, 5xx, network errors and timeouts are retried
//! (honouring `Retry-After`); any other status is a refusal that parks the sink.

use std::time::Duration;

use hmac::{Hmac, Mac};
use reqwest::header::{CONTENT_TYPE, RETRY_AFTER};
use sha2::Sha256;

use super::Failure;
use crate::config::{WebhookConfig, WebhookSecret};

/// Header carrying the signing time (unix seconds).
pub const TIMESTAMP_HEADER: &str = "X-Adesync-Timestamp";
/// Header carrying the signature, `v1=<hex>`.
pub const SIGNATURE_HEADER: &str = "X-Adesync-Signature";
/// The replay window receivers are advised to use.
pub const DEFAULT_TOLERANCE: Duration = Duration::from_secs(300);

type HmacSha256 = Hmac<Sha256>;

fn mac(secret: &[u8], timestamp: &str, body: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The `X-Adesync-Signature` value for `body` signed at `timestamp` (unix seconds).
pub fn sign(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let tag = mac(secret, &timestamp.to_string(), body)
        .finalize()
        .into_bytes();
    let mut out = String::with_capacity(3 + tag.len() * 2);
    out.push_str("v1=");
    for b in tag {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// Why a signed request was rejected by [`verify`].
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The timestamp header is missing or not a number.
    #[error("the {TIMESTAMP_HEADER} header is missing or not a number")]
    BadTimestamp,
    /// Signed too long ago (or in the future): a replay, or a wrong clock.
    #[error("the request was signed {0} s away from now, outside the window: a replayed request or a wrong clock")]
    Stale(i64),
    /// No `v1=` value matches: a wrong secret, or a changed body.
    #[error("the signature does not match: a wrong secret, or the body was changed")]
    Mismatch,
}

/// Checks a request the way a receiver should: the timestamp within `tolerance` of
/// `now` (unix seconds), and one of the comma-separated `v1=` signatures equal, in
/// constant time, to the HMAC of `"<timestamp>.<body>"`.
pub fn verify(
    secret: &[u8],
    timestamp: &str,
    signature: &str,
    body: &[u8],
    now: i64,
    tolerance: Duration,
) -> Result<(), VerifyError> {
    let ts: i64 = timestamp
        .trim()
        .parse()
        .map_err(|_| VerifyError::BadTimestamp)?;
    let skew = now - ts;
    if skew.unsigned_abs() > tolerance.as_secs() {
        return Err(VerifyError::Stale(skew));
    }
    let expected = mac(secret, timestamp.trim(), body);
    let ok = signature
        .split(',')
        .filter_map(|s| s.trim().strip_prefix("v1="))
        .filter_map(decode_hex)
        .any(|tag| expected.clone().verify_slice(&tag).is_ok());
    if ok {
        Ok(())
    } else {
        Err(VerifyError::Mismatch)
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A configured webhook, ready to POST batches.
pub(super) struct WebhookClient {
    http: reqwest::Client,
    url: reqwest::Url,
    secret: WebhookSecret,
    max_batch: usize,
    timeout: Duration,
}

impl WebhookClient {
    pub(super) fn new(cfg: &WebhookConfig) -> Result<Self, Failure> {
        let http = crate::http_client::builder()
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout.min(Duration::from_secs(10)))
            .user_agent(crate::config::default_user_agent())
            // A redirect is a misconfigured url; following it would turn the POST into
            // a GET or send signed events somewhere unexpected.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| Failure::Retry {
                message: format!("cannot set up the HTTP client: {}", chain(&e)),
                retry_after: None,
            })?;
        Ok(Self {
            http,
            url: cfg.url.clone(),
            secret: cfg.secret.clone(),
            max_batch: cfg.max_batch,
            timeout: cfg.timeout,
        })
    }

    pub(super) fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// One event object when `max_batch` is 1, else a JSON array: the body's shape
    /// depends only on the configuration, never on how many events happen to be pending.
    fn body(&self, events: &[Vec<u8>]) -> Vec<u8> {
        if self.max_batch == 1 && events.len() == 1 {
            return events[0].clone();
        }
        let mut body = Vec::with_capacity(events.iter().map(|e| e.len() + 1).sum::<usize>() + 2);
        body.push(b'[');
        for (i, e) in events.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(e);
        }
        body.push(b']');
        body
    }

    pub(super) async fn send(&self, events: &[Vec<u8>]) -> Result<(), Failure> {
        let body = self.body(events);
        let ts = chrono::Utc::now().timestamp();
        let signature = sign(self.secret.expose(), ts, &body);
        let url = self.url.as_str();
        let resp = self
            .http
            .post(self.url.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(TIMESTAMP_HEADER, ts.to_string())
            .header(SIGNATURE_HEADER, signature)
            .body(body)
            .send()
            .await;
        let mut resp = match resp {
            Ok(r) => r,
            Err(e) if e.is_timeout() => {
                return Err(Failure::Retry {
                    message: format!(
                        "POST {url}: no answer within {}",
                        crate::status::human_duration(self.timeout)
                    ),
                    retry_after: None,
                })
            }
            Err(e) => {
                return Err(Failure::Retry {
                    message: format!("POST {url}: {}", describe(&e)),
                    retry_after: None,
                })
            }
        };
        let status = resp.status();
        if status.is_success() {
            // Read (a little of) the answer so the connection can be reused.
            let _ = excerpt(&mut resp).await;
            return Ok(());
        }
        let retry_after = resp
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| crate::apple::error::parse_retry_after(v, chrono::Utc::now()));
        let said = excerpt(&mut resp).await;
        let said = if said.is_empty() {
            String::new()
        } else {
            format!(": {said}")
        };
        let message = format!("POST {url} answered {status}{said}");
        match status.as_u16() {
            408 | 429 | 500..=599 => Err(Failure::Retry {
                message,
                retry_after,
            }),
            _ => Err(Failure::Refused { message }),
        }
    }
}

/// The start of a response body as one short line, for error messages.
async fn excerpt(resp: &mut reqwest::Response) -> String {
    const MAX: usize = 300;
    let mut buf = Vec::new();
    while buf.len() < MAX {
        match resp.chunk().await {
            Ok(Some(c)) => buf.extend_from_slice(&c),
            _ => break,
        }
    }
    let text = String::from_utf8_lossy(&buf[..buf.len().min(MAX)]);
    let line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if buf.len() > MAX {
        format!("{line}…")
    } else {
        line
    }
}

/// What went wrong in reqwest's words, without repeating the url the caller shows:
/// "cannot connect: Connection refused (os error 111)".
fn describe(e: &reqwest::Error) -> String {
    let mut causes = Vec::new();
    let mut cur = std::error::Error::source(e);
    while let Some(s) = cur {
        causes.push(s.to_string());
        cur = s.source();
    }
    match (e.is_connect(), causes.last()) {
        (true, Some(root)) => format!("cannot connect: {root}"),
        (false, Some(_)) => causes.join(": "),
        (_, None) => e.to_string(),
    }
}

/// An error and its causes on one line ("error sending request: … : connection refused").
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_match_an_independent_hmac() {
        // Computed with Python: hmac.new(b"k", b'1700000000.{"id":1}', sha256).hexdigest()
        assert_eq!(
            sign(b"k", 1_700_000_000, br#"{"id":1}"#),
            "v1=ad3973bf508a71757425fe6ed75d7e49f7d39052835acbd6cf430414a1a9814e"
        );
    }

    #[test]
    fn verification_rejects_changes_wrong_secrets_and_old_requests() {
        let body = br#"{"id":7}"#;
        let sig = sign(b"secret-secret-secret", 1000, body);
        let ok = |secret: &[u8], ts: &str, sig: &str, body: &[u8], now| {
            verify(secret, ts, sig, body, now, DEFAULT_TOLERANCE)
        };
        assert_eq!(
            ok(b"secret-secret-secret", "1000", &sig, body, 1100),
            Ok(())
        );
        // Several signatures (a receiver rotating secrets): any match is enough.
        let two = format!("v1=00ff, {sig}");
        assert_eq!(
            ok(b"secret-secret-secret", "1000", &two, body, 1000),
            Ok(())
        );
        assert_eq!(
            ok(b"secret-secret-secret", "1000", &sig, br#"{"id":8}"#, 1000),
            Err(VerifyError::Mismatch)
        );
        assert_eq!(
            ok(b"another-secret-xx", "1000", &sig, body, 1000),
            Err(VerifyError::Mismatch)
        );
        assert_eq!(
            ok(b"secret-secret-secret", "1001", &sig, body, 1000),
            Err(VerifyError::Mismatch),
            "the timestamp is signed too"
        );
        assert_eq!(
            ok(b"secret-secret-secret", "1000", &sig, body, 1000 + 301),
            Err(VerifyError::Stale(301))
        );
        assert_eq!(
            ok(b"secret-secret-secret", "soon", &sig, body, 1000),
            Err(VerifyError::BadTimestamp)
        );
    }
}
