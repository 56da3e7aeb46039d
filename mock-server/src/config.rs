//! What a simulated ADE service is: the OAuth credentials it accepts and every knob a test or
//! the demo can turn ([`MockConfig`]). Plain data; behaviour lives in `server` and `store`.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

/// The four OAuth 1.0a values of a decrypted ADE server token (docs/apple-dep-api.md §2.3, §3.1).
///
/// `Debug` shows only the consumer key: the other three are secrets.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// OAuth consumer key (`CK_…`).
    pub consumer_key: String,
    /// OAuth consumer secret (`CS_…`).
    pub consumer_secret: String,
    /// OAuth token (`AT_…`).
    pub access_token: String,
    /// OAuth token secret (`AS_…`).
    pub access_secret: String,
}

/// The decrypted server-token JSON, field order as Apple's tokens have it.
#[derive(Serialize)]
struct TokenJson<'a> {
    consumer_key: &'a str,
    consumer_secret: &'a str,
    access_token: &'a str,
    access_secret: &'a str,
    access_token_expiry: String,
}

impl Credentials {
    /// The fixed credentials Apple's `depsim` simulator accepts (also served by depsim at
    /// `GET /token`); public sample values, not live secrets.
    pub fn depsim() -> Self {
        Self {
            consumer_key: "CK_48dd68d198350f51258e885ce9a5c37ab7f98543c4a697323d75682a6c10a32501cb247e3db08105db868f73f2c972bdb6ae77112aea803b9219eb52689d42e6".into(),
            consumer_secret: "CS_34c7b2b531a600d99a0e4edcf4a78ded79b86ef318118c2f5bcfee1b011108c32d5302df801adbe29d446eb78f02b13144e323eb9aad51c79f01e50cb45c3a68".into(),
            access_token: "AT_927696831c59ba510cfe4ec1a69e5267c19881257d4bca2906a99d0785b785a6f6fdeb09774954fdd5e2d0ad952e3af52c6d8d2f21c924ba0caf4a031c158b89".into(),
            access_secret: "AS_c31afd7a09691d83548489336e8ff1cb11b82b6bca13f793344496a556b1f4972eaff4dde6deb5ac9cf076fdfa97ec97699c34d515947b9cf9ed31c99dded6ba".into(),
        }
    }

    /// The decrypted server-token JSON a client loads (docs/apple-dep-api.md §2.3): the four values plus
    /// `access_token_expiry` as RFC 3339 UTC with second precision and a `Z`.
    pub fn token_json(&self, expiry: DateTime<Utc>) -> String {
        let token = TokenJson {
            consumer_key: &self.consumer_key,
            consumer_secret: &self.consumer_secret,
            access_token: &self.access_token,
            access_secret: &self.access_secret,
            access_token_expiry: expiry.to_rfc3339_opts(SecondsFormat::Secs, true),
        };
        serde_json::to_string(&token).expect("a struct of strings always serialises")
    }
}

impl Default for Credentials {
    /// Same as [`Credentials::depsim`].
    fn default() -> Self {
        Self::depsim()
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("consumer_key", &self.consumer_key)
            .field("consumer_secret", &"<redacted>")
            .field("access_token", &"<redacted>")
            .field("access_secret", &"<redacted>")
            .finish()
    }
}

/// Everything that shapes a simulated service. Build with `MockConfig { devices: 2500,
/// ..Default::default() }`.
#[derive(Clone, Debug)]
pub struct MockConfig {
    /// Devices assigned to the MDM server at start. They predate the simulation, so they are
    /// not in the change log: a full fetch sees them, a sync never does.
    pub devices: usize,
    /// Seed of the device generator: the same seed gives the same devices, in the same order.
    pub seed: u64,
    /// The only OAuth credentials `GET /session` accepts.
    pub credentials: Credentials,
    /// Page size when a fetch/sync request names no `limit` (Apple documents 100).
    pub default_limit: u32,
    /// Largest page size; larger requested limits are clamped to it (Apple documents 1000).
    pub max_limit: u32,
    /// How long a session token lives, on the simulated clock. `None`: forever.
    pub session_ttl: Option<Duration>,
    /// `Some(n)`: every n-th authenticated call answers with a new token in the
    /// `X-ADM-Auth-Session` response header (docs/apple-dep-api.md §3.2). Earlier tokens stay valid.
    pub rotate_session_every: Option<u32>,
    /// Error bodies as JSON strings (`"EXPIRED_CURSOR"`, as depsim sends them) instead of the
    /// bare tokens production Apple sends (`EXPIRED_CURSOR`), docs/apple-dep-api.md §6.1.
    pub quoted_errors: bool,
    /// User-Agent substrings (case-insensitive) answered with `400 USER_AGENT_INVALID`, the way
    /// Apple rejected `nanodep-godep/0` (docs/apple-dep-api.md §1).
    pub user_agent_denylist: Vec<String>,
    /// Accepted distance between `oauth_timestamp` and the real wall clock (not the simulated
    /// one: the client signs with its own real clock).
    pub oauth_timestamp_window: Duration,
    /// Age from issue, on the simulated clock, after which a cursor is `EXPIRED_CURSOR`
    /// (Apple: 7 days, docs/apple-dep-api.md §5.1).
    pub cursor_ttl: chrono::Duration,
    /// `server_name` in `GET /account`.
    pub server_name: String,
    /// `server_uuid` in `GET /account`.
    pub server_uuid: String,
    /// `org_name` in `GET /account`.
    pub org_name: String,
    /// `org_type` in `GET /account`: `org` (ABM) or `edu` (ASM).
    pub org_type: String,
    /// Accounts of the simulated Apple School and Business Manager API (`/auth/oauth2/token`,
    /// `/v1/...`), served on the same listener. Empty: that API is off (every client id is
    /// unknown, every bearer token invalid).
    pub org_accounts: Vec<OrgAccountConfig>,
}

impl Default for MockConfig {
    fn default() -> Self {
        Self {
            devices: 0,
            seed: 1,
            credentials: Credentials::depsim(),
            default_limit: 100,
            max_limit: 1000,
            session_ttl: None,
            rotate_session_every: None,
            quoted_errors: false,
            user_agent_denylist: Vec::new(),
            oauth_timestamp_window: Duration::from_secs(300),
            cursor_ttl: chrono::Duration::days(7),
            server_name: "adesync-mock".into(),
            server_uuid: "5D1A0E3C9B7F4A2E8C6D0B1F3A5E7C92".into(),
            org_name: "Example Organization".into(),
            org_type: "org".into(),
            org_accounts: Vec::new(),
        }
    }
}

/// Ways an Apple School and Business Manager API account's responses can deviate from the
/// documented shape, so that a client's normalisation can be tested. All off by default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrgQuirks {
    /// List attributes (`imei`, `meid`, `ethernetMacAddress`) sent as one plain string (the
    /// elements joined by `,`; `""` for an empty list) instead of a JSON array.
    pub list_values_as_strings: bool,
    /// `purchaseSourceUid` instead of `purchaseSourceId`.
    pub purchase_source_uid: bool,
    /// An attribute no client knows: `"futureField":"future-value"`.
    pub future_field: bool,
}

/// One organisation's account of the Apple School and Business Manager API (OAuth 2 client
/// credentials with a signed JWT assertion, then JSON:API REST). Each account has its own
/// P-256 key (generated at start), inventory, tokens, faults and journal.
#[derive(Clone, Debug)]
pub struct OrgAccountConfig {
    /// OAuth client id: `BUSINESSAPI.<uuid>` (scope `business.api`) or `SCHOOLAPI.<uuid>`
    /// (scope `school.api`).
    pub client_id: String,
    /// The key id the assertion header's `kid` must name.
    pub key_id: String,
    /// Organisation devices generated beyond those shared with ADE: about 60% unassigned,
    /// 30% assigned to "Other MDM", 10% to "Apple Configurator".
    pub devices: usize,
    /// Seed of this account's inventory (not of its key, which is always fresh).
    pub seed: u64,
    /// Whether every device the ADE store holds at start is also an organisation device,
    /// assigned to the MDM server named like the ADE server.
    pub include_ade_devices: bool,
    /// Response deviations; can be changed at run time.
    pub quirks: OrgQuirks,
    /// `Some(d)`: a token request within `d` (simulated clock) of the last token issued is
    /// refused with `400 invalid_request` "too many token requests".
    pub min_token_interval: Option<Duration>,
    /// `Some(r)`: a token bucket of `r` requests per second (real time, burst `max(r, 1)`);
    /// requests beyond it get `429` with `Retry-After: 1`.
    pub requests_per_second: Option<f64>,
}

impl OrgAccountConfig {
    /// A business account (`BUSINESSAPI.<uuid>`) whose client and key ids derive from `seed`;
    /// 100 generated devices plus the ADE ones.
    pub fn business(seed: u64) -> Self {
        Self::with_prefix("BUSINESSAPI.", seed)
    }

    /// Like [`Self::business`], for a school (`SCHOOLAPI.<uuid>`, scope `school.api`).
    pub fn school(seed: u64) -> Self {
        Self::with_prefix("SCHOOLAPI.", seed)
    }

    fn with_prefix(prefix: &str, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x0A11_5EED_0000_0001);
        Self {
            client_id: format!("{prefix}{}", uuid_v4(&mut rng)),
            key_id: uuid_v4(&mut rng),
            devices: 100,
            seed,
            include_ade_devices: true,
            quirks: OrgQuirks::default(),
            min_token_interval: None,
            requests_per_second: None,
        }
    }

    /// The one scope this account may ask for: `school.api` for `SCHOOLAPI.` client ids,
    /// `business.api` for any other.
    pub fn scope(&self) -> &'static str {
        if self.client_id.starts_with("SCHOOLAPI.") {
            "school.api"
        } else {
            "business.api"
        }
    }
}

impl Default for OrgAccountConfig {
    /// Same as `OrgAccountConfig::business(1)`.
    fn default() -> Self {
        Self::business(1)
    }
}

/// A random-looking (version 4 layout), lowercase, hyphenated UUID drawn from `rng`.
pub(crate) fn uuid_v4(rng: &mut impl Rng) -> String {
    let mut b: [u8; 16] = rng.random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_json_has_the_five_fields_with_a_second_precision_z_expiry() {
        let expiry = DateTime::parse_from_rfc3339("2026-07-01T22:18:53.123Z")
            .unwrap()
            .with_timezone(&Utc);
        let v: serde_json::Value =
            serde_json::from_str(&Credentials::depsim().token_json(expiry)).unwrap();
        assert_eq!(v["access_token_expiry"], "2026-07-01T22:18:53Z");
        assert!(v["consumer_key"].as_str().unwrap().starts_with("CK_48dd"));
        assert!(v["consumer_secret"]
            .as_str()
            .unwrap()
            .starts_with("CS_34c7"));
        assert!(v["access_token"].as_str().unwrap().starts_with("AT_9276"));
        assert!(v["access_secret"].as_str().unwrap().starts_with("AS_c31a"));
    }

    #[test]
    fn org_accounts_derive_their_ids_from_the_seed() {
        let a = OrgAccountConfig::business(7);
        assert_eq!(a.client_id, OrgAccountConfig::business(7).client_id);
        assert_ne!(a.client_id, OrgAccountConfig::business(8).client_id);
        let uuid = a.client_id.strip_prefix("BUSINESSAPI.").unwrap();
        assert_eq!((uuid.len(), a.key_id.len()), (36, 36));
        assert_eq!(uuid.as_bytes()[14], b'4');
        assert_eq!(a.scope(), "business.api");
        let s = OrgAccountConfig::school(7);
        assert!(s.client_id.starts_with("SCHOOLAPI."));
        assert_eq!(s.scope(), "school.api");
    }

    #[test]
    fn debug_never_shows_secrets() {
        let c = Credentials::depsim();
        let shown = format!("{:?}", MockConfig::default());
        assert!(shown.contains(&c.consumer_key));
        for secret in [&c.consumer_secret, &c.access_token, &c.access_secret] {
            assert!(!shown.contains(secret.as_str()));
        }
    }
}
