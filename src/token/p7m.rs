//! Apple's S/MIME server-token file (`*_smime.p7m`, docs/apple-dep-api.md §2.2): recognising it, unwrapping
//! its MIME/base64 armour, and decrypting the CMS `EnvelopedData` inside with the private
//! key whose certificate was uploaded to ABM/ASM.
//!
//! The ASN.1 is read by a small BER reader here rather than by OpenSSL's CMS layer, for two
//! reasons. Apple's file is BER with indefinite lengths and a chunked (constructed) content
//! octet string, which a DER-only parser refuses. And OpenSSL's `CMS_decrypt`, given a key
//! but no certificate, deliberately hides a wrong key behind a random content key (its
//! defence against padding oracles), so an admin would see a garbled token instead of
//! "wrong key". Only the primitives come from OpenSSL: RSA PKCS#1 v1.5 to unwrap the content
//! key, AES-128/192/256-CBC or 3DES-CBC to decrypt the content.
//!
//! Nothing here logs, and no error carries key or plaintext bytes.

use std::path::Path;

use base64::Engine as _;
use openssl::pkey::{PKey, Private};
use openssl::rsa::Padding;
use openssl::symm::Cipher;

const OID_DATA: &str = "1.2.840.113549.1.7.1";
const OID_SIGNED_DATA: &str = "1.2.840.113549.1.7.2";
const OID_ENVELOPED_DATA: &str = "1.2.840.113549.1.7.3";
const OID_RSA_ENCRYPTION: &str = "1.2.840.113549.1.1.1";
const OID_AES128_CBC: &str = "2.16.840.1.101.3.4.1.2";
const OID_AES192_CBC: &str = "2.16.840.1.101.3.4.1.22";
const OID_AES256_CBC: &str = "2.16.840.1.101.3.4.1.42";
const OID_DES_EDE3_CBC: &str = "1.2.840.113549.3.7";

/// Nesting deeper than this is not a token file; the limit keeps a hostile file from
/// exhausting the stack of the recursive reader.
const MAX_DEPTH: u8 = 32;

/// Why a `.p7m` could not be turned into plaintext. Never contains key or content bytes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum P7mError {
    /// The armour (MIME headers, base64) is not what Apple serves.
    #[error("not an S/MIME file: {0}; expected the *_smime.p7m file downloaded from Apple Business/School Manager")]
    NotSmime(String),
    /// The decoded bytes are not a CMS structure.
    #[error("not a CMS file: {0}; expected the *_smime.p7m file downloaded from Apple Business/School Manager")]
    NotCms(String),
    /// The file ends early.
    #[error(
        "the file is truncated ({0}); download the token again from Apple Business/School Manager"
    )]
    Truncated(String),
    /// CMS, but not encrypted content.
    #[error("a CMS file, but not an encrypted one (content type {0}); expected EnvelopedData (1.2.840.113549.1.7.3), which is what Apple's server token is")]
    NotEnveloped(String),
    /// Encrypted in a way Apple does not use and this reader does not implement.
    #[error("unsupported encryption: {0}; Apple's server tokens use RSA key transport with AES-CBC or 3DES-CBC")]
    Unsupported(String),
    /// No recipient's key could be unwrapped with the given private key.
    #[error("wrong key for this token: it was encrypted for {recipients}, and the private key given is not that certificate's key; use the private key whose certificate was uploaded to this MDM server in Apple Business/School Manager (or upload this key's certificate there and download the token again)")]
    WrongKey {
        /// Who the file was encrypted for (certificate issuer and serial, or key id).
        recipients: String,
    },
    /// The content key unwrapped but the content does not decrypt.
    #[error("the content does not decrypt ({0}): the file is damaged, or was encrypted for another key; download the token again")]
    Corrupt(String),
}

/// Why a private key file is unusable. Never contains the key.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Unreadable.
    #[error("cannot read private key file {path}: {source}")]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not a usable RSA private key.
    #[error("private key file {path}: {detail}")]
    Invalid {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong and what to do.
        detail: String,
    },
}

/// Reads an RSA private key in PEM (PKCS#8 or PKCS#1) or DER form.
///
/// A passphrase-protected key is refused rather than prompted for: the daemon runs
/// unattended, so the key is protected by file permissions (0600) instead.
pub fn load_private_key(path: &Path) -> Result<PKey<Private>, KeyError> {
    let bytes = std::fs::read(path).map_err(|source| KeyError::Read {
        path: path.to_owned(),
        source,
    })?;
    let invalid = |detail: &str| KeyError::Invalid {
        path: path.to_owned(),
        detail: detail.to_owned(),
    };
    // The same rule as other secret files: the service's group may read it, others not.
    if let Ok(meta) = std::fs::metadata(path) {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o007 != 0 {
            return Err(invalid(&format!(
                "mode {mode:04o} lets every user read the private key; run `chmod 600 {}` (or 640 with the service's group)",
                path.display()
            )));
        }
    }
    let is_pem = bytes.windows(11).any(|w| w == b"-----BEGIN ");
    let key = if is_pem {
        if bytes.windows(9).any(|w| w == b"ENCRYPTED") {
            return Err(invalid(
                "the key is protected by a passphrase; adesync needs it unencrypted \
                 (remove the passphrase with `openssl pkey -in KEY -out KEY.new`, keep it mode 0600)",
            ));
        }
        // The callback answers "no passphrase" so OpenSSL never prompts on a terminal.
        PKey::private_key_from_pem_callback(&bytes, |_| Ok(0))
    } else {
        PKey::private_key_from_der(&bytes)
    }
    .map_err(|_| {
        invalid("not a PEM or DER private key; expected the .key file `adesync token keygen` wrote")
    })?;
    if key.rsa().is_err() {
        return Err(invalid(
            "not an RSA key; Apple encrypts server tokens to an RSA certificate",
        ));
    }
    Ok(key)
}

/// Whether `bytes` look like an encrypted `.p7m` (in any armour) rather than the decrypted
/// token text. Decides by content, not by file name, so a renamed file still works.
pub fn is_smime(bytes: &[u8]) -> bool {
    let trimmed = trim_ascii_start(bytes);
    if trimmed.first() == Some(&0x30) {
        return true; // binary DER/BER: a SEQUENCE
    }
    let Ok(text) = std::str::from_utf8(trimmed) else {
        return false;
    };
    let text = text.trim_start_matches('\u{feff}');
    if text.starts_with("-----BEGIN PKCS7-----") || text.starts_with("-----BEGIN CMS-----") {
        return true;
    }
    if let Some((headers, _)) = split_headers(text) {
        return headers.iter().any(|(name, value)| {
            name.eq_ignore_ascii_case("content-type")
                && value.to_ascii_lowercase().contains("pkcs7-mime")
        });
    }
    // Bare base64 of a SEQUENCE starts with "MI".
    text.starts_with("MI")
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+/=\r\n ".contains(&b))
}

/// Removes the armour — MIME headers and base64, or PEM, or nothing for binary — and
/// returns the CMS bytes.
pub fn unarmor(bytes: &[u8]) -> Result<Vec<u8>, P7mError> {
    let trimmed = trim_ascii_start(bytes);
    if trimmed.first() == Some(&0x30) {
        return Ok(trimmed.to_vec());
    }
    let text = std::str::from_utf8(trimmed)
        .map_err(|_| P7mError::NotSmime("neither binary CMS nor text".into()))?
        .trim_start_matches('\u{feff}');
    let body: String = if let Some(rest) = text
        .strip_prefix("-----BEGIN PKCS7-----")
        .or_else(|| text.strip_prefix("-----BEGIN CMS-----"))
    {
        let end = rest
            .find("-----END ")
            .ok_or_else(|| P7mError::Truncated("the PEM has no -----END line".into()))?;
        rest[..end].to_owned()
    } else if let Some((headers, body)) = split_headers(text) {
        let header = |n: &str| {
            headers
                .iter()
                .find(|(name, _)| name.eq_ignore_ascii_case(n))
                .map(|(_, v)| v.to_ascii_lowercase())
        };
        match header("content-type") {
            Some(t) if t.contains("pkcs7-mime") => {}
            Some(t) if t.starts_with("text/plain") => {
                return Err(P7mError::NotSmime(
                    "this is the already-decrypted text form (Content-Type: text/plain)".into(),
                ))
            }
            Some(t) => {
                return Err(P7mError::NotSmime(format!(
                    "Content-Type is {t:?}, not application/pkcs7-mime"
                )))
            }
            None => return Err(P7mError::NotSmime("no Content-Type header".into())),
        }
        match header("content-transfer-encoding").as_deref() {
            None | Some("base64") => {}
            Some(other) => {
                return Err(P7mError::NotSmime(format!(
                    "Content-Transfer-Encoding {other:?} is not supported; Apple's file is base64"
                )))
            }
        }
        body.to_owned()
    } else {
        text.to_owned()
    };
    let compact: String = body.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    if compact.is_empty() {
        return Err(P7mError::Truncated("no content after the headers".into()));
    }
    base64::engine::general_purpose::STANDARD
        .decode(compact.as_bytes())
        .map_err(|e| P7mError::NotSmime(format!("the body is not valid base64 ({e})")))
}

/// Decrypts a `.p7m` in any armour (see [`unarmor`]) with `key`; returns the plaintext.
pub fn decrypt(bytes: &[u8], key: &PKey<Private>) -> Result<Vec<u8>, P7mError> {
    let cms = unarmor(bytes)?;
    let env = parse_enveloped(&cms)?;
    decrypt_enveloped(&env, key)
}

/// What the reader extracted from an `EnvelopedData`: enough to decrypt and to explain.
#[derive(Debug)]
pub struct Enveloped {
    /// Key-transport recipients: who each is, and the wrapped content key.
    pub recipients: Vec<Recipient>,
    /// Recipients of kinds other than RSA key transport (named, for the error message).
    pub other_recipients: Vec<String>,
    /// OID of the content cipher.
    pub cipher_oid: String,
    /// Initialisation vector.
    pub iv: Vec<u8>,
    /// The encrypted content, with a chunked octet string joined.
    pub ciphertext: Vec<u8>,
}

/// One key-transport recipient.
#[derive(Debug)]
pub struct Recipient {
    /// The recipient's certificate, described for people (issuer and serial, or key id).
    pub id: String,
    /// OID of the key-encryption algorithm.
    pub key_encryption_oid: String,
    /// The content key, encrypted to the recipient's public key.
    pub encrypted_key: Vec<u8>,
}

/// Parses CMS `ContentInfo` → `EnvelopedData` (RFC 5652 §3, §6.1), BER or DER.
pub fn parse_enveloped(cms: &[u8]) -> Result<Enveloped, P7mError> {
    let (ci, rest) = read_tlv(cms, 0)?;
    if rest.iter().any(|&b| b != 0) {
        return Err(P7mError::NotCms(
            "unexpected bytes after the structure".into(),
        ));
    }
    let ci = expect(ci, TAG_SEQUENCE, "ContentInfo")?;
    let mut parts = children(ci.body);
    let content_type = oid(next(&mut parts, TAG_OID, "ContentInfo.contentType")?)?;
    if content_type != OID_ENVELOPED_DATA {
        let what = match content_type.as_str() {
            OID_SIGNED_DATA => format!("{content_type}, SignedData"),
            OID_DATA => format!("{content_type}, Data"),
            _ => content_type,
        };
        return Err(P7mError::NotEnveloped(what));
    }
    let wrapper = next(&mut parts, 0xA0, "ContentInfo.content")?;
    let mut inner = children(wrapper.body);
    let env = next(&mut inner, TAG_SEQUENCE, "EnvelopedData")?;
    let mut fields = children(env.body);
    next(&mut fields, TAG_INTEGER, "EnvelopedData.version")?;
    // originatorInfo [0] IMPLICIT, optional: certificates we do not need.
    if fields.peek_tag()? == Some(0xA0) {
        fields.next_tlv()?;
    }
    let set = next(&mut fields, TAG_SET, "EnvelopedData.recipientInfos")?;
    let mut recipients = Vec::new();
    let mut other_recipients = Vec::new();
    let mut ris = children(set.body);
    while let Some(ri) = ris.next_tlv()? {
        match ri.tag {
            TAG_SEQUENCE => recipients.push(parse_ktri(ri)?),
            0xA1 => other_recipients.push("a key-agreement recipient".to_owned()),
            0xA2 => other_recipients.push("a key-encryption-key recipient".to_owned()),
            0xA3 => other_recipients.push("a password recipient".to_owned()),
            _ => other_recipients.push("a recipient of an unknown kind".to_owned()),
        }
    }
    let eci = next(
        &mut fields,
        TAG_SEQUENCE,
        "EnvelopedData.encryptedContentInfo",
    )?;
    let mut eci = children(eci.body);
    next(&mut eci, TAG_OID, "EncryptedContentInfo.contentType")?;
    let alg = next(&mut eci, TAG_SEQUENCE, "contentEncryptionAlgorithm")?;
    let mut alg = children(alg.body);
    let cipher_oid = oid(next(
        &mut alg,
        TAG_OID,
        "contentEncryptionAlgorithm.algorithm",
    )?)?;
    let iv = match alg.next_tlv()? {
        Some(p) if p.tag == TAG_OCTET_STRING => p.body.to_vec(),
        _ => {
            return Err(P7mError::Unsupported(format!(
                "content cipher {} without an IV parameter",
                cipher_name(&cipher_oid)
            )))
        }
    };
    let ciphertext = match eci.next_tlv()? {
        // [0] IMPLICIT OCTET STRING: primitive (DER) or constructed chunks (Apple's BER).
        Some(c) if c.tag == 0x80 || c.tag == 0xA0 => octets(c, 0)?,
        _ => {
            return Err(P7mError::NotCms(
                "the encrypted content is missing (detached content is not a token file)".into(),
            ))
        }
    };
    Ok(Enveloped {
        recipients,
        other_recipients,
        cipher_oid,
        iv,
        ciphertext,
    })
}

fn parse_ktri(ri: Tlv<'_>) -> Result<Recipient, P7mError> {
    let mut f = children(ri.body);
    next(&mut f, TAG_INTEGER, "KeyTransRecipientInfo.version")?;
    let rid = f
        .next_tlv()?
        .ok_or_else(|| P7mError::NotCms("KeyTransRecipientInfo has no recipient id".into()))?;
    let id = match rid.tag {
        TAG_SEQUENCE => describe_issuer_serial(rid),
        0x80 => format!("the key with subject key identifier {}", hex(rid.body)),
        _ => "an unidentified recipient".to_owned(),
    };
    let alg = next(&mut f, TAG_SEQUENCE, "keyEncryptionAlgorithm")?;
    let key_encryption_oid = oid(next(
        &mut children(alg.body),
        TAG_OID,
        "keyEncryptionAlgorithm",
    )?)?;
    let ek = f
        .next_tlv()?
        .filter(|t| t.tag == TAG_OCTET_STRING || t.tag == 0x24)
        .ok_or_else(|| P7mError::NotCms("KeyTransRecipientInfo has no encryptedKey".into()))?;
    Ok(Recipient {
        id,
        key_encryption_oid,
        encrypted_key: octets(ek, 0)?,
    })
}

/// "the certificate CN=…, O=… (serial 83:4B:…)", from IssuerAndSerialNumber.
fn describe_issuer_serial(rid: Tlv<'_>) -> String {
    let mut f = children(rid.body);
    let issuer = match f.next_tlv() {
        Ok(Some(t)) if t.tag == TAG_SEQUENCE => describe_name(t.raw),
        _ => None,
    };
    let serial = match f.next_tlv() {
        Ok(Some(t)) if t.tag == TAG_INTEGER => Some(
            t.body
                .iter()
                .map(|b| format!("{b:02X}"))
                .collect::<Vec<_>>()
                .join(":"),
        ),
        _ => None,
    };
    format!(
        "the certificate issued by {} with serial {}",
        issuer.as_deref().unwrap_or("(unreadable name)"),
        serial.as_deref().unwrap_or("(unreadable)")
    )
}

fn describe_name(der: &[u8]) -> Option<String> {
    let name = openssl::x509::X509Name::from_der(der).ok()?;
    let parts: Vec<String> = name
        .entries()
        .map(|e| {
            let key = e.object().nid().short_name().unwrap_or("?");
            let value = e.data().to_string().unwrap_or_else(|_| "?".into());
            format!("{key}={value}")
        })
        .collect();
    Some(parts.join(", "))
}

/// Unwraps the content key with `key` and decrypts the content.
pub fn decrypt_enveloped(env: &Enveloped, key: &PKey<Private>) -> Result<Vec<u8>, P7mError> {
    let cipher = match env.cipher_oid.as_str() {
        OID_AES128_CBC => Cipher::aes_128_cbc(),
        OID_AES192_CBC => Cipher::aes_192_cbc(),
        OID_AES256_CBC => Cipher::aes_256_cbc(),
        OID_DES_EDE3_CBC => Cipher::des_ede3_cbc(),
        other => {
            return Err(P7mError::Unsupported(format!(
                "content cipher {}",
                cipher_name(other)
            )))
        }
    };
    if Some(env.iv.len()) != cipher.iv_len() {
        return Err(P7mError::NotCms(format!(
            "the IV is {} bytes; {} needs {}",
            env.iv.len(),
            cipher_name(&env.cipher_oid),
            cipher.iv_len().unwrap_or(0)
        )));
    }
    if env.ciphertext.is_empty() || !env.ciphertext.len().is_multiple_of(cipher.block_size()) {
        return Err(P7mError::Truncated(format!(
            "the encrypted content is {} bytes, not whole {}-byte blocks",
            env.ciphertext.len(),
            cipher.block_size()
        )));
    }
    let rsa = key.rsa().map_err(|_| P7mError::WrongKey {
        recipients: describe_recipients(env),
    })?;
    let mut unsupported_kt = None;
    let mut unwrapped = None;
    for r in &env.recipients {
        if r.key_encryption_oid != OID_RSA_ENCRYPTION {
            unsupported_kt = Some(r.key_encryption_oid.clone());
            continue;
        }
        if r.encrypted_key.len() != rsa.size() as usize {
            continue; // encrypted to a key of another size: not ours
        }
        let mut buf = vec![0u8; rsa.size() as usize];
        // A padding failure means the content key was encrypted to another public key.
        // (OpenSSL ≥ 3.2 may instead return pseudo-random bytes for a wrong key; the
        // length check below and the content's CBC padding catch those.)
        if let Ok(n) = rsa.private_decrypt(&r.encrypted_key, &mut buf, Padding::PKCS1) {
            if n == cipher.key_len() {
                buf.truncate(n);
                unwrapped = Some(buf);
                break;
            }
        }
    }
    let Some(content_key) = unwrapped else {
        if env.recipients.is_empty() {
            return Err(P7mError::Unsupported(format!(
                "the file is encrypted only for {}",
                env.other_recipients.join(", ")
            )));
        }
        if let (Some(oid), true) = (
            unsupported_kt,
            env.recipients
                .iter()
                .all(|r| r.key_encryption_oid != OID_RSA_ENCRYPTION),
        ) {
            return Err(P7mError::Unsupported(format!(
                "key encryption algorithm {oid}"
            )));
        }
        return Err(P7mError::WrongKey {
            recipients: describe_recipients(env),
        });
    };
    openssl::symm::decrypt(cipher, &content_key, Some(&env.iv), &env.ciphertext)
        .map_err(|_| P7mError::Corrupt("bad padding after decryption".into()))
}

fn describe_recipients(env: &Enveloped) -> String {
    let ids: Vec<&str> = env.recipients.iter().map(|r| r.id.as_str()).collect();
    if ids.is_empty() {
        "no RSA recipient".to_owned()
    } else {
        ids.join("; or ")
    }
}

fn cipher_name(oid: &str) -> String {
    match oid {
        OID_AES128_CBC => "AES-128-CBC".into(),
        OID_AES192_CBC => "AES-192-CBC".into(),
        OID_AES256_CBC => "AES-256-CBC".into(),
        OID_DES_EDE3_CBC => "3DES-CBC".into(),
        "1.2.840.113549.3.2" => "RC2-CBC (1.2.840.113549.3.2)".into(),
        "1.3.14.3.2.7" => "DES-CBC (1.3.14.3.2.7)".into(),
        other => other.to_owned(),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn trim_ascii_start(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(bytes.len());
    &bytes[start..]
}

/// Splits RFC 822-style headers (through the first blank line) from the body. `None` when
/// the text does not start with a header line.
fn split_headers(text: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut headers: Vec<(String, String)> = Vec::new();
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let content = line.trim_end_matches(['\r', '\n']);
        offset += line.len();
        if content.trim().is_empty() {
            return (!headers.is_empty()).then(|| (headers, &text[offset..]));
        }
        if content.starts_with([' ', '\t']) {
            // A folded header line continues the previous header.
            let last = headers.last_mut()?;
            last.1.push(' ');
            last.1.push_str(content.trim());
            continue;
        }
        let (name, value) = content.split_once(':')?;
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return None;
        }
        headers.push((name.to_owned(), value.trim().to_owned()));
    }
    // Headers without a body: nothing follows.
    (!headers.is_empty()).then_some((headers, ""))
}

// ---------------------------------------------------------------------------------------
// A minimal BER reader (X.690 §8.1): low tag numbers, definite and indefinite lengths.

const TAG_INTEGER: u8 = 0x02;
const TAG_OCTET_STRING: u8 = 0x04;
const TAG_OID: u8 = 0x06;
const TAG_SEQUENCE: u8 = 0x30;
const TAG_SET: u8 = 0x31;

/// One element: its identifier octet, its contents (children, for a constructed element
/// of indefinite length, without the end-of-contents marker), and its whole encoding.
#[derive(Clone, Copy, Debug)]
struct Tlv<'a> {
    tag: u8,
    body: &'a [u8],
    raw: &'a [u8],
}

/// Reads one element from the front of `input`; returns it and what follows.
fn read_tlv(input: &[u8], depth: u8) -> Result<(Tlv<'_>, &[u8]), P7mError> {
    if depth > MAX_DEPTH {
        return Err(P7mError::NotCms("nested too deeply".into()));
    }
    let truncated = || P7mError::Truncated("the CMS structure ends early".into());
    let (&tag, rest) = input.split_first().ok_or_else(truncated)?;
    if tag & 0x1f == 0x1f {
        return Err(P7mError::NotCms(
            "high tag numbers are not used by CMS".into(),
        ));
    }
    if tag == 0 {
        return Err(P7mError::NotCms(
            "an unexpected end-of-contents marker".into(),
        ));
    }
    let (&len0, rest) = rest.split_first().ok_or_else(truncated)?;
    if len0 == 0x80 {
        if tag & 0x20 == 0 {
            return Err(P7mError::NotCms(
                "indefinite length on a primitive element".into(),
            ));
        }
        let mut cur = rest;
        loop {
            if cur.len() < 2 {
                return Err(truncated());
            }
            if cur[0] == 0 && cur[1] == 0 {
                let body_len = rest.len() - cur.len();
                let raw_len = input.len() - cur.len() + 2;
                return Ok((
                    Tlv {
                        tag,
                        body: &rest[..body_len],
                        raw: &input[..raw_len],
                    },
                    &cur[2..],
                ));
            }
            let (_, after) = read_tlv(cur, depth + 1)?;
            cur = after;
        }
    }
    let (len, rest) = if len0 < 0x80 {
        (len0 as usize, rest)
    } else {
        let n = (len0 & 0x7f) as usize;
        if n > 4 {
            return Err(P7mError::NotCms(format!("a {n}-byte length field")));
        }
        if rest.len() < n {
            return Err(truncated());
        }
        let len = rest[..n].iter().fold(0usize, |a, &b| (a << 8) | b as usize);
        (len, &rest[n..])
    };
    if rest.len() < len {
        return Err(P7mError::Truncated(format!(
            "an element needs {len} bytes but only {} remain",
            rest.len()
        )));
    }
    let header = input.len() - rest.len();
    Ok((
        Tlv {
            tag,
            body: &rest[..len],
            raw: &input[..header + len],
        },
        &rest[len..],
    ))
}

/// Iterates the children of a constructed element.
struct Children<'a> {
    rest: &'a [u8],
}

fn children(body: &[u8]) -> Children<'_> {
    Children { rest: body }
}

impl<'a> Children<'a> {
    fn next_tlv(&mut self) -> Result<Option<Tlv<'a>>, P7mError> {
        if self.rest.is_empty() {
            return Ok(None);
        }
        let (t, rest) = read_tlv(self.rest, 1)?;
        self.rest = rest;
        Ok(Some(t))
    }

    fn peek_tag(&self) -> Result<Option<u8>, P7mError> {
        Ok(self.rest.first().copied())
    }
}

fn next<'a>(c: &mut Children<'a>, tag: u8, what: &str) -> Result<Tlv<'a>, P7mError> {
    match c.next_tlv()? {
        Some(t) => expect(t, tag, what),
        None => Err(P7mError::NotCms(format!("{what} is missing"))),
    }
}

fn expect<'a>(t: Tlv<'a>, tag: u8, what: &str) -> Result<Tlv<'a>, P7mError> {
    if t.tag == tag {
        Ok(t)
    } else {
        Err(P7mError::NotCms(format!(
            "{what}: expected tag 0x{tag:02x}, found 0x{:02x}",
            t.tag
        )))
    }
}

/// An OCTET STRING's bytes; a constructed one (BER) is the concatenation of its chunks.
fn octets(t: Tlv<'_>, depth: u8) -> Result<Vec<u8>, P7mError> {
    if t.tag & 0x20 == 0 {
        return Ok(t.body.to_vec());
    }
    if depth > MAX_DEPTH {
        return Err(P7mError::NotCms("nested too deeply".into()));
    }
    let mut out = Vec::with_capacity(t.body.len());
    let mut c = children(t.body);
    while let Some(chunk) = c.next_tlv()? {
        if chunk.tag & 0x1f != TAG_OCTET_STRING {
            return Err(P7mError::NotCms(format!(
                "a chunk of an octet string has tag 0x{:02x}",
                chunk.tag
            )));
        }
        out.extend(octets(chunk, depth + 1)?);
    }
    Ok(out)
}

/// Dotted form of an OBJECT IDENTIFIER.
fn oid(t: Tlv<'_>) -> Result<String, P7mError> {
    let bad = || P7mError::NotCms("a malformed object identifier".into());
    let (&first, rest) = t.body.split_first().ok_or_else(bad)?;
    let mut arcs: Vec<u64> = vec![u64::from(first / 40).min(2)];
    arcs.push(u64::from(first) - arcs[0] * 40);
    let mut v: u64 = 0;
    for (i, &b) in rest.iter().enumerate() {
        if v > (u64::MAX >> 7) {
            return Err(bad());
        }
        v = (v << 7) | u64::from(b & 0x7f);
        if b & 0x80 == 0 {
            arcs.push(v);
            v = 0;
        } else if i == rest.len() - 1 {
            return Err(bad());
        }
    }
    Ok(arcs
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join("."))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/apple/");

    fn apple_sample() -> Vec<u8> {
        std::fs::read(format!("{FIXTURES}apple-doc-token-smime-sample.p7m")).unwrap()
    }

    #[test]
    fn apples_sample_is_recognised_and_parses_as_ber_enveloped_data() {
        let file = apple_sample();
        assert!(is_smime(&file));
        let cms = unarmor(&file).unwrap();
        // Indefinite length at the top, as docs/apple-dep-api.md §2.2 says.
        assert_eq!(&cms[..2], &[0x30, 0x80]);
        let env = parse_enveloped(&cms).unwrap();
        assert_eq!(env.cipher_oid, OID_AES128_CBC);
        assert_eq!(env.iv.len(), 16);
        assert_eq!(env.recipients.len(), 1);
        assert_eq!(env.recipients[0].key_encryption_oid, OID_RSA_ENCRYPTION);
        assert_eq!(env.recipients[0].encrypted_key.len(), 256);
        assert!(
            env.recipients[0]
                .id
                .contains("CN=Profile Manager S/MIME Identity"),
            "{}",
            env.recipients[0].id
        );
        assert_eq!(env.ciphertext.len() % 16, 0);
    }

    #[test]
    fn decrypted_text_and_json_are_not_taken_for_smime() {
        for f in [
            "apple-doc-token-decrypted-sample.txt",
            "synthetic-decrypted-token-with-markers.txt",
            "nanodep-decrypted-tokens.example.json",
        ] {
            let bytes = std::fs::read(format!("{FIXTURES}{f}")).unwrap();
            assert!(!is_smime(&bytes), "{f}");
        }
        assert!(matches!(
            unarmor(&std::fs::read(format!("{FIXTURES}apple-doc-token-decrypted-sample.txt")).unwrap()),
            Err(P7mError::NotSmime(m)) if m.contains("already-decrypted")
        ));
    }

    #[test]
    fn truncation_anywhere_is_reported_as_truncated_or_not_cms() {
        let cms = unarmor(&apple_sample()).unwrap();
        for cut in [1, 2, 10, 100, 400, cms.len() / 2, cms.len() - 3] {
            let err = parse_enveloped(&cms[..cut]).unwrap_err();
            assert!(matches!(err, P7mError::Truncated(_)), "cut at {cut}: {err}");
        }
    }

    #[test]
    fn garbage_is_not_cms() {
        assert!(matches!(
            parse_enveloped(b"\x04\x03abc"),
            Err(P7mError::NotCms(_))
        ));
        assert!(matches!(
            unarmor(b"Content-Type: application/pkcs7-mime\n\n!!!not base64!!!"),
            Err(P7mError::NotSmime(_))
        ));
        // Deep nesting is refused, not a stack overflow.
        let mut deep = Vec::new();
        for _ in 0..200 {
            deep.extend([0x30, 0x80]);
        }
        assert!(parse_enveloped(&deep).is_err());
    }

    #[test]
    fn a_key_everyone_can_read_or_a_passphrase_key_is_refused_with_the_fix() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let made = crate::token::admin::keygen("acme", dir.path(), 1, false).unwrap();
        std::fs::set_permissions(&made.key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = load_private_key(&made.key).unwrap_err().to_string();
        assert!(
            err.contains("mode 0644") && err.contains("chmod 600"),
            "{err}"
        );
        std::fs::set_permissions(&made.key, std::fs::Permissions::from_mode(0o640)).unwrap();
        let key = load_private_key(&made.key).unwrap();
        let locked = key
            .private_key_to_pem_pkcs8_passphrase(Cipher::aes_256_cbc(), b"pw")
            .unwrap();
        let p = dir.path().join("locked.key");
        std::fs::write(&p, locked).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = load_private_key(&p).unwrap_err().to_string();
        assert!(err.contains("passphrase"), "{err}");
        std::fs::write(&p, b"not a key").unwrap();
        let err = load_private_key(&p).unwrap_err().to_string();
        assert!(err.contains("not a PEM or DER private key"), "{err}");
    }

    #[test]
    fn object_identifiers_decode() {
        let t = Tlv {
            tag: TAG_OID,
            body: &[0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x07, 0x03],
            raw: &[],
        };
        assert_eq!(oid(t).unwrap(), OID_ENVELOPED_DATA);
        let t = Tlv {
            tag: TAG_OID,
            body: &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x01, 0x2A],
            raw: &[],
        };
        assert_eq!(oid(t).unwrap(), OID_AES256_CBC);
    }

    #[test]
    fn mime_headers_fold_and_stop_at_the_blank_line() {
        let (h, body) =
            split_headers("Content-Type: application/pkcs7-mime;\r\n name=x\r\n\r\nMIAG").unwrap();
        assert_eq!(h[0].1, "application/pkcs7-mime; name=x");
        assert_eq!(body, "MIAG");
        assert!(split_headers("{\"a\":1}").is_none());
    }
}
