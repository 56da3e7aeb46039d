//! The `webhook` sink: events POSTed as JSON and signed with HMAC-SHA256, so a receiver
//! can tell that a request comes from adesync, unaltered and recent.
//!
//! Two signature schemes (`signature`; the README shows how to verify each):
//!
//! ```text
//! standard-webhooks (the default, https://www.standardwebhooks.com):
//! webhook-id: evt_<first event id>_<last event id>
//! webhook-timestamp: <unix time in seconds when the request was signed>
//! webhook-signature: v1,<base64 of HMAC-SHA256(key, "<id>.<timestamp>.<body>")> [v1,… per further key]
//!
//! adesync-v1 (earlier versions' scheme, for receivers that check it):
//! X-Adesync-Timestamp: <unix time in seconds when the request was signed>
//! X-Adesync-Signature: v1=<lowercase hex of HMAC-SHA256(key, "<timestamp>.<body>")>[,v1=… per further key]
//! ```
//!
//! With several secrets (`secret_files`, newest first) every request carries one
//! signature per key, so a receiver knowing any of them accepts it while it switches.
//! The receiver recomputes the HMAC over the raw body bytes, compares in constant time,
//! and rejects a timestamp further than its window (5 minutes) from its own clock, so a
//! captured request cannot be replayed later. A retry is signed afresh; its body, and so
//! its event ids and `webhook-id`, are those of the first attempt.
//!
//! Answers: 2xx = delivered; 408, 429, 5xx, network errors and timeouts are retried
//! (honouring `Retry-After`); any other status is a refusal that parks the sink (410 Gone
//! with its own explanation: the receiver has dropped the endpoint).

use std::time::Duration;

use base64::Engine;
use hmac::{Hmac, Mac};
use reqwest::header::{CONTENT_TYPE, RETRY_AFTER};
use sha2::Sha256;

use super::Failure;
use crate::config::{EventFormat, SignatureScheme, WebhookConfig, WebhookSecret};

/// Standard Webhooks: the request's id, the same for every attempt of a batch.
pub const WEBHOOK_ID: &str = "webhook-id";
/// Standard Webhooks: the signing time (unix seconds).
pub const WEBHOOK_TIMESTAMP: &str = "webhook-timestamp";
/// Standard Webhooks: the signatures, `v1,<base64>`, space-separated.
pub const WEBHOOK_SIGNATURE: &str = "webhook-signature";
/// adesync-v1: the signing time (unix seconds).
pub const TIMESTAMP_HEADER: &str = "X-Adesync-Timestamp";
/// adesync-v1: the signatures, `v1=<hex>`, comma-separated.
pub const SIGNATURE_HEADER: &str = "X-Adesync-Signature";
/// The replay window receivers are advised to use.
pub const DEFAULT_TOLERANCE: Duration = Duration::from_secs(300);

type HmacSha256 = Hmac<Sha256>;

fn mac(secret: &[u8], parts: &[&[u8]]) -> HmacSha256 {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            mac.update(b".");
        }
        mac.update(part);
    }
    mac
}

/// The `X-Adesync-Signature` value (adesync-v1) for `body` signed at `timestamp`.
pub fn sign(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let tag = mac(secret, &[timestamp.to_string().as_bytes(), body])
        .finalize()
        .into_bytes();
    let mut out = String::with_capacity(3 + tag.len() * 2);
    out.push_str("v1=");
    for b in tag {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// One Standard Webhooks signature, `v1,<base64>`, of `body` sent as `msg_id` at
/// `timestamp` (unix seconds), keyed with `key` (the decoded secret).
pub fn sign_standard(key: &[u8], msg_id: &str, timestamp: i64, body: &[u8]) -> String {
    let tag = mac(
        key,
        &[msg_id.as_bytes(), timestamp.to_string().as_bytes(), body],
    )
    .finalize()
    .into_bytes();
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(tag)
    )
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
    let expected = mac(secret, &[timestamp.trim().as_bytes(), body]);
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
    sink: String,
    url: reqwest::Url,
    secrets: Vec<WebhookSecret>,
    signature: SignatureScheme,
    format: EventFormat,
    max_batch: usize,
    timeout: Duration,
}

impl WebhookClient {
    pub(super) fn new(
        sink: &str,
        cfg: &WebhookConfig,
        format: EventFormat,
    ) -> Result<Self, Failure> {
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
            sink: sink.to_owned(),
            url: cfg.url.clone(),
            secrets: cfg.secrets.clone(),
            signature: cfg.signature,
            format,
            max_batch: cfg.max_batch,
            timeout: cfg.timeout,
        })
    }

    pub(super) fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// One event when `max_batch` is 1, else a JSON array: the body's shape depends
    /// only on the configuration, never on how many events happen to be pending.
    fn single(&self, events: &[Vec<u8>]) -> bool {
        self.max_batch == 1 && events.len() == 1
    }

    fn body(&self, events: &[Vec<u8>]) -> Vec<u8> {
        if self.single(events) {
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

    fn content_type(&self, events: &[Vec<u8>]) -> &'static str {
        match (self.format, self.single(events)) {
            (EventFormat::Adesync, _) => "application/json",
            (EventFormat::CloudEvents, true) => "application/cloudevents+json",
            (EventFormat::CloudEvents, false) => "application/cloudevents-batch+json",
        }
    }

    /// The signature headers for `body` sent as `msg_id`, signed now.
    fn signature_headers(&self, msg_id: &str, body: &[u8]) -> Vec<(&'static str, String)> {
        let ts = chrono::Utc::now().timestamp();
        match self.signature {
            SignatureScheme::StandardWebhooks => {
                let signatures: Vec<String> = self
                    .secrets
                    .iter()
                    .map(|k| sign_standard(k.expose(), msg_id, ts, body))
                    .collect();
                vec![
                    (WEBHOOK_ID, msg_id.to_owned()),
                    (WEBHOOK_TIMESTAMP, ts.to_string()),
                    (WEBHOOK_SIGNATURE, signatures.join(" ")),
                ]
            }
            SignatureScheme::AdesyncV1 => {
                let signatures: Vec<String> = self
                    .secrets
                    .iter()
                    .map(|k| sign(k.expose(), ts, body))
                    .collect();
                vec![
                    (TIMESTAMP_HEADER, ts.to_string()),
                    (SIGNATURE_HEADER, signatures.join(",")),
                ]
            }
        }
    }

    /// POSTs one batch. `msg_id` names it (Standard Webhooks' `webhook-id`): the same
    /// for every attempt of the same events.
    pub(super) async fn send(&self, msg_id: &str, events: &[Vec<u8>]) -> Result<(), Failure> {
        let body = self.body(events);
        let url = self.url.as_str();
        let mut request = self
            .http
            .post(self.url.clone())
            .header(CONTENT_TYPE, self.content_type(events));
        for (name, value) in self.signature_headers(msg_id, &body) {
            request = request.header(name, value);
        }
        let resp = request.body(body).send().await;
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
            // Standard Webhooks: the receiver no longer wants these requests here.
            410 => Err(Failure::Refused {
                message: format!(
                    "{message}; the receiver says this endpoint is gone: fix the sink's url (the receiver's new address), then run `adesync sinks resume {}`",
                    self.sink
                ),
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
    fn standard_signatures_match_the_specifications_example() {
        // The Standard Webhooks libraries' own test vector.
        let key = base64::engine::general_purpose::STANDARD
            .decode("C2FVsBQIhrscChlQIMV+b5sSYspob7oD")
            .unwrap();
        assert_eq!(
            sign_standard(
                &key,
                "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
                1649367553,
                br#"{"email":"test@example.com","username":"test_user"}"#
            ),
            "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw="
        );
    }

    #[test]
    fn standard_signatures_verify_with_the_reference_library() {
        let body = br#"{"id":7}"#;
        let (new, old) = (
            b"new-secret-new-secret-24b".to_vec(),
            b"old-secret-old-secret-24b".to_vec(),
        );
        let ts = chrono::Utc::now().timestamp();
        let header = [&new, &old]
            .iter()
            .map(|k| sign_standard(k, "evt_7_7", ts, body))
            .collect::<Vec<_>>()
            .join(" ");
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(WEBHOOK_ID, "evt_7_7".parse().unwrap());
        headers.insert(WEBHOOK_TIMESTAMP, ts.to_string().parse().unwrap());
        headers.insert(WEBHOOK_SIGNATURE, header.parse().unwrap());
        for key in [new, old] {
            let wh = standardwebhooks::Webhook::from_bytes(key).unwrap();
            wh.verify(body, &headers).unwrap();
            assert!(wh.verify(br#"{"id":8}"#, &headers).is_err());
        }
        let stranger = standardwebhooks::Webhook::from_bytes(b"another-key".to_vec()).unwrap();
        assert!(stranger.verify(body, &headers).is_err());
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
