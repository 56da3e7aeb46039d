//! `adesync token keygen | import | list | forget`: the words around
//! [`adesync::token::admin`], which does the work and returns data.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;

use super::render::{csv_cell, write_table, Format};
use adesync::config::{redact_key, LenientConfig};
use adesync::store::Database;
use adesync::store::{Store, TokenFootprint};
use adesync::token::admin::{
    import, keygen, token_statuses, Imported, KeyPair, TokenFileStatus, DEFAULT_CERT_DAYS,
};

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

/// Runs a token command.
pub fn run(cfg: &LenientConfig, cmd: TokenCommand) -> anyhow::Result<ExitCode> {
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
            let last_seen = open_for_reading(&cfg.database)?
                .map(|s| s.account(&name))
                .transpose()?
                .flatten()
                .and_then(|a| a.consumer_key);
            let done = import(
                cfg,
                &name,
                &file,
                key.as_deref(),
                force,
                last_seen.as_deref(),
            )?;
            print_import(cfg, &name, &done)?;
            Ok(ExitCode::SUCCESS)
        }
        TokenCommand::List { format } => list(cfg, format),
        TokenCommand::Forget { name, purge } => forget(cfg, &name, purge),
    }
}

fn print_keygen(cfg: &LenientConfig, name: &str, made: &KeyPair) -> anyhow::Result<()> {
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

fn print_import(cfg: &LenientConfig, name: &str, done: &Imported) -> anyhow::Result<()> {
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

fn list(cfg: &LenientConfig, format: Format) -> anyhow::Result<ExitCode> {
    let mut statuses = token_statuses(cfg, chrono::Utc::now());
    if let Some(store) = open_for_reading(&cfg.database)? {
        let accounts = store.accounts()?;
        for s in &mut statuses {
            s.server_name = accounts
                .iter()
                .find(|a| a.token_name == s.name)
                .and_then(|a| a.server_name.clone());
        }
    }
    let mut out = std::io::stdout().lock();
    let expiry = |s: &TokenFileStatus| {
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
                    let cells: Vec<String> = r.iter().map(|c| csv_cell(c)).collect();
                    writeln!(out, "{}", cells.join(","))?;
                }
            } else {
                write_table(&mut out, &header, &rows)?;
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

fn forget(cfg: &LenientConfig, name: &str, purge: bool) -> anyhow::Result<ExitCode> {
    let Some(mut store) = Store::open_if_exists(&cfg.database)? else {
        outln!(
            "Nothing is stored for \"{name}\": database {} does not exist.",
            cfg.database.display()
        );
        return Ok(ExitCode::SUCCESS);
    };
    let found = store.token_footprint(name)?;
    if found.is_empty() {
        let others = store.stored_token_names()?;
        outln!(
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
        outln!("Stored for \"{name}\": {}.", describe(&found));
        outln!("Nothing was deleted; run again with --purge to delete them.");
        if configured {
            outln!(
                "Note: \"{name}\" is still in {}; unless you remove its [[tokens]] entry, the next sync fetches everything again.",
                cfg.source.display()
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let deleted = store.purge_token(name)?;
    outln!("Deleted for \"{name}\": {}.", describe(&deleted));
    outln!("Other tokens were not touched.");
    outln!();
    outln!("Also:");
    outln!("  - remove the MDM server in Apple Business/School Manager (Preferences → Your MDM Servers)");
    outln!("    if it is no longer used, so Apple stops assigning devices to it;");
    if configured {
        outln!(
            "  - remove the [[tokens]] entry \"{name}\" from {} (else the next sync fetches everything again),",
            cfg.source.display()
        );
        outln!("    and delete its token file and private key.");
    } else {
        outln!("  - delete its token file and private key if they are still around.");
    }
    Ok(ExitCode::SUCCESS)
}

/// The database for reading, when there is one (read-only: these commands never write).
pub(super) fn open_for_reading(path: &Database) -> anyhow::Result<Option<Store>> {
    Ok(Store::open_read_only_if_exists(path)?)
}
