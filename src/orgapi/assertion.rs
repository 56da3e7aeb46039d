//! The ES256 JWT client assertion that buys an access token (docs/apple-business-api.md §2).
//!
//! Signed with openssl, already the program's crypto library: it reads the key exactly as
//! Apple hands it out (SEC1 `BEGIN EC PRIVATE KEY`) as well as PKCS#8, which the JWT crates
//! we considered do not (they want PKCS#8 only), and it is the one implementation of ECDSA
//! the rest of the program already trusts.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use openssl::bn::BigNumContext;
use openssl::ec::EcKey;
use openssl::ecdsa::EcdsaSig;
use openssl::nid::Nid;
use openssl::pkey::Private;
use serde_json::json;
use std::path::Path;

/// How long a minted assertion is valid. Apple accepts up to 180 days; adesync holds the
/// key and mints one per token request, so a short life limits what a leaked one is worth.
pub const ASSERTION_LIFETIME_SECS: i64 = 300;

/// A problem with the account's private key file. Never contains key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file could not be read.
    #[error("cannot read the API account's private key {path}: {source}; check `private_key_file` and that the service user may read it")]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not a PEM EC private key.
    #[error("{path} is not a PEM private key (expected \"-----BEGIN EC PRIVATE KEY-----\" or \"-----BEGIN PRIVATE KEY-----\" as downloaded from Apple Business/School Manager → Preferences → API); download the key again or point `private_key_file` at it")]
    NotAKey {
        /// The file.
        path: std::path::PathBuf,
    },
    /// An EC key on another curve, or an RSA key.
    #[error("{path} is not a P-256 (prime256v1) key, which is what Apple issues for API accounts; point `private_key_file` at the key downloaded for this account")]
    WrongCurve {
        /// The file.
        path: std::path::PathBuf,
    },
    /// Signing failed (openssl).
    #[error("cannot sign the client assertion with {path}: {detail}")]
    Sign {
        /// The file.
        path: std::path::PathBuf,
        /// openssl's error.
        detail: String,
    },
}

/// An account's signing key. `Debug` shows only its file.
pub struct SigningKey {
    key: EcKey<Private>,
    path: std::path::PathBuf,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// Reads a P-256 private key: SEC1 (`BEGIN EC PRIVATE KEY`, as Apple's download) or
    /// PKCS#8 (`BEGIN PRIVATE KEY`).
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let pem = std::fs::read(path).map_err(|source| KeyError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_pem(&pem, path)
    }

    /// [`Self::load`] from bytes already read; `path` names them in errors.
    pub fn from_pem(pem: &[u8], path: &Path) -> Result<Self, KeyError> {
        let not_a_key = || KeyError::NotAKey {
            path: path.to_owned(),
        };
        let pkey = openssl::pkey::PKey::private_key_from_pem(pem).map_err(|_| not_a_key())?;
        let key = pkey.ec_key().map_err(|_| KeyError::WrongCurve {
            path: path.to_owned(),
        })?;
        if key.group().curve_name() != Some(Nid::X9_62_PRIME256V1) {
            return Err(KeyError::WrongCurve {
                path: path.to_owned(),
            });
        }
        key.check_key().map_err(|_| not_a_key())?;
        Ok(Self {
            key,
            path: path.to_owned(),
        })
    }

    /// The public key as uncompressed SEC1 bytes (for `org-accounts show`, matching the
    /// key Apple lists).
    pub fn public_key_der(&self) -> Vec<u8> {
        let mut ctx = BigNumContext::new().expect("openssl context");
        self.key
            .public_key()
            .to_bytes(
                self.key.group(),
                openssl::ec::PointConversionForm::UNCOMPRESSED,
                &mut ctx,
            )
            .unwrap_or_default()
    }

    /// A fresh assertion: header `{"alg":"ES256","kid":key_id,"typ":"JWT"}`, claims `iss` =
    /// `sub` = client ID, `aud` = `audience`, `iat` = `now`, `exp` = `now` +
    /// [`ASSERTION_LIFETIME_SECS`], and a new random `jti`; the signature is JWS's 64-byte
    /// r‖s (RFC 7518 §3.4), not DER.
    pub fn assertion(
        &self,
        client_id: &str,
        key_id: &str,
        audience: &str,
        now: i64,
    ) -> Result<String, KeyError> {
        let header = json!({"alg": "ES256", "kid": key_id, "typ": "JWT"});
        let claims = json!({
            "iss": client_id,
            "sub": client_id,
            "aud": audience,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME_SECS,
            "jti": new_jti(),
        });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let sign_err = |e: openssl::error::ErrorStack| KeyError::Sign {
            path: self.path.clone(),
            detail: e.to_string(),
        };
        let digest = openssl::sha::sha256(signing_input.as_bytes());
        let sig = EcdsaSig::sign(&digest, &self.key).map_err(sign_err)?;
        let mut raw = sig.r().to_vec_padded(32).map_err(sign_err)?;
        raw.extend(sig.s().to_vec_padded(32).map_err(sign_err)?);
        Ok(format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(raw)))
    }
}

/// A random UUID-shaped id: a new `jti` per assertion (Apple refuses a repeated one).
fn new_jti() -> String {
    let b: [u8; 16] = rand::random();
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
        u16::from_be_bytes([b[4], b[5]]),
        u16::from_be_bytes([b[6], b[7]]) & 0x0fff,
        (u16::from_be_bytes([b[8], b[9]]) & 0x3fff) | 0x8000,
        u64::from_be_bytes([0, 0, b[10], b[11], b[12], b[13], b[14], b[15]])
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use openssl::ec::EcGroup;

    fn p256() -> EcKey<Private> {
        EcKey::generate(&EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap()).unwrap()
    }

    fn verify(jwt: &str, key: &EcKey<Private>) -> serde_json::Value {
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3);
        let sig = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
        assert_eq!(sig.len(), 64, "JWS ES256 signatures are r||s");
        let r = openssl::bn::BigNum::from_slice(&sig[..32]).unwrap();
        let s = openssl::bn::BigNum::from_slice(&sig[32..]).unwrap();
        let sig = EcdsaSig::from_private_components(r, s).unwrap();
        let digest = openssl::sha::sha256(format!("{}.{}", parts[0], parts[1]).as_bytes());
        assert!(sig.verify(&digest, key).unwrap(), "signature verifies");
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap()
    }

    #[test]
    fn sec1_and_pkcs8_keys_sign_verifiable_assertions_with_fresh_ids() {
        let key = p256();
        let sec1 = key.private_key_to_pem().unwrap();
        let pkcs8 = openssl::pkey::PKey::from_ec_key(key.clone())
            .unwrap()
            .private_key_to_pem_pkcs8()
            .unwrap();
        assert!(String::from_utf8_lossy(&sec1).contains("BEGIN EC PRIVATE KEY"));
        let mut jtis = std::collections::HashSet::new();
        for pem in [sec1, pkcs8] {
            let k = SigningKey::from_pem(&pem, Path::new("k.pem")).unwrap();
            assert!(!format!("{k:?}").contains("BEGIN"));
            let jwt = k
                .assertion("BUSINESSAPI.x", "kid-1", "https://aud", 1_000)
                .unwrap();
            let claims = verify(&jwt, &key);
            assert_eq!(claims["iss"], "BUSINESSAPI.x");
            assert_eq!(claims["sub"], "BUSINESSAPI.x");
            assert_eq!(claims["aud"], "https://aud");
            assert_eq!(claims["exp"], 1_000 + ASSERTION_LIFETIME_SECS);
            assert!(jtis.insert(claims["jti"].as_str().unwrap().to_owned()));
        }
    }

    #[test]
    fn keys_that_are_not_p256_are_refused_by_name() {
        let rsa = openssl::rsa::Rsa::generate(2048).unwrap();
        let pem = rsa.private_key_to_pem().unwrap();
        let e = SigningKey::from_pem(&pem, Path::new("rsa.pem")).unwrap_err();
        assert!(matches!(e, KeyError::WrongCurve { .. }), "{e}");
        let p384 = EcKey::generate(&EcGroup::from_curve_name(Nid::SECP384R1).unwrap()).unwrap();
        let e = SigningKey::from_pem(&p384.private_key_to_pem().unwrap(), Path::new("p384.pem"))
            .unwrap_err();
        assert!(matches!(e, KeyError::WrongCurve { .. }), "{e}");
        let e = SigningKey::from_pem(b"hello", Path::new("x.pem")).unwrap_err();
        assert!(e.to_string().contains("BEGIN EC PRIVATE KEY"), "{e}");
    }
}
