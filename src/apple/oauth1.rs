//! OAuth 1.0a HMAC-SHA1 `Authorization` header for `GET /session` (docs/apple-dep-api.md §3.1).
//!
//! Signing is delegated to `oauth1-request`; this module adds what it lacks for Apple:
//! the `realm="ADM"` parameter (not part of the signature base string per RFC 5849 §3.4.1.3,
//! so it can be prepended after signing) and a guard against query strings, which that
//! crate does not accept in the URI (Apple's /session has none).

use crate::token::ServerToken;

/// The realm Apple's documentation and most clients send (docs/apple-dep-api.md §3.1). Optional for Apple.
pub const APPLE_REALM: &str = "ADM";

/// Builds the `Authorization` header value for a request without parameters.
///
/// `nonce` and `timestamp` are for tests; production passes `None` for both, and
/// oauth1-request draws a random nonce and takes the current time.
pub fn authorization_header(
    method: &str,
    url: &reqwest::Url,
    token: &ServerToken,
    realm: Option<&str>,
    nonce: Option<&str>,
    timestamp: Option<u64>,
) -> String {
    sign(method, url, token, realm, nonce, timestamp, &(), true)
}

#[allow(clippy::too_many_arguments)]
fn sign<R: oauth1_request::Request + ?Sized>(
    method: &str,
    url: &reqwest::Url,
    token: &ServerToken,
    realm: Option<&str>,
    nonce: Option<&str>,
    timestamp: Option<u64>,
    params: &R,
    version: bool,
) -> String {
    // oauth1-request panics on a URI with a query string; callers never build one,
    // and the config refuses an api_url with a query.
    let mut base = url.clone();
    base.set_query(None);
    base.set_fragment(None);
    let creds = oauth1_request::Token::from_parts(
        token.consumer_key.as_str(),
        token.consumer_secret.expose(),
        token.access_token.expose(),
        token.access_secret.expose(),
    );
    let mut builder = oauth1_request::Builder::with_token(creds, oauth1_request::HmacSha1::new());
    builder.nonce(nonce);
    builder.timestamp(timestamp.and_then(std::num::NonZeroU64::new));
    builder.version(version);
    let header = builder.authorize(method, base.as_str(), params);
    match realm {
        Some(r) => header.replacen("OAuth ", &format!("OAuth realm=\"{r}\",", r = r), 1),
        None => header,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::Secret;

    fn token(ck: &str, cs: &str, at: &str, as_: &str) -> ServerToken {
        ServerToken {
            consumer_key: ck.into(),
            consumer_secret: Secret::new(cs),
            access_token: Secret::new(at),
            access_secret: Secret::new(as_),
            access_token_expiry: chrono::Utc::now(),
        }
    }

    fn param<'a>(header: &'a str, name: &str) -> Option<&'a str> {
        header
            .trim_start_matches("OAuth ")
            .split(',')
            .filter_map(|kv| kv.trim().split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.trim_matches('"'))
    }

    /// The worked example of OAuth Core 1.0a Appendix A (the spec Apple links), whose
    /// signature base string is exactly RFC 5849 §3.4.1's.
    #[test]
    fn oauth_core_appendix_a_signature() {
        let t = token(
            "dpf43f3p2l4k3l03",
            "kd94hf93k423kf44",
            "nnch734d00sl2jdk",
            "pfkkdhi9sl3r4s00",
        );
        let url = reqwest::Url::parse("http://photos.example.net/photos").unwrap();
        let params =
            oauth1_request::ParameterList::new([("file", "vacation.jpg"), ("size", "original")]);
        let h = sign(
            "GET",
            &url,
            &t,
            Some("Photos"),
            Some("kllo9940pd9333jh"),
            Some(1191242096),
            &params,
            true,
        );
        assert_eq!(
            param(&h, "oauth_signature"),
            Some("tR3%2BTy81lMeYAr%2FFid0kMTYa%2FWM%3D"),
            "{h}"
        );
        assert_eq!(param(&h, "realm"), Some("Photos"));
        assert!(h.starts_with("OAuth realm=\"Photos\","), "{h}");
    }

    /// RFC 5849 §1.2's worked example (no oauth_version), verbatim.
    #[test]
    fn rfc5849_section_1_2_example() {
        let t = token(
            "dpf43f3p2l4k3l03",
            "kd94hf93k423kf44",
            "nnch734d00sl2jdk",
            "pfkkdhi9sl3r4s00",
        );
        let url = reqwest::Url::parse("http://photos.example.net/photos").unwrap();
        let params =
            oauth1_request::ParameterList::new([("file", "vacation.jpg"), ("size", "original")]);
        let h = sign(
            "GET",
            &url,
            &t,
            Some("Photos"),
            Some("chapoH"),
            Some(137131202),
            &params,
            false,
        );
        assert_eq!(
            param(&h, "oauth_signature"),
            Some("MdpQcU8iPSUjWoN%2FUDMsK2sui9I%3D"),
            "{h}"
        );
        assert!(param(&h, "oauth_version").is_none());
    }

    #[test]
    fn session_header_has_every_parameter_apple_lists() {
        let t = token("CK_1", "CS_1", "AT_1", "AS_1");
        let url = reqwest::Url::parse("http://127.0.0.1:8080/session").unwrap();
        let h = authorization_header("GET", &url, &t, Some(APPLE_REALM), None, None);
        for p in [
            "realm",
            "oauth_consumer_key",
            "oauth_token",
            "oauth_signature_method",
            "oauth_signature",
            "oauth_timestamp",
            "oauth_nonce",
            "oauth_version",
        ] {
            assert!(param(&h, p).is_some(), "{p} missing in {h}");
        }
        assert_eq!(param(&h, "oauth_signature_method"), Some("HMAC-SHA1"));
        assert_eq!(param(&h, "oauth_version"), Some("1.0"));
        assert!(!h.contains("CS_1") && !h.contains("AS_1"));
        // A new nonce each time.
        let h2 = authorization_header("GET", &url, &t, Some(APPLE_REALM), None, None);
        assert_ne!(param(&h, "oauth_nonce"), param(&h2, "oauth_nonce"));
    }
}
