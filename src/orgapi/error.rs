//! The organisation API's failures, parsed once into [`OrgApiError`]
//! (docs/apple-business-api.md §6).

use std::time::Duration;

use serde::Deserialize;

use super::assertion::KeyError;
use crate::model::{printable, ErrorKind};

/// Which call failed, for messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OrgEndpoint {
    /// `POST …/auth/oauth2/token`.
    Token,
    /// `GET /v1/orgDevices`.
    OrgDevices,
    /// `GET /v1/mdmServers`.
    MdmServers,
    /// `GET /v1/mdmServers/{id}/relationships/devices`.
    ServerDevices,
    /// `GET /v1/orgDevices/{id}/appleCareCoverage`.
    AppleCare,
}

impl OrgEndpoint {
    /// Method and path.
    pub fn describe(self) -> &'static str {
        match self {
            OrgEndpoint::Token => "POST /auth/oauth2/token",
            OrgEndpoint::OrgDevices => "GET /v1/orgDevices",
            OrgEndpoint::MdmServers => "GET /v1/mdmServers",
            OrgEndpoint::ServerDevices => "GET /v1/mdmServers/{id}/relationships/devices",
            OrgEndpoint::AppleCare => "GET /v1/orgDevices/{id}/appleCareCoverage",
        }
    }
}

/// Everything that can go wrong talking to the organisation API. No variant carries a
/// secret (no assertion, no access token).
#[derive(Debug, thiserror::Error)]
pub enum OrgApiError {
    /// The private key file.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// `invalid_client`: the assertion's key, key ID or client ID do not belong together.
    #[error("{}: Apple refused the API account (invalid_client{}): the key, key ID or client ID does not match this API account, or the account was deleted or its key revoked; in Apple Business/School Manager → Preferences → API, check the client ID and key ID shown for the account and that `private_key_file` is the key downloaded for it", OrgEndpoint::Token.describe(), detail_suffix(.0))]
    InvalidClient(String),
    /// `invalid_scope`: the account is not of the API its client ID says.
    #[error("{}: Apple refused the scope (invalid_scope{}): the account may not use this API; a BUSINESSAPI. client ID belongs to Apple Business Manager and a SCHOOLAPI. one to Apple School Manager — check `client_id`", OrgEndpoint::Token.describe(), detail_suffix(.0))]
    InvalidScope(String),
    /// `invalid_grant` / `invalid_request`: the assertion itself was refused.
    #[error("{}: Apple refused the client assertion ({code}{}); check that this machine's clock is right (the assertion carries the time), and if it persists that the key ID matches the key", OrgEndpoint::Token.describe(), detail_suffix(.detail))]
    AssertionRefused {
        /// Apple's `error`.
        code: String,
        /// Apple's `error_description`.
        detail: String,
    },
    /// 400 because access tokens were asked for too often.
    #[error("{}: Apple refused a new access token because they were asked for too often{}; the next run tries again", OrgEndpoint::Token.describe(), detail_suffix(.0))]
    TooManyTokenRequests(String),
    /// 401 even with a fresh access token.
    #[error("{}: Apple refused a freshly issued access token (401); the API account may have been deleted or disabled in Apple Business/School Manager → Preferences → API", .0.describe())]
    Unauthorized(OrgEndpoint),
    /// 403: the account lacks the permission.
    #[error("{endpoint}: Apple denied access (403{}); the API account may lack access to devices (Apple Business/School Manager → Preferences → API → the account's permissions), or the organisation's terms need accepting", detail_suffix(.detail), endpoint = .endpoint.describe())]
    Forbidden {
        /// Which call.
        endpoint: OrgEndpoint,
        /// Apple's detail.
        detail: String,
    },
    /// 429 or 503: slow down and retry.
    #[error("{endpoint}: Apple is rate limiting this API account ({status}){}", .retry_after.map(|d| format!(", Retry-After {}s", d.as_secs())).unwrap_or_default(), endpoint = .endpoint.describe())]
    Throttled {
        /// Which call.
        endpoint: OrgEndpoint,
        /// 429 or 503.
        status: u16,
        /// Apple's `Retry-After`.
        retry_after: Option<Duration>,
    },
    /// A cursor Apple no longer accepts (400 on a paged call with a cursor).
    #[error("{endpoint}: Apple refused the paging cursor (400{}); the walk starts over", detail_suffix(.detail), endpoint = .endpoint.describe())]
    CursorRefused {
        /// Which call.
        endpoint: OrgEndpoint,
        /// Apple's detail.
        detail: String,
    },
    /// 5xx.
    #[error("{endpoint}: Apple server error {status}{}", detail_suffix(.detail), endpoint = .endpoint.describe())]
    Server {
        /// Which call.
        endpoint: OrgEndpoint,
        /// Status.
        status: u16,
        /// Apple's detail.
        detail: String,
    },
    /// Any other status.
    #[error("{endpoint}: Apple answered {status}{}; this is not an answer adesync knows how to recover from — please report it", detail_suffix(.detail), endpoint = .endpoint.describe())]
    Http {
        /// Which call.
        endpoint: OrgEndpoint,
        /// Status.
        status: u16,
        /// Apple's detail.
        detail: String,
    },
    /// A 3xx, never followed.
    #[error("{endpoint}: the server answered {status}, a redirect to {location:?}; adesync never follows a redirect (it would carry the access token elsewhere) — check `api_url` and `token_url` of the account", endpoint = .endpoint.describe())]
    Redirected {
        /// Which call.
        endpoint: OrgEndpoint,
        /// Status.
        status: u16,
        /// Where it pointed (escaped).
        location: String,
    },
    /// The body exceeded `max_response_size`.
    #[error("{endpoint}: the response is larger than the {limit}-byte limit and was cut off; nothing was stored from it — check `api_url`, or raise `max_response_size`", endpoint = .endpoint.describe())]
    TooLarge {
        /// Which call.
        endpoint: OrgEndpoint,
        /// Bytes.
        limit: usize,
    },
    /// 2xx with a body that is not what Apple documents.
    #[error("{endpoint}: Apple's response could not be read ({detail}); nothing was stored from it and the next run tries again", endpoint = .endpoint.describe())]
    Malformed {
        /// Which call.
        endpoint: OrgEndpoint,
        /// What was wrong.
        detail: String,
    },
    /// Connect error, reset, TLS failure or timeout.
    #[error("{endpoint}: could not reach {url}: {detail}", endpoint = .endpoint.describe())]
    Transport {
        /// Which call.
        endpoint: OrgEndpoint,
        /// The host called.
        url: String,
        /// reqwest's description.
        detail: String,
        /// A timeout.
        timeout: bool,
    },
}

fn detail_suffix(detail: &str) -> String {
    if detail.is_empty() {
        String::new()
    } else {
        format!(": {detail}")
    }
}

impl OrgApiError {
    /// Whether trying again soon may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            OrgApiError::Throttled { .. }
                | OrgApiError::Server { .. }
                | OrgApiError::Transport { .. }
                | OrgApiError::Malformed { .. }
        )
    }

    /// A short stable name, shared with token errors.
    pub fn kind(&self) -> ErrorKind {
        match self {
            OrgApiError::Key(KeyError::Read { source, .. })
                if crate::token::is_resource_error(source) =>
            {
                ErrorKind::LocalResource
            }
            OrgApiError::Key(_) => ErrorKind::ApiKey,
            OrgApiError::InvalidClient(_)
            | OrgApiError::InvalidScope(_)
            | OrgApiError::Unauthorized(_) => ErrorKind::AccountRejected,
            OrgApiError::AssertionRefused { .. } => ErrorKind::AccountRejected,
            OrgApiError::TooManyTokenRequests(_) => ErrorKind::Throttled,
            OrgApiError::Forbidden { .. } => ErrorKind::AccessDenied,
            OrgApiError::Throttled { .. } => ErrorKind::Throttled,
            OrgApiError::CursorRefused { .. } => ErrorKind::Cursor,
            OrgApiError::Server { .. } => ErrorKind::Server,
            OrgApiError::Http { .. } | OrgApiError::Redirected { .. } => ErrorKind::Http,
            OrgApiError::TooLarge { .. } | OrgApiError::Malformed { .. } => {
                ErrorKind::MalformedBody
            }
            OrgApiError::Transport { timeout: true, .. } => ErrorKind::Timeout,
            OrgApiError::Transport { .. } => ErrorKind::Transport,
        }
    }
}

#[derive(Deserialize)]
struct OAuthErrorBody {
    error: Option<String>,
    error_description: Option<String>,
}

#[derive(Deserialize)]
struct JsonApiErrors {
    errors: Vec<JsonApiError>,
}

#[derive(Deserialize)]
struct JsonApiError {
    status: Option<String>,
    code: Option<String>,
    title: Option<String>,
    detail: Option<String>,
}

/// At most this much of Apple's text goes into a message.
const MAX_DETAIL: usize = 300;

fn short(text: &str) -> String {
    let t: String = text.trim().chars().take(MAX_DETAIL).collect();
    printable(&t).into_owned()
}

/// The token endpoint's error answer.
pub(super) fn classify_token_error(
    status: u16,
    body: &[u8],
    retry_after: Option<Duration>,
) -> OrgApiError {
    let parsed: Option<OAuthErrorBody> = serde_json::from_slice(body).ok();
    let (code, detail) = match parsed {
        Some(b) => (
            b.error.unwrap_or_default(),
            short(&b.error_description.unwrap_or_default()),
        ),
        None => (String::new(), short(&String::from_utf8_lossy(body))),
    };
    if status == 429 || status == 503 {
        return OrgApiError::Throttled {
            endpoint: OrgEndpoint::Token,
            status,
            retry_after,
        };
    }
    if status >= 500 {
        return OrgApiError::Server {
            endpoint: OrgEndpoint::Token,
            status,
            detail,
        };
    }
    let lower = detail.to_ascii_lowercase();
    match code.as_str() {
        "invalid_client" => OrgApiError::InvalidClient(detail),
        "invalid_scope" => OrgApiError::InvalidScope(detail),
        _ if lower.contains("too many") || lower.contains("rate") => {
            OrgApiError::TooManyTokenRequests(detail)
        }
        "invalid_grant" | "invalid_request" | "unauthorized_client" | "unsupported_grant_type" => {
            OrgApiError::AssertionRefused {
                code: short(&code),
                detail,
            }
        }
        _ if status == 401 => OrgApiError::InvalidClient(detail),
        _ => OrgApiError::Http {
            endpoint: OrgEndpoint::Token,
            status,
            detail: if code.is_empty() {
                detail
            } else {
                format!("{} {detail}", short(&code))
            },
        },
    }
}

/// A JSON:API error answer of an API call (not 401, which the client handles).
pub(super) fn classify(
    endpoint: OrgEndpoint,
    status: u16,
    body: &[u8],
    retry_after: Option<Duration>,
    had_cursor: bool,
) -> OrgApiError {
    let detail = match serde_json::from_slice::<JsonApiErrors>(body) {
        Ok(e) => e
            .errors
            .first()
            .map(|e| {
                let parts: Vec<&str> = [&e.status, &e.code, &e.title, &e.detail]
                    .into_iter()
                    .filter_map(|p| p.as_deref())
                    .filter(|p| !p.is_empty())
                    .skip(1) // the status, already in the message
                    .collect();
                short(&parts.join(" "))
            })
            .unwrap_or_default(),
        Err(_) => short(&String::from_utf8_lossy(body)),
    };
    match status {
        429 | 503 => OrgApiError::Throttled {
            endpoint,
            status,
            retry_after,
        },
        403 => OrgApiError::Forbidden { endpoint, detail },
        // Apple's wording for an expired or unknown cursor is not documented: any 400 to a
        // request that carried one is taken for it, and the list is read from its start.
        400 if had_cursor => OrgApiError::CursorRefused { endpoint, detail },
        s if s >= 500 => OrgApiError::Server {
            endpoint,
            status,
            detail,
        },
        _ => OrgApiError::Http {
            endpoint,
            status,
            detail,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_errors_say_what_to_check() {
        let e = classify_token_error(400, br#"{"error":"invalid_client"}"#, None);
        assert!(matches!(e, OrgApiError::InvalidClient(_)));
        assert!(
            e.to_string()
                .contains("the key, key ID or client ID does not match this API account"),
            "{e}"
        );
        assert!(e.kind().needs_admin());
        let e = classify_token_error(400, br#"{"error":"invalid_scope"}"#, None);
        assert!(e.to_string().contains("BUSINESSAPI."), "{e}");
        let e = classify_token_error(
            400,
            br#"{"error":"invalid_request","error_description":"too many token requests"}"#,
            None,
        );
        assert!(matches!(e, OrgApiError::TooManyTokenRequests(_)), "{e}");
        assert!(!e.kind().needs_admin());
        let e = classify_token_error(500, b"<html>\x1b[2J", None);
        assert!(e.is_retryable());
        assert!(!e.to_string().contains('\x1b'), "escaped: {e}");
    }

    #[test]
    fn api_errors_read_json_api_bodies() {
        let body = br#"{"errors":[{"id":"x","status":"403","code":"FORBIDDEN","title":"Forbidden","detail":"no access"}]}"#;
        let e = classify(OrgEndpoint::OrgDevices, 403, body, None, false);
        assert!(
            e.to_string().contains("FORBIDDEN Forbidden no access"),
            "{e}"
        );
        assert_eq!(e.kind(), ErrorKind::AccessDenied);
        let e = classify(
            OrgEndpoint::OrgDevices,
            429,
            b"",
            Some(Duration::from_secs(7)),
            true,
        );
        assert!(e.to_string().contains("Retry-After 7s"), "{e}");
        let body = br#"{"errors":[{"status":"400","code":"PARAMETER_ERROR.INVALID","detail":"invalid cursor"}]}"#;
        assert!(matches!(
            classify(OrgEndpoint::OrgDevices, 400, body, None, true),
            OrgApiError::CursorRefused { .. }
        ));
        assert!(matches!(
            classify(OrgEndpoint::OrgDevices, 400, body, None, false),
            OrgApiError::Http { .. }
        ));
        assert!(matches!(
            classify(OrgEndpoint::OrgDevices, 400, b"invalid value", None, true),
            OrgApiError::CursorRefused { .. }
        ));
    }
}
