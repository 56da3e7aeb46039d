//! Verification of the OAuth 1.0a HMAC-SHA1 signature on `GET /session` (RFC 5849, docs/apple-dep-api.md §3.1),
//! with the status codes Apple documents: malformed, missing, duplicated or unsupported
//! parameters are `400`; wrong credentials, a bad signature, a stale timestamp or a reused
//! nonce are `401`. The signature check is pure; [`Verifier`] adds the nonce memory.

use std::collections::BTreeSet;
use std::time::Duration;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use sha1::Sha1;

use crate::config::Credentials;

/// Everything but RFC 3986 unreserved characters is encoded (RFC 5849 §3.6).
const OAUTH_ENCODE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Parameters a signed request must carry (Apple requires the token; `oauth_version` is optional).
const REQUIRED: [&str; 6] = [
    "oauth_consumer_key",
    "oauth_token",
    "oauth_signature_method",
    "oauth_signature",
    "oauth_timestamp",
    "oauth_nonce",
];

/// Why a `GET /session` was refused; the reason is for logs, never for the response body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum OAuthError {
    /// `400`: the request is not a well-formed OAuth 1.0a HMAC-SHA1 request.
    BadRequest(&'static str),
    /// `401`: well-formed, but not signed by the accepted credentials, or replayed.
    Unauthorized(&'static str),
}

/// The parts of an HTTP request the signature covers.
pub(crate) struct SignedRequest<'a> {
    /// HTTP method, upper case.
    pub method: &'a str,
    /// Scheme, authority and path, as in RFC 5849 §3.4.1.2 (`http://127.0.0.1:8080/session`).
    pub base_uri: &'a str,
    /// The raw query string, if any; its parameters are signed too.
    pub query: Option<&'a str>,
    /// The `Authorization` header value, if any.
    pub authorization: Option<&'a str>,
}

/// Builds the RFC 5849 §3.4.1.2 base string URI from a `Host` header value and a path: scheme
/// and host lower-cased, the default port dropped.
pub(crate) fn base_uri(host: &str, path: &str) -> String {
    let host = host.to_ascii_lowercase();
    let host = host.strip_suffix(":80").unwrap_or(&host);
    format!("http://{host}{path}")
}

/// Percent-encodes per RFC 5849 §3.6.
fn encode(s: &str) -> String {
    utf8_percent_encode(s, OAUTH_ENCODE).to_string()
}

/// Percent-decodes; `None` if the bytes are not UTF-8.
fn decode(s: &str) -> Option<String> {
    percent_decode_str(s)
        .decode_utf8()
        .ok()
        .map(|c| c.into_owned())
}

/// Splits `OAuth k="v", k2="v2"` into decoded pairs, in order, duplicates kept.
fn parse_authorization(value: &str) -> Result<Vec<(String, String)>, OAuthError> {
    const MALFORMED: OAuthError = OAuthError::BadRequest("malformed Authorization header");
    let value = value.trim();
    let (scheme, mut rest) = value
        .split_once(|c: char| c.is_ascii_whitespace())
        .ok_or(MALFORMED)?;
    if !scheme.eq_ignore_ascii_case("OAuth") {
        return Err(OAuthError::BadRequest("Authorization scheme is not OAuth"));
    }
    let mut pairs = Vec::new();
    loop {
        rest = rest.trim_start_matches(|c: char| c == ',' || c.is_ascii_whitespace());
        if rest.is_empty() {
            break;
        }
        let (name, after) = rest.split_once('=').ok_or(MALFORMED)?;
        let after = after.trim_start();
        let (raw, after) = match after.strip_prefix('"') {
            Some(quoted) => {
                let end = quoted.find('"').ok_or(MALFORMED)?;
                (&quoted[..end], &quoted[end + 1..])
            }
            // RFC 5849 wants quotes; accepting a bare token costs nothing.
            None => {
                let end = after.find(',').unwrap_or(after.len());
                (after[..end].trim_end(), &after[end..])
            }
        };
        rest = after.trim_start();
        if !(rest.is_empty() || rest.starts_with(',')) {
            return Err(MALFORMED);
        }
        let name = decode(name.trim()).ok_or(MALFORMED)?;
        let value = decode(raw).ok_or(MALFORMED)?;
        pairs.push((name, value));
    }
    Ok(pairs)
}

/// Decodes an `application/x-www-form-urlencoded` query (RFC 5849 §3.4.1.3.1).
fn query_pairs(query: &str) -> Option<Vec<(String, String)>> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            Some((decode(&k.replace('+', " "))?, decode(&v.replace('+', " "))?))
        })
        .collect()
}

/// The signature base string (RFC 5849 §3.4.1): `METHOD&pct(base uri)&pct(normalised params)`,
/// where `params` excludes `realm` and `oauth_signature`.
pub(crate) fn signature_base_string(
    method: &str,
    base_uri: &str,
    params: &[(String, String)],
) -> String {
    let mut encoded: Vec<(String, String)> =
        params.iter().map(|(k, v)| (encode(k), encode(v))).collect();
    encoded.sort();
    let normalised = encoded
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    format!(
        "{}&{}&{}",
        method.to_ascii_uppercase(),
        encode(base_uri),
        encode(&normalised)
    )
}

fn hmac_key(creds: &Credentials) -> Hmac<Sha1> {
    let key = format!(
        "{}&{}",
        encode(&creds.consumer_secret),
        encode(&creds.access_secret)
    );
    Hmac::<Sha1>::new_from_slice(key.as_bytes()).expect("HMAC accepts keys of any length")
}

/// The parameters of a request that passed [`check_signature`].
pub(crate) struct Verified {
    /// `oauth_timestamp`, seconds since the epoch.
    pub timestamp: u64,
    /// `oauth_nonce`.
    pub nonce: String,
}

/// Checks shape, credentials and signature; no clock, no memory.
pub(crate) fn check_signature(
    req: &SignedRequest<'_>,
    creds: &Credentials,
) -> Result<Verified, OAuthError> {
    let header = req
        .authorization
        .ok_or(OAuthError::BadRequest("no Authorization header"))?;
    let mut signed: Vec<(String, String)> = Vec::new();
    let mut seen = BTreeSet::new();
    let mut signature = None;
    for (name, value) in parse_authorization(header)? {
        if !seen.insert(name.clone()) {
            return Err(OAuthError::BadRequest("duplicated OAuth parameter"));
        }
        match name.as_str() {
            // The realm is allowed and, per RFC 5849 §3.4.1.3.1, not signed.
            "realm" => {}
            "oauth_signature" => signature = Some(value),
            n if REQUIRED.contains(&n) || n == "oauth_version" => signed.push((name, value)),
            _ => return Err(OAuthError::BadRequest("unsupported OAuth parameter")),
        }
    }
    if let Some(missing) = REQUIRED.iter().find(|p| !seen.contains(**p)) {
        tracing::debug!(parameter = missing, "OAuth parameter missing");
        return Err(OAuthError::BadRequest("missing OAuth parameter"));
    }
    let get = |name: &str| {
        signed
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    if get("oauth_signature_method") != Some("HMAC-SHA1") {
        return Err(OAuthError::BadRequest("unsupported signature method"));
    }
    if get("oauth_version").is_some_and(|v| v != "1.0") {
        return Err(OAuthError::BadRequest("unsupported OAuth version"));
    }
    let timestamp: u64 = get("oauth_timestamp")
        .and_then(|t| t.parse().ok())
        .ok_or(OAuthError::BadRequest("oauth_timestamp is not a number"))?;
    let nonce = get("oauth_nonce").unwrap_or_default().to_owned();
    if get("oauth_consumer_key") != Some(creds.consumer_key.as_str()) {
        return Err(OAuthError::Unauthorized("unknown consumer key"));
    }
    if get("oauth_token") != Some(creds.access_token.as_str()) {
        return Err(OAuthError::Unauthorized("unknown token"));
    }
    if let Some(q) = req.query {
        signed.extend(query_pairs(q).ok_or(OAuthError::BadRequest("malformed query"))?);
    }
    let base = signature_base_string(req.method, req.base_uri, &signed);
    let provided = base64::engine::general_purpose::STANDARD
        .decode(signature.unwrap_or_default())
        .map_err(|_| OAuthError::Unauthorized("signature is not base64"))?;
    let mut mac = hmac_key(creds);
    mac.update(base.as_bytes());
    // Constant-time comparison.
    mac.verify_slice(&provided)
        .map_err(|_| OAuthError::Unauthorized("invalid signature"))?;
    Ok(Verified { timestamp, nonce })
}

/// Checks signed requests and remembers nonces so none is accepted twice.
pub(crate) struct Verifier {
    window: Duration,
    /// `(timestamp, nonce)` of accepted requests still inside the window; older ones can
    /// be forgotten because their timestamp alone now fails the check.
    seen: BTreeSet<(u64, String)>,
}

impl Verifier {
    /// A verifier accepting timestamps within `window` of the clock passed to [`Self::verify`].
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            seen: BTreeSet::new(),
        }
    }

    /// Full check of one request against `creds` at wall-clock time `now_unix` (seconds).
    pub fn verify(
        &mut self,
        req: &SignedRequest<'_>,
        creds: &Credentials,
        now_unix: u64,
    ) -> Result<(), OAuthError> {
        let v = check_signature(req, creds)?;
        let window = self.window.as_secs();
        if v.timestamp.abs_diff(now_unix) > window {
            return Err(OAuthError::Unauthorized("timestamp outside the window"));
        }
        let cutoff = now_unix.saturating_sub(window);
        self.seen = self.seen.split_off(&(cutoff, String::new()));
        if !self.seen.insert((v.timestamp, v.nonce)) {
            return Err(OAuthError::Unauthorized("nonce already used"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The photo-sharing example of oauth.net Core 1.0 Appendix A, whose signature every OAuth
    /// library is tested against.
    fn photos_creds() -> Credentials {
        Credentials {
            consumer_key: "dpf43f3p2l4k3l03".into(),
            consumer_secret: "kd94hf93k423kf44".into(),
            access_token: "nnch734d00sl2jdk".into(),
            access_secret: "pfkkdhi9sl3r4s00".into(),
        }
    }

    const PHOTOS_HEADER: &str = "OAuth realm=\"http://photos.example.net/\", \
        oauth_consumer_key=\"dpf43f3p2l4k3l03\", oauth_token=\"nnch734d00sl2jdk\", \
        oauth_signature_method=\"HMAC-SHA1\", oauth_signature=\"tR3%2BTy81lMeYAr%2FFid0kMTYa%2FWM%3D\", \
        oauth_timestamp=\"1191242096\", oauth_nonce=\"kllo9940pd9333jh\", oauth_version=\"1.0\"";

    fn photos_request(header: &str) -> SignedRequest<'_> {
        SignedRequest {
            method: "GET",
            base_uri: "http://photos.example.net/photos",
            query: Some("file=vacation.jpg&size=original"),
            authorization: Some(header),
        }
    }

    #[test]
    fn base_string_matches_the_published_example() {
        let params: Vec<(String, String)> = [
            ("oauth_consumer_key", "dpf43f3p2l4k3l03"),
            ("oauth_token", "nnch734d00sl2jdk"),
            ("oauth_signature_method", "HMAC-SHA1"),
            ("oauth_timestamp", "1191242096"),
            ("oauth_nonce", "kllo9940pd9333jh"),
            ("oauth_version", "1.0"),
            ("file", "vacation.jpg"),
            ("size", "original"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(
            signature_base_string("GET", "http://photos.example.net/photos", &params),
            "GET&http%3A%2F%2Fphotos.example.net%2Fphotos&file%3Dvacation.jpg%26\
             oauth_consumer_key%3Ddpf43f3p2l4k3l03%26oauth_nonce%3Dkllo9940pd9333jh%26\
             oauth_signature_method%3DHMAC-SHA1%26oauth_timestamp%3D1191242096%26\
             oauth_token%3Dnnch734d00sl2jdk%26oauth_version%3D1.0%26size%3Doriginal"
        );
    }

    #[test]
    fn a_correctly_signed_request_passes() {
        let mut v = Verifier::new(Duration::from_secs(300));
        assert_eq!(
            v.verify(&photos_request(PHOTOS_HEADER), &photos_creds(), 1191242096),
            Ok(())
        );
    }

    #[test]
    fn the_rfc5849_worked_example_passes() {
        // RFC 5849 §1.2: no oauth_version, realm "Photos".
        let header = "OAuth realm=\"Photos\", oauth_consumer_key=\"dpf43f3p2l4k3l03\", \
            oauth_token=\"nnch734d00sl2jdk\", oauth_signature_method=\"HMAC-SHA1\", \
            oauth_timestamp=\"137131202\", oauth_nonce=\"chapoH\", \
            oauth_signature=\"MdpQcU8iPSUjWoN%2FUDMsK2sui9I%3D\"";
        let mut v = Verifier::new(Duration::from_secs(300));
        assert_eq!(
            v.verify(&photos_request(header), &photos_creds(), 137131202),
            Ok(())
        );
    }

    #[test]
    fn a_tampered_request_fails_with_401() {
        let mut v = Verifier::new(Duration::from_secs(300));
        let creds = photos_creds();
        // Another nonce than the one signed.
        let header = PHOTOS_HEADER.replace("kllo9940pd9333jh", "kllo9940pd9333ji");
        assert!(matches!(
            v.verify(&photos_request(&header), &creds, 1191242096),
            Err(OAuthError::Unauthorized(_))
        ));
        // Another query than the one signed.
        let mut req = photos_request(PHOTOS_HEADER);
        req.query = Some("file=vacation.jpg&size=small");
        assert!(matches!(
            v.verify(&req, &creds, 1191242096),
            Err(OAuthError::Unauthorized(_))
        ));
        // Another host than the one signed.
        let mut req = photos_request(PHOTOS_HEADER);
        req.base_uri = "http://photos.example.net:8080/photos";
        assert!(matches!(
            v.verify(&req, &creds, 1191242096),
            Err(OAuthError::Unauthorized(_))
        ));
        // Right signature, wrong secret on our side.
        let wrong = Credentials {
            access_secret: "nope".into(),
            ..photos_creds()
        };
        assert!(matches!(
            v.verify(&photos_request(PHOTOS_HEADER), &wrong, 1191242096),
            Err(OAuthError::Unauthorized(_))
        ));
    }

    #[test]
    fn a_replayed_nonce_fails_with_401() {
        let mut v = Verifier::new(Duration::from_secs(300));
        let creds = photos_creds();
        assert!(v
            .verify(&photos_request(PHOTOS_HEADER), &creds, 1191242096)
            .is_ok());
        assert_eq!(
            v.verify(&photos_request(PHOTOS_HEADER), &creds, 1191242100),
            Err(OAuthError::Unauthorized("nonce already used"))
        );
    }

    #[test]
    fn a_stale_timestamp_fails_with_401() {
        let mut v = Verifier::new(Duration::from_secs(300));
        assert_eq!(
            v.verify(
                &photos_request(PHOTOS_HEADER),
                &photos_creds(),
                1191242096 + 301
            ),
            Err(OAuthError::Unauthorized("timestamp outside the window"))
        );
    }

    #[test]
    fn missing_duplicated_or_unsupported_parameters_fail_with_400() {
        let creds = photos_creds();
        let cases = [
            PHOTOS_HEADER.replace("oauth_nonce=\"kllo9940pd9333jh\", ", ""),
            PHOTOS_HEADER.replace(
                "oauth_version=\"1.0\"",
                "oauth_version=\"1.0\", oauth_nonce=\"x\"",
            ),
            PHOTOS_HEADER.replace("HMAC-SHA1", "PLAINTEXT"),
            PHOTOS_HEADER.replace("oauth_version=\"1.0\"", "oauth_version=\"2.0\""),
            format!("{PHOTOS_HEADER}, oauth_callback=\"oob\""),
            PHOTOS_HEADER.replace("OAuth ", "Bearer "),
            PHOTOS_HEADER.replace("\"1191242096\"", "\"yesterday\""),
            "OAuth oauth_token=\"unterminated".into(),
        ];
        for header in &cases {
            let mut v = Verifier::new(Duration::from_secs(300));
            assert!(
                matches!(
                    v.verify(&photos_request(header), &creds, 1191242096),
                    Err(OAuthError::BadRequest(_))
                ),
                "{header}"
            );
        }
        let mut v = Verifier::new(Duration::from_secs(300));
        let mut req = photos_request(PHOTOS_HEADER);
        req.authorization = None;
        assert!(matches!(
            v.verify(&req, &creds, 1191242096),
            Err(OAuthError::BadRequest(_))
        ));
    }

    #[test]
    fn a_wrong_consumer_key_or_token_fails_with_401() {
        let mut v = Verifier::new(Duration::from_secs(300));
        for header in [
            PHOTOS_HEADER.replace("dpf43f3p2l4k3l03", "someone-else"),
            PHOTOS_HEADER.replace("nnch734d00sl2jdk", "someone-else"),
        ] {
            assert!(matches!(
                v.verify(&photos_request(&header), &photos_creds(), 1191242096),
                Err(OAuthError::Unauthorized(_))
            ));
        }
    }

    #[test]
    fn base_uri_lowercases_the_host_and_drops_port_80() {
        assert_eq!(
            base_uri("LocalHost:8080", "/session"),
            "http://localhost:8080/session"
        );
        assert_eq!(
            base_uri("127.0.0.1:80", "/session"),
            "http://127.0.0.1/session"
        );
    }
}
