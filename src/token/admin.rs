//! Server-token administration, as data: make the key pair Apple encrypts a token to
//! ([`keygen`]), check and install a downloaded token ([`import`]), and read every
//! configured token's expiry ([`token_statuses`]). Nothing here prints; `adesync token …`
//! turns the results into words.
//!
//! The life of a token (docs/apple-dep-api.md §2): adesync makes an RSA key pair and a
//! self-signed certificate; the admin uploads the certificate to ABM/ASM and downloads the
//! S/MIME `.p7m` token Apple encrypts to it; [`import`] checks that the file decrypts to a
//! valid, unexpired token of the same server and installs it where the config expects it.
//!
//! These functions take the config read leniently ([`LenientConfig`]) because they are
//! needed exactly when full validation fails: before the token file exists, or when it is
//! expired or broken. Files that hold secrets (private keys, token files) are created mode
//! 0600 and replaced atomically (temporary file, then rename), so a running daemon never
//! reads half a file and picks the new one up at its next run.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use crate::config::{check_name, redact_key, LenientConfig};
use crate::token::TokenExpiry;
use crate::token::{ServerToken, TokenError};

/// Default validity of the certificate keygen writes. Apple needs the certificate only to
/// encrypt the token at download time, and a renewal a year later reuses it, so it
/// outlives one renewal with margin.
pub const DEFAULT_CERT_DAYS: u32 = 730;

/// Why a token command failed. Never contains a secret.
#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    /// The token file or key is unusable, or the token expired.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// A name that cannot be a token name.
    #[error("--name: {0}")]
    Name(String),
    /// A file operation failed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Writing to standard output failed.
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
    /// keygen would replace a key.
    #[error("{path} already exists; it may be the key of a server whose tokens need it. Pass --force to replace it (then upload the new certificate and download a new token), or choose another --name or --dir")]
    Exists {
        /// The existing file.
        path: PathBuf,
    },
    /// OpenSSL failed to make the key pair.
    #[error("cannot generate the key pair: {0}")]
    Crypto(String),
    /// import was given an encrypted file but no key.
    #[error("{file} is encrypted; pass --key with the private key made by `adesync token keygen` (no key at {default}, and token \"{name}\" has no private_key_file)")]
    KeyNeeded {
        /// The token name.
        name: String,
        /// The downloaded file.
        file: PathBuf,
        /// Where the key was looked for.
        default: PathBuf,
    },
    /// import: the token belongs to another MDM server.
    #[error("this token belongs to another MDM server than the one installed for \"{name}\" (consumer key {new} instead of {installed}); installing it would mix two servers' devices under one name. Import the token of the same server, or configure it under a new name; to switch \"{name}\" to the other server, run `adesync token forget {name} --purge` and import again with --force")]
    OtherServer {
        /// The token name.
        name: String,
        /// The installed token's consumer key, shortened.
        installed: String,
        /// The new token's consumer key, shortened.
        new: String,
    },
    /// import: an older download than the installed token.
    #[error("this token (expires {new}) is older than the one installed for \"{name}\" (expires {installed}); Apple invalidates a token when a newer one is downloaded, so it would be refused. Import the newest download, or pass --force")]
    Older {
        /// The token name.
        name: String,
        /// Expiry of the installed token.
        installed: String,
        /// Expiry of the new token.
        new: String,
    },
    /// import: the config could not read what would be installed.
    #[error("token \"{name}\": {reason}")]
    Mismatch {
        /// The token name.
        name: String,
        /// What does not fit and what to change.
        reason: String,
    },
}

fn io_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> TokensError + 'a {
    move |source| TokensError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

// ---------------------------------------------------------------------------------------
// keygen

/// The files keygen wrote.
#[derive(Clone, Debug)]
pub struct KeyPair {
    /// The private key (PKCS#8 PEM, mode 0600).
    pub key: PathBuf,
    /// The self-signed certificate (PEM) to upload to ABM/ASM.
    pub cert: PathBuf,
}

/// Where keygen puts the files of token `name` in `dir`.
pub fn key_pair_paths(dir: &Path, name: &str) -> KeyPair {
    KeyPair {
        key: dir.join(format!("{name}.key")),
        cert: dir.join(format!("{name}.cert.pem")),
    }
}

/// Makes an RSA 2048 key and a self-signed certificate for it (docs/apple-dep-api.md §2.4: what NanoDEP and
/// zentral make), valid `days` days, and writes them to `dir`.
pub fn keygen(name: &str, dir: &Path, days: u32, force: bool) -> Result<KeyPair, TokensError> {
    check_name(name).map_err(TokensError::Name)?;
    let paths = key_pair_paths(dir, name);
    if !force {
        for p in [&paths.key, &paths.cert] {
            if p.exists() {
                return Err(TokensError::Exists { path: p.clone() });
            }
        }
    }
    std::fs::create_dir_all(dir).map_err(io_err("create the folder", dir))?;
    let (key_pem, cert_pem) =
        make_key_and_cert(name, days).map_err(|e| TokensError::Crypto(e.to_string()))?;
    write_atomically(&paths.key, &key_pem, 0o600).map_err(io_err("write", &paths.key))?;
    write_atomically(&paths.cert, &cert_pem, 0o644).map_err(io_err("write", &paths.cert))?;
    Ok(paths)
}

fn make_key_and_cert(
    name: &str,
    days: u32,
) -> Result<(Vec<u8>, Vec<u8>), openssl::error::ErrorStack> {
    use openssl::asn1::{Asn1Integer, Asn1Time};
    use openssl::bn::{BigNum, MsbOption};
    use openssl::hash::MessageDigest;
    use openssl::pkey::PKey;
    use openssl::rsa::Rsa;
    use openssl::x509::extension::{BasicConstraints, KeyUsage, SubjectKeyIdentifier};
    use openssl::x509::{X509NameBuilder, X509};

    let key = PKey::from_rsa(Rsa::generate(2048)?)?;
    let mut subject = X509NameBuilder::new()?;
    subject.append_entry_by_text("CN", &format!("adesync-{name}"))?;
    let subject = subject.build();
    let mut b = X509::builder()?;
    b.set_version(2)?;
    // A random serial: the token's recipient is named by issuer and serial, so two key
    // pairs made for the same name stay distinguishable in "wrong key" messages.
    let mut serial = BigNum::new()?;
    serial.rand(63, MsbOption::MAYBE_ZERO, false)?;
    let serial = Asn1Integer::from_bn(&serial)?;
    b.set_serial_number(&serial)?;
    b.set_subject_name(&subject)?;
    b.set_issuer_name(&subject)?;
    b.set_pubkey(&key)?;
    // Ten minutes back, for clocks that are slightly off (docs/apple-dep-api.md §2.4).
    let now = chrono::Utc::now().timestamp();
    let not_before = Asn1Time::from_unix(now - 600)?;
    let not_after = Asn1Time::days_from_now(days)?;
    b.set_not_before(&not_before)?;
    b.set_not_after(&not_after)?;
    b.append_extension(BasicConstraints::new().critical().build()?)?;
    b.append_extension(
        KeyUsage::new()
            .critical()
            .digital_signature()
            .key_encipherment()
            .build()?,
    )?;
    let ski = SubjectKeyIdentifier::new().build(&b.x509v3_context(None, None))?;
    b.append_extension(ski)?;
    b.sign(&key, MessageDigest::sha256())?;
    Ok((key.private_key_to_pem_pkcs8()?, b.build().to_pem()?))
}

// ---------------------------------------------------------------------------------------
// import

/// What import did.
#[derive(Debug)]
pub struct Imported {
    /// Where the token was written.
    pub target: PathBuf,
    /// The key that decrypted it (`None` for a decrypted input).
    pub key: Option<PathBuf>,
    /// The token (secrets redacted in `Debug`).
    pub token: ServerToken,
    /// The target received the decrypted JSON.
    pub wrote_plaintext: bool,
    /// The token is configured.
    pub configured: bool,
}

/// Checks `file` and installs it for token `name` (`adesync token import`).
/// `last_seen_consumer_key` is the consumer key the last sync of `name` saw (from the
/// database), used to refuse another server's token when the installed file cannot be
/// read.
pub fn import(
    cfg: &LenientConfig,
    name: &str,
    file: &Path,
    key: Option<&Path>,
    force: bool,
    last_seen_consumer_key: Option<&str>,
) -> Result<Imported, TokensError> {
    check_name(name).map_err(TokensError::Name)?;
    let entry = cfg.token(name);
    let bytes = std::fs::read(file).map_err(io_err("read", file))?;
    let encrypted = crate::token::p7m::is_smime(&bytes);
    let default_key = key_pair_paths(&cfg.dir, name).key;
    let key: Option<PathBuf> = key
        .map(Path::to_owned)
        .or_else(|| entry.and_then(|e| e.private_key_file.clone()))
        .or_else(|| default_key.exists().then(|| default_key.clone()));
    if encrypted && key.is_none() {
        return Err(TokensError::KeyNeeded {
            name: name.to_owned(),
            file: file.to_owned(),
            default: default_key,
        });
    }
    let token = ServerToken::load_with_key(file, key.as_deref())?;
    token.check_not_expired(name, file, chrono::Utc::now())?;

    let target = match entry {
        Some(e) => e.token_file.clone(),
        None => cfg
            .dir
            .join(format!("{name}.{}", if encrypted { "p7m" } else { "json" })),
    };
    let wrote_plaintext = target
        .extension()
        .is_some_and(|x| x.eq_ignore_ascii_case("json"));
    // What the config will decrypt the installed file with must be able to: refuse now
    // rather than leave a daemon with a token it cannot read.
    if let Some(e) = entry {
        if encrypted && !wrote_plaintext {
            match &e.private_key_file {
                None => {
                    return Err(TokensError::Mismatch {
                        name: name.to_owned(),
                        reason: format!(
                            "its token_file {} would hold the encrypted .p7m, but its [[tokens]] entry has no private_key_file; add private_key_file = {:?} and import again (or point token_file at a .json file to store the token decrypted)",
                            target.display(),
                            key.as_deref().unwrap_or(&default_key).display().to_string()
                        ),
                    })
                }
                Some(configured) if Some(configured) != key.as_ref() => {
                    ServerToken::load_with_key(file, Some(configured)).map_err(|err| {
                        TokensError::Mismatch {
                            name: name.to_owned(),
                            reason: format!(
                                "the configured private_key_file cannot decrypt this token ({err}); set private_key_file to the key that can, then import again"
                            ),
                        }
                    })?;
                }
                Some(_) => {}
            }
        }
    }

    // The token installed now, if it can be read; else the consumer key the last sync saw.
    let installed = target.exists().then(|| {
        let k = entry
            .and_then(|e| e.private_key_file.clone())
            .or_else(|| key.clone());
        ServerToken::load_with_key(&target, k.as_deref()).ok()
    });
    let installed = installed.flatten();
    let installed_key = match &installed {
        Some(t) => Some(t.consumer_key.clone()),
        None => last_seen_consumer_key.map(str::to_owned),
    };
    if !force {
        if let Some(k) = &installed_key {
            if *k != token.consumer_key {
                return Err(TokensError::OtherServer {
                    name: name.to_owned(),
                    installed: redact_key(k),
                    new: redact_key(&token.consumer_key),
                });
            }
        }
        if let Some(old) = &installed {
            if token.access_token_expiry < old.access_token_expiry {
                return Err(TokensError::Older {
                    name: name.to_owned(),
                    installed: old.access_token_expiry.to_rfc3339(),
                    new: token.access_token_expiry.to_rfc3339(),
                });
            }
        }
    }

    if let Some(parent) = target.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io_err("create the folder", parent))?;
    }
    let content = if wrote_plaintext {
        token.to_secret_json().into_bytes()
    } else {
        bytes
    };
    write_atomically(&target, &content, 0o600).map_err(io_err("write", &target))?;
    Ok(Imported {
        target,
        key: if encrypted { key } else { None },
        token,
        wrote_plaintext,
        configured: entry.is_some(),
    })
}

// ---------------------------------------------------------------------------------------
// list

/// One token's expiry, for `token list`.
#[derive(Clone, Debug)]
pub struct TokenFileStatus {
    /// Name.
    pub name: String,
    /// Token file.
    pub token_file: PathBuf,
    /// When it expires, if readable.
    pub expires: Option<chrono::DateTime<chrono::Utc>>,
    /// Whole days left (negative once expired).
    pub days_left: Option<i64>,
    /// `ok`, `expires soon` (30 days or less), `expired` or `unreadable`.
    pub status: &'static str,
    /// Why it is unreadable.
    pub error: Option<String>,
    /// Shortened consumer key.
    pub consumer_key: Option<String>,
    /// MDM server name from the last `GET /account` (filled in by callers that read the
    /// database).
    pub server_name: Option<String>,
}

/// Reads every configured token and says how long each has left.
pub fn token_statuses(
    cfg: &LenientConfig,
    now: chrono::DateTime<chrono::Utc>,
) -> Vec<TokenFileStatus> {
    cfg.tokens
        .iter()
        .map(|t| {
            let base = TokenFileStatus {
                name: t.name.clone(),
                token_file: t.token_file.clone(),
                expires: None,
                days_left: None,
                status: "unreadable",
                error: None,
                consumer_key: None,
                server_name: None,
            };
            match ServerToken::load_with_key(&t.token_file, t.private_key_file.as_deref()) {
                Ok(tok) => {
                    let days = tok.days_left(now);
                    TokenFileStatus {
                        expires: Some(tok.access_token_expiry),
                        days_left: Some(days),
                        status: TokenExpiry::of(tok.access_token_expiry, now).as_str(),
                        consumer_key: Some(redact_key(&tok.consumer_key)),
                        ..base
                    }
                }
                Err(e) => TokenFileStatus {
                    error: Some(e.to_string()),
                    ..base
                },
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename, so a
/// reader sees the old file or the new one, never half of one. A new file gets `mode`
/// from the moment it is created, so a secret is never readable by others even briefly.
/// A replaced file keeps its owner, group and mode (at most `mode` plus group read): the
/// yearly renewal, run as root, must leave the file readable by the service's user or
/// group exactly as before.
pub fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
    let existing = std::fs::metadata(path).ok();
    let mode = match &existing {
        Some(m) => (m.mode() & (mode | 0o040)) | 0o600,
        None => mode,
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("not a file path"))?
        .to_string_lossy();
    let tmp = path.with_file_name(format!(".{file_name}.tmp-{}", std::process::id()));
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        if let Some(m) = &existing {
            std::os::unix::fs::fchown(&f, Some(m.uid()), Some(m.gid())).map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "cannot keep the file's owner and group ({e}); run as root or as its owner"
                    ),
                )
            })?;
            // The umask may have narrowed the mode at creation; the old file's mode wins.
            f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        }
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn atomic_writes_create_secrets_0600_and_replace_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("acme.json");
        write_atomically(&p, b"one", 0o600).unwrap();
        write_atomically(&p, b"two", 0o600).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        // A file made readable by the service's group stays so when replaced; one made
        // readable by everyone does not.
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        write_atomically(&p, b"three", 0o600).unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o640
        );
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).unwrap();
        write_atomically(&p, b"four", 0o600).unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o640
        );
    }

    #[test]
    fn lenient_config_reads_paths_without_opening_token_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(
            &path,
            "database = \"a.db\"\nschedule = \"1m\"\n[[tokens]]\nname = \"acme\"\ntoken_file = \"missing.p7m\"\nprivate_key_file = \"/k/acme.key\"\npage_size = 5\n",
        )
        .unwrap();
        let c = LenientConfig::read(&path, true).unwrap();
        assert_eq!(c.database, dir.path().join("a.db"));
        let t = c.token("acme").unwrap();
        assert_eq!(t.token_file, dir.path().join("missing.p7m"));
        assert_eq!(
            t.private_key_file.as_deref(),
            Some(Path::new("/k/acme.key"))
        );
        // Missing: fine for keygen/import, an error for list/forget.
        let missing = dir.path().join("nope.toml");
        assert!(!LenientConfig::read(&missing, false).unwrap().exists);
        assert!(LenientConfig::read(&missing, true).is_err());
    }

    #[test]
    fn keygen_writes_a_usable_pair_and_never_overwrites_without_force() {
        let dir = tempfile::tempdir().unwrap();
        let made = keygen("acme", dir.path(), 2, false).unwrap();
        let mode = std::fs::metadata(&made.key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let key = crate::token::p7m::load_private_key(&made.key).unwrap();
        assert_eq!(key.rsa().unwrap().size(), 256);
        let cert = openssl::x509::X509::from_pem(&std::fs::read(&made.cert).unwrap()).unwrap();
        assert!(cert.public_key().unwrap().public_eq(&key));
        let cn = cert
            .subject_name()
            .entries()
            .next()
            .unwrap()
            .data()
            .to_string()
            .unwrap();
        assert_eq!(cn, "adesync-acme");

        let before = std::fs::read(&made.key).unwrap();
        let err = keygen("acme", dir.path(), 2, false).unwrap_err();
        assert!(matches!(err, TokensError::Exists { .. }), "{err}");
        assert_eq!(std::fs::read(&made.key).unwrap(), before, "untouched");
        keygen("acme", dir.path(), 2, true).unwrap();
        assert_ne!(std::fs::read(&made.key).unwrap(), before, "replaced");
        assert!(matches!(
            keygen("Acme Corp", dir.path(), 2, false),
            Err(TokensError::Name(_))
        ));
    }
}
