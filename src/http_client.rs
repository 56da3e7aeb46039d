//! The HTTP client setup shared by the Apple clients and the webhook sink, and the one way
//! the Apple clients read an answer ([`exchange`]: no redirect, a capped body).
//!
//! Every client in the process uses one TLS configuration. Building one parses the
//! system's root certificates, which takes OpenSSL 3 tens of milliseconds (the larger part
//! of a no-op sync's CPU, BENCHMARKS.md); a service provider's run over many tokens, or a
//! daemon's runs, would otherwise pay that for every token and every run.

use std::sync::OnceLock;

/// A `reqwest` client builder that uses the process-wide TLS configuration (system roots,
/// HTTP/2 or HTTP/1.1 by ALPN, as reqwest's own default would). If that configuration
/// cannot be built, the builder is returned as is and reqwest reports the error when the
/// client is built.
pub fn builder() -> reqwest::ClientBuilder {
    match shared_tls() {
        Some(tls) => reqwest::Client::builder().tls_backend_preconfigured(tls.clone()),
        None => reqwest::Client::builder(),
    }
}

/// An answer read whole: status, headers and a body within the caller's limit.
pub struct Exchange {
    /// HTTP status.
    pub status: u16,
    /// Response headers.
    pub headers: reqwest::header::HeaderMap,
    /// The body.
    pub body: bytes::Bytes,
}

/// Why [`exchange`] gave up.
pub enum ExchangeError {
    /// The request or the transfer failed.
    Transport(reqwest::Error),
    /// A 3xx: never followed (clients are built without redirects). `location` is the
    /// header as sent, not yet escaped.
    Redirected {
        /// HTTP status.
        status: u16,
        /// The `Location` header.
        location: String,
    },
    /// The body is larger than the limit (declared or as it arrived).
    TooLarge,
}

/// Sends `request` and reads its answer, refusing a redirect and stopping as soon as the
/// body exceeds `limit` bytes: a body without an end, or a huge one, must not take the
/// process's memory. The one way every client of the process reads a server's answer.
pub async fn exchange(
    request: reqwest::RequestBuilder,
    limit: usize,
) -> Result<Exchange, ExchangeError> {
    let mut resp = request.send().await.map_err(ExchangeError::Transport)?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    if resp.status().is_redirection() {
        let location = headers
            .get(reqwest::header::LOCATION)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default();
        return Err(ExchangeError::Redirected { status, location });
    }
    if resp.content_length().is_some_and(|n| n > limit as u64) {
        return Err(ExchangeError::TooLarge);
    }
    let mut body = bytes::BytesMut::with_capacity(resp.content_length().unwrap_or(0) as usize);
    while let Some(chunk) = resp.chunk().await.map_err(ExchangeError::Transport)? {
        if body.len() + chunk.len() > limit {
            return Err(ExchangeError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Exchange {
        status,
        headers,
        body: body.freeze(),
    })
}

/// reqwest's error with its causes, without the URL's query or any header.
pub fn describe_reqwest(e: &reqwest::Error) -> String {
    use std::error::Error;
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    s
}

/// Parses a `Retry-After` value: delta-seconds or an HTTP-date (RFC 9110 §10.2.3; docs/apple-dep-api.md §6.3).
pub fn parse_retry_after(
    value: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> Option<std::time::Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(std::time::Duration::from_secs(secs));
    }
    let when = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    let delta = when.with_timezone(&chrono::Utc) - now;
    Some(delta.to_std().unwrap_or(std::time::Duration::ZERO))
}

/// The `Retry-After` of a response, if it has a readable one.
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<std::time::Duration> {
    headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, chrono::Utc::now()))
}

fn shared_tls() -> &'static Option<native_tls::TlsConnector> {
    static TLS: OnceLock<Option<native_tls::TlsConnector>> = OnceLock::new();
    TLS.get_or_init(|| {
        native_tls::TlsConnector::builder()
            .request_alpns(&["h2", "http/1.1"])
            .build()
            .ok()
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn clients_build_with_the_shared_tls_configuration() {
        // The first call builds the configuration from the system's roots, later calls
        // reuse it; both give working clients.
        assert!(super::builder().build().is_ok());
        assert!(super::builder().build().is_ok());
        assert!(
            super::shared_tls().is_some(),
            "the system TLS configuration failed to build"
        );
    }
}
