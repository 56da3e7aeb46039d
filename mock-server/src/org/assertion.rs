//! The client assertion of the OAuth 2 client-credentials grant (RFC 7523): a JWT signed
//! with ES256 by the account's P-256 key. Checked as Apple documents it: header `alg`
//! `ES256` and `kid` the account's key id; a JWS signature (raw 64-byte `r || s`, not DER)
//! over `header.payload`; claims `iss` = `sub` = client id, `aud` exactly
//! [`AUDIENCE`], `iat` not in the future (60 s leeway), `exp` in the future and at most 180
//! days after `iat`, and a `jti` (whose reuse the caller checks).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use openssl::bn::BigNum;
use openssl::ec::EcKeyRef;
use openssl::ecdsa::EcdsaSig;
use openssl::pkey::HasPublic;
use serde_json::Value;

/// The only `aud` accepted.
pub const AUDIENCE: &str = "https://account.apple.com/auth/oauth2/v2/token";

/// Largest `exp - iat`, seconds.
const MAX_LIFETIME: i64 = 180 * 86_400;

/// How far `iat` may be ahead of our clock, seconds.
const IAT_LEEWAY: i64 = 60;

/// Why a token request was refused: the OAuth `error`, a short reason for statistics and a
/// human description.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub error: &'static str,
    pub reason: &'static str,
    pub description: String,
}

impl Refusal {
    pub fn new(error: &'static str, reason: &'static str, description: impl Into<String>) -> Self {
        Self {
            error,
            reason,
            description: description.into(),
        }
    }
}

fn client(reason: &'static str, description: impl Into<String>) -> Refusal {
    Refusal::new("invalid_client", reason, description)
}

fn grant(reason: &'static str, description: impl Into<String>) -> Refusal {
    Refusal::new("invalid_grant", reason, description)
}

/// The claims a valid assertion carried.
#[derive(Debug)]
pub(crate) struct Claims {
    pub jti: String,
}

fn decode_json(part: &str) -> Option<serde_json::Map<String, Value>> {
    let bytes = URL_SAFE_NO_PAD.decode(part).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The `jti` of an assertion, unverified, for the journal.
pub(crate) fn peek_jti(assertion: &str) -> Option<String> {
    let payload = assertion.split('.').nth(1)?;
    let claims = decode_json(payload)?;
    claims.get("jti")?.as_str().map(str::to_owned)
}

/// A NumericDate claim (integer or fractional seconds).
fn seconds(claims: &serde_json::Map<String, Value>, name: &str) -> Option<i64> {
    let v = claims.get(name)?;
    v.as_i64().or_else(|| v.as_f64().map(|f| f as i64))
}

/// Checks `assertion` for the account (`client_id`, `key_id`, `key`) at `now` (Unix seconds,
/// simulated clock).
pub(crate) fn verify<T: HasPublic>(
    assertion: &str,
    client_id: &str,
    key_id: &str,
    key: &EcKeyRef<T>,
    now: i64,
) -> Result<Claims, Refusal> {
    let parts: Vec<&str> = assertion.split('.').collect();
    let [header, payload, signature] = parts[..] else {
        return Err(client(
            "malformed_assertion",
            format!(
                "client_assertion must be a JWS compact serialisation of 3 parts, got {}",
                parts.len()
            ),
        ));
    };
    let Some(h) = decode_json(header) else {
        return Err(client(
            "malformed_assertion",
            "the JWT header is not unpadded base64url JSON",
        ));
    };
    match h.get("alg").and_then(Value::as_str) {
        Some("ES256") => {}
        other => {
            return Err(client(
                "wrong_alg",
                format!("JWT alg must be ES256, got {other:?}"),
            ))
        }
    }
    match h.get("kid").and_then(Value::as_str) {
        Some(kid) if kid == key_id => {}
        other => {
            return Err(client(
                "wrong_kid",
                format!("JWT kid {other:?} is not this client's key id"),
            ))
        }
    }
    let Some(claims) = decode_json(payload) else {
        return Err(client(
            "malformed_assertion",
            "the JWT payload is not unpadded base64url JSON",
        ));
    };
    let Ok(sig) = URL_SAFE_NO_PAD.decode(signature) else {
        return Err(client(
            "bad_signature",
            "the JWT signature is not unpadded base64url",
        ));
    };
    if sig.len() != 64 {
        let hint = if sig.first() == Some(&0x30) {
            " (it looks DER-encoded; JWS wants the raw 64-byte r || s)"
        } else {
            ""
        };
        return Err(client(
            "bad_signature",
            format!("ES256 signature must be 64 bytes, got {}{hint}", sig.len()),
        ));
    }
    let signing_input = &assertion[..header.len() + 1 + payload.len()];
    if !signature_valid(&sig, signing_input.as_bytes(), key) {
        return Err(client(
            "bad_signature",
            "the JWT signature does not verify with this client's public key",
        ));
    }
    let text = |name: &str| claims.get(name).and_then(Value::as_str);
    if text("iss") != Some(client_id) {
        return Err(client(
            "wrong_iss",
            format!("iss {:?} is not the client id", text("iss")),
        ));
    }
    if text("sub") != Some(client_id) {
        return Err(client(
            "wrong_sub",
            format!("sub {:?} is not the client id", text("sub")),
        ));
    }
    if text("aud") != Some(AUDIENCE) {
        return Err(client(
            "wrong_aud",
            format!("aud must be {AUDIENCE:?}, got {:?}", claims.get("aud")),
        ));
    }
    let Some(iat) = seconds(&claims, "iat") else {
        return Err(grant("missing_iat", "iat is missing or not a number"));
    };
    let Some(exp) = seconds(&claims, "exp") else {
        return Err(grant("missing_exp", "exp is missing or not a number"));
    };
    if iat > now + IAT_LEEWAY {
        return Err(grant(
            "iat_in_future",
            format!("iat is {} s in the future", iat - now),
        ));
    }
    if exp <= now {
        return Err(grant(
            "expired",
            format!("the assertion expired {} s ago", now - exp),
        ));
    }
    if exp - iat > MAX_LIFETIME {
        return Err(grant(
            "lifetime_too_long",
            format!(
                "exp - iat is {} s; at most 180 days ({MAX_LIFETIME} s)",
                exp - iat
            ),
        ));
    }
    match text("jti") {
        Some(jti) if !jti.is_empty() => Ok(Claims {
            jti: jti.to_owned(),
        }),
        _ => Err(grant("missing_jti", "jti is missing")),
    }
}

fn signature_valid<T: HasPublic>(sig: &[u8], input: &[u8], key: &EcKeyRef<T>) -> bool {
    let digest = openssl::sha::sha256(input);
    let parts = BigNum::from_slice(&sig[..32]).and_then(|r| {
        let s = BigNum::from_slice(&sig[32..])?;
        EcdsaSig::from_private_components(r, s)
    });
    parts.and_then(|s| s.verify(&digest, key)).unwrap_or(false)
}
