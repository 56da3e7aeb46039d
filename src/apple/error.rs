//! Apple's error responses, parsed once into [`ApiError`].
//!
//! Apple answers errors with a bare token in the body (`EXPIRED_CURSOR`); Apple's own
//! simulator quotes it (`"EXPIRED_CURSOR"`) (docs/apple-dep-api.md §6.1). [`classify`] is the only place
//! that looks at status codes and bodies; everything else matches on the enum.

use std::time::Duration;

use crate::model::ErrorKind;

/// Which call failed, for messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `GET /session`.
    Session,
    /// `GET /account`.
    Account,
    /// `POST /server/devices`.
    FetchDevices,
    /// `POST /devices/sync`.
    SyncDevices,
    /// `GET /device/replacementDetails`.
    ReplacementDetails,
    /// `POST /profile`.
    DefineProfile,
    /// `POST /profile/devices`.
    AssignProfile,
}

impl Endpoint {
    /// Method and path, as Apple documents it.
    pub fn describe(self) -> &'static str {
        match self {
            Endpoint::Session => "GET /session",
            Endpoint::Account => "GET /account",
            Endpoint::FetchDevices => "POST /server/devices",
            Endpoint::SyncDevices => "POST /devices/sync",
            Endpoint::ReplacementDetails => "GET /device/replacementDetails",
            Endpoint::DefineProfile => "POST /profile",
            Endpoint::AssignProfile => "POST /profile/devices",
        }
    }
}

/// A cursor Apple would not accept (docs/apple-dep-api.md §5.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CursorError {
    /// The fetch already returned every device: switch to sync with the same cursor.
    Exhausted,
    /// Older than 7 days: full re-fetch.
    Expired,
    /// Malformed or unknown: full re-fetch.
    Invalid,
    /// Sync without a cursor: fetch first.
    Required,
}

/// Everything that can go wrong talking to Apple. No variant carries a secret.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A cursor error; the syncer decides what to do.
    #[error("{endpoint}: Apple rejected the cursor ({kind:?})", endpoint = .endpoint.describe())]
    Cursor {
        /// Which call.
        endpoint: Endpoint,
        /// Which error.
        kind: CursorError,
    },
    /// 403 T_C_NOT_SIGNED.
    #[error("{}: Apple refused the request because the organisation has not accepted the latest terms and conditions (403 T_C_NOT_SIGNED); an administrator must sign in to Apple Business/School Manager and accept them, then the next sync resumes", .0.describe())]
    TermsNotSigned(Endpoint),
    /// 403 ACCESS_DENIED.
    #[error("{}: Apple denied access for this server token (403 ACCESS_DENIED); check in Apple Business/School Manager that the MDM server still exists and the token is current, or download a new token", .0.describe())]
    AccessDenied(Endpoint),
    /// /session answered 401/403: the OAuth credentials are not accepted.
    #[error("GET /session: Apple rejected the server token ({status} {body}); the token was revoked, replaced by a newer download, or its server was deleted: download a new token in Apple Business/School Manager (Preferences → your MDM server → Download Token){hint}")]
    TokenRejected {
        /// HTTP status.
        status: u16,
        /// Apple's body token, trimmed.
        body: String,
        /// Extra hint (clock skew for signature/timestamp failures).
        hint: &'static str,
    },
    /// 401 again right after a fresh session.
    #[error("{}: Apple rejected a freshly issued session (401); this is unexpected — retry later, and if it persists download a new server token", .0.describe())]
    SessionRejected(Endpoint),
    /// 400 USER_AGENT_MISSING / USER_AGENT_INVALID.
    #[error("{endpoint}: Apple rejected the User-Agent ({body}); set `user_agent` in the config to a product-specific value such as \"adesync/1.0 (acme-it)\"", endpoint = .endpoint.describe())]
    UserAgent {
        /// Which call.
        endpoint: Endpoint,
        /// Apple's body token.
        body: String,
    },
    /// 429 or 503: back off and retry.
    #[error("{endpoint}: Apple is rate limiting or unavailable ({status}){}", .retry_after.map(|d| format!(", Retry-After {}s", d.as_secs())).unwrap_or_default(), endpoint = .endpoint.describe())]
    Throttled {
        /// Which call.
        endpoint: Endpoint,
        /// 429 or 503.
        status: u16,
        /// Apple's `Retry-After`, if given.
        retry_after: Option<Duration>,
    },
    /// Other 5xx: Apple-side failure, retried.
    #[error("{endpoint}: Apple server error {status} {body}", endpoint = .endpoint.describe())]
    Server {
        /// Which call.
        endpoint: Endpoint,
        /// HTTP status.
        status: u16,
        /// First part of the body.
        body: String,
    },
    /// A 3xx: never followed (Apple does not redirect this API).
    #[error("{endpoint}: the server answered {status}, a redirect to {location:?}; adesync never follows redirects (that would send the session to another host) — check `api_url` in the config: it must be Apple's https://mdmenrollment.apple.com or your simulator's address", endpoint = .endpoint.describe())]
    Redirected {
        /// Which call.
        endpoint: Endpoint,
        /// HTTP status.
        status: u16,
        /// Where it pointed (escaped).
        location: String,
    },
    /// The response body exceeded the configured limit.
    #[error("{endpoint}: the response is larger than the {limit}-byte limit and was cut off; nothing was stored from it. A page of 1,000 devices is about 400 KB, so this is not Apple's normal answer: check `api_url`, or raise `max_response_size` in the config if you must", endpoint = .endpoint.describe())]
    TooLarge {
        /// Which call.
        endpoint: Endpoint,
        /// The limit in bytes.
        limit: usize,
    },
    /// Any other non-success answer (e.g. 400 MALFORMED_REQUEST_BODY, 405).
    #[error("{endpoint}: Apple answered {status} {body}; this is not an error adesync knows how to recover from — please report it", endpoint = .endpoint.describe())]
    Http {
        /// Which call.
        endpoint: Endpoint,
        /// HTTP status.
        status: u16,
        /// First part of the body.
        body: String,
    },
    /// 2xx with a body that is not what Apple documents.
    #[error("{endpoint}: Apple's response could not be read ({detail}); retrying later usually helps, and nothing was stored from it", endpoint = .endpoint.describe())]
    MalformedBody {
        /// Which call.
        endpoint: Endpoint,
        /// What was wrong.
        detail: String,
    },
    /// Connect error, reset, TLS failure or timeout.
    #[error("{endpoint}: could not reach Apple at {url}: {detail}", endpoint = .endpoint.describe())]
    Transport {
        /// Which call.
        endpoint: Endpoint,
        /// The base URL.
        url: String,
        /// reqwest's description (never contains headers).
        detail: String,
        /// True for timeouts.
        timeout: bool,
    },
}

impl ApiError {
    /// Whether trying again soon may succeed (backoff inside the run).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ApiError::Throttled { .. }
                | ApiError::Server { .. }
                | ApiError::Transport { .. }
                | ApiError::MalformedBody { .. }
        )
    }

    /// Whether this error needs a person (token, terms, access) rather than time.
    pub fn needs_admin(&self) -> bool {
        self.kind().needs_admin()
    }

    /// The server's requested wait, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ApiError::Throttled { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// A short stable name for metrics and the stored last error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ApiError::Cursor { .. } => ErrorKind::Cursor,
            ApiError::TermsNotSigned(_) => ErrorKind::TermsNotSigned,
            ApiError::AccessDenied(_) => ErrorKind::AccessDenied,
            ApiError::TokenRejected { .. } => ErrorKind::TokenRejected,
            ApiError::SessionRejected(_) => ErrorKind::SessionRejected,
            ApiError::UserAgent { .. } => ErrorKind::UserAgent,
            ApiError::Throttled { .. } => ErrorKind::Throttled,
            ApiError::Server { .. } => ErrorKind::Server,
            ApiError::Http { .. } | ApiError::Redirected { .. } => ErrorKind::Http,
            ApiError::TooLarge { .. } => ErrorKind::MalformedBody,
            ApiError::MalformedBody { .. } => ErrorKind::MalformedBody,
            ApiError::Transport { timeout: true, .. } => ErrorKind::Timeout,
            ApiError::Transport { .. } => ErrorKind::Transport,
        }
    }
}

/// Apple's body token: trimmed, surrounding quotes (depsim style) removed, capped.
pub fn body_token(body: &str) -> String {
    let t = body.trim().trim_matches('"').trim();
    let mut s: String =
        crate::model::printable(&t.chars().take(200).collect::<String>()).into_owned();
    if t.chars().count() > 200 {
        s.push('…');
    }
    s
}

pub use crate::http_client::parse_retry_after;

/// Turns a non-success response into an [`ApiError`]. The one place that reads bodies.
pub fn classify(
    endpoint: Endpoint,
    status: u16,
    body: &str,
    retry_after: Option<Duration>,
) -> ApiError {
    let token = body_token(body);
    let has = |t: &str| token.contains(t);
    if status == 400 {
        let cursor = if has("EXHAUSTED_CURSOR") {
            Some(CursorError::Exhausted)
        } else if has("EXPIRED_CURSOR") {
            Some(CursorError::Expired)
        } else if has("INVALID_CURSOR") {
            Some(CursorError::Invalid)
        } else if has("CURSOR_REQUIRED") {
            Some(CursorError::Required)
        } else {
            None
        };
        if let Some(kind) = cursor {
            return ApiError::Cursor { endpoint, kind };
        }
        if has("USER_AGENT_") {
            return ApiError::UserAgent {
                endpoint,
                body: token,
            };
        }
    }
    if status == 403 && has("T_C_NOT_SIGNED") {
        return ApiError::TermsNotSigned(endpoint);
    }
    if status == 403 && has("ACCESS_DENIED") {
        return ApiError::AccessDenied(endpoint);
    }
    if endpoint == Endpoint::Session && (status == 401 || status == 403) {
        let lower = token.to_ascii_lowercase();
        let hint = if lower.contains("signature")
            || lower.contains("timestamp")
            || lower.contains("nonce")
        {
            "; if the token is new, check that this machine's clock is correct (OAuth signatures carry a timestamp)"
        } else {
            ""
        };
        return ApiError::TokenRejected {
            status,
            body: token,
            hint,
        };
    }
    if status == 429 || status == 503 {
        return ApiError::Throttled {
            endpoint,
            status,
            retry_after,
        };
    }
    if status >= 500 {
        return ApiError::Server {
            endpoint,
            status,
            body: token,
        };
    }
    ApiError::Http {
        endpoint,
        status,
        body: token,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_classified_bare_or_quoted() {
        let table: &[(u16, &str, &str)] = &[
            (400, "EXHAUSTED_CURSOR", "cursor"),
            (400, "\"EXPIRED_CURSOR\"\n", "cursor"),
            (400, "INVALID_CURSOR", "cursor"),
            (400, "CURSOR_REQUIRED", "cursor"),
            (400, "USER_AGENT_INVALID", "user_agent"),
            (400, "MALFORMED_REQUEST_BODY", "http"),
            (403, "T_C_NOT_SIGNED", "terms_not_signed"),
            (403, "\"ACCESS_DENIED\"", "access_denied"),
            (429, "TOO_MANY_REQUESTS", "throttled"),
            (503, "", "throttled"),
            (500, "Internal Server Error", "server"),
            (405, "", "http"),
        ];
        for (status, body, kind) in table {
            let e = classify(Endpoint::SyncDevices, *status, body, None);
            assert_eq!(e.kind().as_str(), *kind, "{status} {body}");
        }
        assert!(matches!(
            classify(Endpoint::SyncDevices, 400, "\"EXPIRED_CURSOR\"", None),
            ApiError::Cursor {
                kind: CursorError::Expired,
                ..
            }
        ));
        assert!(matches!(
            classify(Endpoint::FetchDevices, 400, "EXHAUSTED_CURSOR", None),
            ApiError::Cursor {
                kind: CursorError::Exhausted,
                ..
            }
        ));
    }

    #[test]
    fn session_auth_failures_say_to_download_a_new_token() {
        for (status, body) in [
            (401, "UNAUTHORIZED"),
            (403, "FORBIDDEN"),
            (401, "token_rejected"),
        ] {
            let e = classify(Endpoint::Session, status, body, None);
            assert_eq!(e.kind().as_str(), "token_rejected");
            assert!(e.to_string().contains("Download Token"), "{e}");
            assert!(e.needs_admin());
        }
        let e = classify(Endpoint::Session, 403, "T_C_NOT_SIGNED", None);
        assert!(e.to_string().contains("accept"), "{e}");
    }

    #[test]
    fn retryability() {
        assert!(classify(Endpoint::SyncDevices, 503, "", None).is_retryable());
        assert!(classify(Endpoint::SyncDevices, 502, "", None).is_retryable());
        assert!(!classify(Endpoint::SyncDevices, 403, "T_C_NOT_SIGNED", None).is_retryable());
        assert!(!classify(Endpoint::SyncDevices, 400, "EXPIRED_CURSOR", None).is_retryable());
    }

    #[test]
    fn retry_after_accepts_seconds_and_http_dates() {
        let now = chrono::DateTime::parse_from_rfc3339("2015-10-21T07:28:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:27:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
