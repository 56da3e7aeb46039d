//! Server-token management for administrators: `adesync token keygen | import | list |
//! forget`.
//!
//! The life of a token (doc §2): adesync makes an RSA key pair and a self-signed
//! certificate ([`keygen`]); the admin uploads the certificate to ABM/ASM and downloads the
//! S/MIME `.p7m` token Apple encrypts to it; [`import`] checks that the file decrypts to a
//! valid, unexpired token of the same server and installs it where the config expects it;
//! `list` shows every token's expiry; `forget --purge` deletes a token's stored data.
//!
//! These commands read the config leniently ([`LenientConfig`]) because they are needed
//! exactly when full validation fails: before the token file exists, or when it is expired
//! or broken. Files that hold secrets (private keys, token files) are created mode 0600 and
//! replaced atomically (temporary file, then rename), so a running daemon never reads half
//! a file and picks the new one up at its next run.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;
use serde::Deserialize;

use crate::cli::Format;
use crate::config::{check_name, redact_key, ConfigError, DEFAULT_DATABASE};
use crate::store::{Store, StoreError, TokenFootprint};
use crate::token::{ServerToken, TokenError};

/// Default validity of the certificate keygen writes. Apple needs the certificate only to
/// encrypt the token at download time, and a renewal a year later reuses it, so it
/// outlives one renewal with margin.
pub const DEFAULT_CERT_DAYS: u32 = 730;

/// `adesync token …`.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make the key pair Apple encrypts your server token to.
    ///
    /// Writes DIR/NAME.key, the RSA 2048 private key (mode 0600; keep it, every token
    /// downloaded for this server is encrypted to it), and DIR/NAME.cert.pem, a self-signed
    /// certificate holding the public key, to upload to Apple Business Manager or Apple
    /// School Manager. DIR is --dir, else the config file's folder. Then it prints where to
    /// upload the certificate and what to do with the token you download.
    ///
    /// An existing key is never replaced without --force: tokens already downloaded for
    /// its certificate can only be decrypted with it.
    Keygen {
        /// The token's name, as in the config's `[[tokens]]` entry (a-z, 0-9, _ and -).
        #[arg(long)]
        name: String,
        /// Folder for the key and certificate (default: the config file's folder).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = DEFAULT_CERT_DAYS)]
        days: u32,
        /// Replace an existing key and certificate (tokens made for the old certificate
        /// will no longer decrypt: upload the new one and download a new token).
        #[arg(long)]
        force: bool,
    },
    /// Check a downloaded server token and install it where the config expects it.
    ///
    /// FILE is the *_smime.p7m you downloaded from Apple Business/School Manager (a
    /// decrypted token JSON works too). It is decrypted with --key, else the token's
    /// private_key_file, else DIR/NAME.key next to the config; its five fields and its
    /// expiry are checked; then it is written (mode 0600, atomically) to the token's
    /// token_file, or DIR/NAME.p7m when NAME is not configured yet. A token_file ending in
    /// .json receives the decrypted JSON; any other name receives the encrypted file as is.
    ///
    /// A token of another MDM server (another consumer key than the installed one) or an
    /// older download is refused unless --force. A running daemon needs no restart.
    Import {
        /// The token's name, as in the config's `[[tokens]]` entry.
        #[arg(long)]
        name: String,
        /// The downloaded token file.
        file: PathBuf,
        /// The private key to decrypt it with (default: the token's private_key_file).
        #[arg(long)]
        key: Option<PathBuf>,
        /// Install even if it belongs to another server or is older than the installed one.
        #[arg(long)]
        force: bool,
    },
    /// Show each configured token's expiry and days left.
    ///
    /// Exits 1 when any token is expired or cannot be read, so it works as a cron check.
    /// Tokens expire one year after download; renew with Download Token in ABM/ASM, then
    /// `adesync token import`.
    List {
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Delete everything stored for a token: devices, events, sync state, account.
    ///
    /// Without --purge it only says what would be deleted. Nothing of other tokens is
    /// touched. Files (token, key) and the config entry are left for you to remove; also
    /// remove the MDM server in Apple Business/School Manager if it is no longer used.
    Forget {
        /// The token's name.
        name: String,
        /// Really delete.
        #[arg(long)]
        purge: bool,
    },
}

impl TokenCommand {
    /// Whether the command needs an existing config file (keygen and import work before
    /// there is one).
    pub fn needs_config(&self) -> bool {
        matches!(
            self,
            TokenCommand::List { .. } | TokenCommand::Forget { .. }
        )
    }
}

/// Why a token command failed. Never contains a secret.
#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    /// The token file or key is unusable, or the token expired.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
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
// The config, read leniently.

/// What the token commands need from the config file: the database and each token's
/// files. Unlike [`crate::config::Config`] it neither opens the token files nor checks
/// other keys, so it works before a token is installed or when one is broken.
#[derive(Clone, Debug)]
pub struct LenientConfig {
    /// The config file.
    pub source: PathBuf,
    /// Whether it exists (keygen and import work without one).
    pub exists: bool,
    /// Its folder: default place for keys and tokens; anchors relative paths.
    pub dir: PathBuf,
    /// The SQLite database.
    pub database: PathBuf,
    /// The configured tokens' files.
    pub tokens: Vec<TokenFiles>,
}

/// One `[[tokens]]` entry's files.
#[derive(Clone, Debug)]
pub struct TokenFiles {
    /// The token's name.
    pub name: String,
    /// Its token file.
    pub token_file: PathBuf,
    /// Its private key, for a `.p7m` token file.
    pub private_key_file: Option<PathBuf>,
}

#[derive(Deserialize)]
struct LooseRaw {
    database: Option<PathBuf>,
    #[serde(default)]
    tokens: Vec<LooseToken>,
}

#[derive(Deserialize)]
struct LooseToken {
    name: String,
    token_file: PathBuf,
    private_key_file: Option<PathBuf>,
}

impl LenientConfig {
    /// Reads `path`. A missing file is an error only when `required`.
    pub fn read(path: &Path, required: bool) -> Result<Self, ConfigError> {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        // Absolute, because these paths are printed for people to copy into the config.
        let dir = std::path::absolute(&dir).unwrap_or(dir);
        let resolve = |p: PathBuf| if p.is_absolute() { p } else { dir.join(p) };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                return Ok(Self {
                    source: path.to_owned(),
                    exists: false,
                    database: PathBuf::from(DEFAULT_DATABASE),
                    dir,
                    tokens: Vec::new(),
                })
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })
            }
        };
        let raw: LooseRaw = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        let tokens = raw
            .tokens
            .into_iter()
            .map(|t| TokenFiles {
                name: t.name,
                token_file: resolve(t.token_file),
                private_key_file: t.private_key_file.map(resolve),
            })
            .collect();
        Ok(Self {
            source: path.to_owned(),
            exists: true,
            database: resolve(
                raw.database
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_DATABASE)),
            ),
            dir: dir.clone(),
            tokens,
        })
    }

    /// The entry named `name`.
    pub fn token(&self, name: &str) -> Option<&TokenFiles> {
        self.tokens.iter().find(|t| t.name == name)
    }

    fn open_store(&self) -> Result<Option<Store>, TokensError> {
        if !self.database.exists() {
            return Ok(None);
        }
        Ok(Some(Store::open(&self.database)?))
    }
}

/// Runs a token command.
pub fn run(cfg: &LenientConfig, cmd: TokenCommand) -> Result<ExitCode, TokensError> {
    match cmd {
        TokenCommand::Keygen {
            name,
            dir,
            days,
            force,
        } => {
            let dir = dir
                .map(|d| std::path::absolute(&d).unwrap_or(d))
                .unwrap_or_else(|| cfg.dir.clone());
            let made = keygen(&name, &dir, days, force)?;
            print_keygen(cfg, &name, &made)?;
            Ok(ExitCode::SUCCESS)
        }
        TokenCommand::Import {
            name,
            file,
            key,
            force,
        } => {
            let done = import(cfg, &name, &file, key.as_deref(), force)?;
            print_import(cfg, &name, &done)?;
            Ok(ExitCode::SUCCESS)
        }
        TokenCommand::List { format } => list(cfg, format),
        TokenCommand::Forget { name, purge } => forget(cfg, &name, purge),
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

/// Makes an RSA 2048 key and a self-signed certificate for it (doc §2.4: what NanoDEP and
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
    // Ten minutes back, for clocks that are slightly off (doc §2.4).
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

fn print_keygen(cfg: &LenientConfig, name: &str, made: &KeyPair) -> Result<(), TokensError> {
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "Wrote the private key  {}  (mode 0600; keep it: every token for this server is encrypted to it)",
        made.key.display()
    )?;
    writeln!(
        out,
        "Wrote the certificate  {}  (public; this is what you upload)",
        made.cert.display()
    )?;
    writeln!(out)?;
    writeln!(out, "Next:")?;
    writeln!(out, "  1. Sign in to Apple Business Manager (https://business.apple.com) or Apple School Manager")?;
    writeln!(
        out,
        "     (https://school.apple.com) as an Administrator or Device Enrollment Manager."
    )?;
    writeln!(out, "  2. Preferences → Your MDM Servers → Add (or select the server and Edit). Name it, upload")?;
    writeln!(
        out,
        "     {} as its public key, and save.",
        made.cert.display()
    )?;
    writeln!(
        out,
        "  3. Select the server and click Download Token. Apple's file is named"
    )?;
    writeln!(out, "     <server>_Token_<date>_smime.p7m.")?;
    writeln!(out, "  4. Check and install it:")?;
    writeln!(
        out,
        "       adesync --config {} token import --name {name} <server>_Token_<date>_smime.p7m",
        cfg.source.display()
    )?;
    if let Some(t) = cfg.token(name) {
        if t.private_key_file.as_deref() != Some(made.key.as_path()) {
            writeln!(out)?;
            writeln!(
                out,
                "Token \"{name}\" in {} needs private_key_file = {:?} in its [[tokens]] entry.",
                cfg.source.display(),
                made.key.display().to_string()
            )?;
        }
    }
    Ok(())
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

/// Checks `file` and installs it for token `name` (see [`TokenCommand::Import`]).
pub fn import(
    cfg: &LenientConfig,
    name: &str,
    file: &Path,
    key: Option<&Path>,
    force: bool,
) -> Result<Imported, TokensError> {
    check_name(name).map_err(TokensError::Name)?;
    let entry = cfg.token(name);
    let bytes = std::fs::read(file).map_err(io_err("read", file))?;
    let encrypted = crate::p7m::is_smime(&bytes);
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
        None => cfg
            .open_store()?
            .map(|s| s.account(name))
            .transpose()?
            .flatten()
            .and_then(|a| a.consumer_key),
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

fn print_import(cfg: &LenientConfig, name: &str, done: &Imported) -> Result<(), TokensError> {
    let mut out = std::io::stdout().lock();
    let days = done.token.days_left(chrono::Utc::now());
    writeln!(
        out,
        "Token for \"{name}\" is valid: consumer key {}, expires {} ({days} days).",
        redact_key(&done.token.consumer_key),
        done.token
            .access_token_expiry
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    )?;
    writeln!(
        out,
        "Installed {} (mode 0600{}).",
        done.target.display(),
        if done.wrote_plaintext {
            ", decrypted: it holds the secrets in clear"
        } else {
            ", encrypted as downloaded"
        }
    )?;
    if done.configured {
        writeln!(
            out,
            "The next sync uses it; a running daemon needs no restart."
        )?;
    } else {
        writeln!(out)?;
        if cfg.exists {
            writeln!(
                out,
                "\"{name}\" is not in {} yet; add:",
                cfg.source.display()
            )?;
        } else {
            writeln!(
                out,
                "There is no config file at {} yet; start it with (see config.example.toml):",
                cfg.source.display()
            )?;
        }
        writeln!(out)?;
        writeln!(out, "[[tokens]]")?;
        writeln!(out, "name = {name:?}")?;
        writeln!(out, "token_file = {:?}", done.target.display().to_string())?;
        if let Some(k) = &done.key {
            writeln!(out, "private_key_file = {:?}", k.display().to_string())?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// list

/// One token's expiry, for `token list`.
#[derive(Clone, Debug)]
pub struct TokenStatus {
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
    /// MDM server name from the last `GET /account`.
    pub server_name: Option<String>,
}

/// Reads every configured token and says how long each has left.
pub fn token_statuses(
    cfg: &LenientConfig,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Vec<TokenStatus>, TokensError> {
    let accounts = match cfg.open_store()? {
        Some(s) => s.accounts()?,
        None => Vec::new(),
    };
    Ok(cfg
        .tokens
        .iter()
        .map(|t| {
            let server_name = accounts
                .iter()
                .find(|a| a.token_name == t.name)
                .and_then(|a| a.server_name.clone());
            let base = TokenStatus {
                name: t.name.clone(),
                token_file: t.token_file.clone(),
                expires: None,
                days_left: None,
                status: "unreadable",
                error: None,
                consumer_key: None,
                server_name,
            };
            match ServerToken::load_with_key(&t.token_file, t.private_key_file.as_deref()) {
                Ok(tok) => {
                    let days = tok.days_left(now);
                    TokenStatus {
                        expires: Some(tok.access_token_expiry),
                        days_left: Some(days),
                        status: if now >= tok.access_token_expiry {
                            "expired"
                        } else if tok.access_token_expiry - now <= chrono::Duration::days(30) {
                            "expires soon"
                        } else {
                            "ok"
                        },
                        consumer_key: Some(redact_key(&tok.consumer_key)),
                        ..base
                    }
                }
                Err(e) => TokenStatus {
                    error: Some(e.to_string()),
                    ..base
                },
            }
        })
        .collect())
}

fn list(cfg: &LenientConfig, format: Format) -> Result<ExitCode, TokensError> {
    let statuses = token_statuses(cfg, chrono::Utc::now())?;
    let mut out = std::io::stdout().lock();
    let expiry = |s: &TokenStatus| {
        s.expires
            .map(|e| e.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            .unwrap_or_default()
    };
    match format {
        Format::Json => {
            for s in &statuses {
                let v = serde_json::json!({
                    "token": s.name,
                    "token_file": s.token_file.display().to_string(),
                    "expires": s.expires.map(|_| expiry(s)),
                    "days_left": s.days_left,
                    "status": s.status,
                    "error": s.error,
                    "consumer_key": s.consumer_key,
                    "server_name": s.server_name,
                });
                writeln!(out, "{v}")?;
            }
        }
        Format::Csv | Format::Table => {
            let header = [
                "token",
                "expires",
                "days_left",
                "status",
                "server_name",
                "consumer_key",
                "token_file",
            ];
            let rows: Vec<Vec<String>> = statuses
                .iter()
                .map(|s| {
                    vec![
                        s.name.clone(),
                        expiry(s),
                        s.days_left.map(|d| d.to_string()).unwrap_or_default(),
                        s.status.to_owned(),
                        s.server_name.clone().unwrap_or_default(),
                        s.consumer_key.clone().unwrap_or_default(),
                        s.token_file.display().to_string(),
                    ]
                })
                .collect();
            if format == Format::Csv {
                writeln!(out, "{}", header.join(","))?;
                for r in &rows {
                    let cells: Vec<String> = r.iter().map(|c| crate::cli::csv_cell(c)).collect();
                    writeln!(out, "{}", cells.join(","))?;
                }
            } else {
                crate::cli::write_table(&mut out, &header, &rows)?;
            }
        }
    }
    drop(out);
    let mut failed = false;
    for s in &statuses {
        if let Some(e) = &s.error {
            eprintln!("error: token \"{}\": {e}", s.name);
            failed = true;
        } else if s.status == "expired" {
            eprintln!("error: token \"{}\" has expired; in Apple Business/School Manager open Preferences → your MDM server → Download Token, then `adesync token import --name {} FILE`", s.name, s.name);
            failed = true;
        } else if s.status == "expires soon" {
            eprintln!("warning: token \"{}\" expires in {} days; renew it soon (Download Token in Apple Business/School Manager, then `adesync token import --name {} FILE`)", s.name, s.days_left.unwrap_or(0), s.name);
        }
    }
    if statuses.is_empty() {
        eprintln!("no [[tokens]] in {}", cfg.source.display());
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

// ---------------------------------------------------------------------------------------
// forget

fn describe(f: &TokenFootprint) -> String {
    let n = |count: u64, one: &str, many: &str| {
        format!("{count} {}", if count == 1 { one } else { many })
    };
    format!(
        "{}, {}, {}, {}",
        n(f.devices, "device", "devices"),
        n(f.events, "event", "events"),
        n(f.sync_state, "sync state row", "sync state rows"),
        n(f.account, "account row", "account rows"),
    )
}

fn forget(cfg: &LenientConfig, name: &str, purge: bool) -> Result<ExitCode, TokensError> {
    let Some(mut store) = cfg.open_store()? else {
        println!(
            "Nothing is stored for \"{name}\": database {} does not exist.",
            cfg.database.display()
        );
        return Ok(ExitCode::SUCCESS);
    };
    let found = store.token_footprint(name)?;
    if found.is_empty() {
        let others = store.stored_token_names()?;
        println!(
            "Nothing is stored for \"{name}\" in {}{}.",
            cfg.database.display(),
            if others.is_empty() {
                String::new()
            } else {
                format!(" (stored tokens: {})", others.join(", "))
            }
        );
        return Ok(ExitCode::SUCCESS);
    }
    let configured = cfg.token(name).is_some();
    if !purge {
        println!("Stored for \"{name}\": {}.", describe(&found));
        println!("Nothing was deleted; run again with --purge to delete them.");
        if configured {
            println!(
                "Note: \"{name}\" is still in {}; unless you remove its [[tokens]] entry, the next sync fetches everything again.",
                cfg.source.display()
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let deleted = store.purge_token(name)?;
    println!("Deleted for \"{name}\": {}.", describe(&deleted));
    println!("Other tokens were not touched.");
    println!();
    println!("Also:");
    println!("  - remove the MDM server in Apple Business/School Manager (Preferences → Your MDM Servers)");
    println!("    if it is no longer used, so Apple stops assigning devices to it;");
    if configured {
        println!(
            "  - remove the [[tokens]] entry \"{name}\" from {} (else the next sync fetches everything again),",
            cfg.source.display()
        );
        println!("    and delete its token file and private key.");
    } else {
        println!("  - delete its token file and private key if they are still around.");
    }
    Ok(ExitCode::SUCCESS)
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
        let key = crate::p7m::load_private_key(&made.key).unwrap();
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
