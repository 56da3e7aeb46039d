//! Where the mirror lives: an SQLite file (the default) or a PostgreSQL database named by a
//! `postgres://` URL. Parsed once from the config's `database`; the password is never
//! kept in the URL text that is shown.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// The configured database.
#[derive(Clone, PartialEq)]
pub enum Database {
    /// An SQLite file (created if missing).
    Sqlite(PathBuf),
    /// A PostgreSQL server.
    Postgres(Box<PgTarget>),
}

/// A PostgreSQL database as configured: the URL (password removed) and where the
/// password comes from.
#[derive(Clone)]
pub struct PgTarget {
    /// The URL as shown: user, host, port, database and options, no password.
    shown: String,
    /// The connection settings, password not yet filled in.
    config: postgres::Config,
    /// A password the URL carried (discouraged: it shows in `ps` and shell history).
    url_password: Option<Vec<u8>>,
    /// `database_password_file`, read at each connect so a rotated password takes effect.
    password_file: Option<PathBuf>,
    /// Whether TLS is required (any host that is not loopback or a unix socket).
    tls: bool,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Database::Sqlite(p) => f.debug_tuple("Sqlite").field(p).finish(),
            Database::Postgres(t) => f.debug_tuple("Postgres").field(&t.shown).finish(),
        }
    }
}

impl std::fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgTarget")
            .field("url", &self.shown)
            .field("password_file", &self.password_file)
            .finish_non_exhaustive()
    }
}

impl PartialEq for PgTarget {
    fn eq(&self, other: &Self) -> bool {
        self.shown == other.shown
            && self.url_password == other.url_password
            && self.password_file == other.password_file
    }
}

impl PartialEq<PathBuf> for Database {
    fn eq(&self, other: &PathBuf) -> bool {
        matches!(self, Database::Sqlite(p) if p == other)
    }
}

impl From<&Path> for Database {
    fn from(p: &Path) -> Self {
        Database::Sqlite(p.to_owned())
    }
}

impl From<&PathBuf> for Database {
    fn from(p: &PathBuf) -> Self {
        Database::Sqlite(p.clone())
    }
}

impl From<PathBuf> for Database {
    fn from(p: PathBuf) -> Self {
        Database::Sqlite(p)
    }
}

impl From<&Database> for Database {
    fn from(d: &Database) -> Self {
        d.clone()
    }
}

/// The database as shown in messages: the file's path, or the URL without a password.
pub struct Shown<'a>(&'a Database);

impl std::fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Database::Sqlite(p) => write!(f, "{}", p.display()),
            Database::Postgres(t) => f.write_str(&t.shown),
        }
    }
}

impl Database {
    /// Whether `text` names a PostgreSQL database rather than a file.
    pub fn is_url(text: &str) -> bool {
        let t = text.trim_start();
        t.starts_with("postgres://") || t.starts_with("postgresql://")
    }

    /// Parses a `postgres://` URL. `password_file`: the config's `database_password_file`.
    pub fn postgres(url: &str, password_file: Option<PathBuf>) -> Result<Self, String> {
        PgTarget::parse(url, password_file).map(|t| Database::Postgres(Box::new(t)))
    }

    /// For messages: the path, or the URL without its password.
    pub fn display(&self) -> Shown<'_> {
        Shown(self)
    }

    /// The SQLite file, if it is one.
    pub fn as_path(&self) -> Option<&Path> {
        match self {
            Database::Sqlite(p) => Some(p),
            Database::Postgres(_) => None,
        }
    }

    /// Whether it is PostgreSQL.
    pub fn is_postgres(&self) -> bool {
        matches!(self, Database::Postgres(_))
    }
}

/// Waits at most this long for a server to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl PgTarget {
    fn parse(url: &str, password_file: Option<PathBuf>) -> Result<Self, String> {
        let parsed = url::Url::parse(url.trim()).map_err(|e| {
            format!("{e}; write it as postgres://USER@HOST:5432/DATABASE (see the README)")
        })?;
        let mode = parsed
            .query_pairs()
            .find(|(k, _)| k == "sslmode")
            .map(|(_, v)| v.into_owned());
        if let Some(other) = mode
            .as_deref()
            .filter(|m| !["disable", "prefer", "require"].contains(m))
        {
            return Err(format!(
                "sslmode={:?} is not supported; use require (TLS, the server's certificate checked against this machine's trusted CAs) or, on this machine only, disable",
                crate::model::printable(other)
            ));
        }
        let mut config: postgres::Config = url.trim().parse().map_err(|e| {
            format!("{e}; write it as postgres://USER@HOST:5432/DATABASE?sslmode=require")
        })?;
        if config.get_dbname().is_none() {
            return Err("names no database; add it after the host, e.g. postgres://adesync@db.example.com/adesync".into());
        }
        if config.get_user().is_none() {
            return Err("names no user; add it before the host, e.g. postgres://adesync@db.example.com/adesync".into());
        }
        let url_password = config.get_password().map(<[u8]>::to_vec);
        // Remote hosts always get TLS: the mirror and the password would otherwise cross
        // the network in clear. Loopback and unix sockets may go without.
        let local = config.get_hosts().iter().all(|h| match h {
            postgres::config::Host::Tcp(name) => {
                name == "localhost"
                    || name
                        .trim_matches(['[', ']'])
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            }
            postgres::config::Host::Unix(_) => true,
        });
        let tls = match mode.as_deref() {
            None => !local,
            Some("disable" | "prefer") if local => false,
            Some("require") => true,
            _ => return Err(format!(
                "sslmode={} would let the mirror and the password cross the network in clear; \
                 remove it (adesync always uses TLS to a host that is not this machine) or use sslmode=require",
                mode.as_deref().unwrap_or_default()
            )),
        };
        config.ssl_mode(if tls {
            postgres::config::SslMode::Require
        } else {
            postgres::config::SslMode::Disable
        });
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("adesync");
        }
        // A server that stops answering (a cut network) is noticed, not waited on forever.
        config.keepalives(true);
        config.keepalives_idle(Duration::from_secs(30));
        let mut shown = parsed.clone();
        let _ = shown.set_password(None);
        // A password may also come as a query parameter; it is never shown either.
        let kept: Vec<(String, String)> = parsed
            .query_pairs()
            .filter(|(k, _)| k != "password")
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        if kept.is_empty() {
            shown.set_query(None);
        } else {
            shown.query_pairs_mut().clear().extend_pairs(kept);
        }
        Ok(PgTarget {
            shown: shown.to_string(),
            config,
            url_password,
            password_file,
            tls,
        })
    }

    /// The URL as shown (no password).
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// `database_password_file`, if set.
    pub fn password_file(&self) -> Option<&Path> {
        self.password_file.as_deref()
    }

    /// The connection settings with the password filled in: the URL's, else
    /// `database_password_file`'s first line, else `PGPASSWORD`, else none (trust or peer
    /// authentication).
    pub(crate) fn connect_config(&self) -> Result<(postgres::Config, bool), String> {
        let mut config = self.config.clone();
        if let Some(p) = &self.url_password {
            config.password(p);
        } else if let Some(file) = &self.password_file {
            let text = std::fs::read_to_string(file).map_err(|e| {
                format!(
                    "cannot read database_password_file {}: {e}; check the path and that this user may read it",
                    file.display()
                )
            })?;
            let line = text.lines().next().unwrap_or_default();
            config.password(line.trim_end_matches('\r'));
        } else if let Ok(p) = std::env::var("PGPASSWORD") {
            config.password(p);
        }
        Ok((config, self.tls))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_select_postgres_and_never_show_the_password() {
        let d = Database::postgres("postgres://u:secret@127.0.0.1:5433/mirror", None).unwrap();
        let shown = d.display().to_string();
        assert!(!shown.contains("secret"), "{shown}");
        assert!(shown.contains("127.0.0.1:5433/mirror"), "{shown}");
        assert!(!format!("{d:?}").contains("secret"));
        let Database::Postgres(t) = &d else { panic!() };
        let (c, tls) = t.connect_config().unwrap();
        assert_eq!(c.get_password(), Some(&b"secret"[..]));
        assert!(!tls, "loopback goes without TLS unless asked");
    }

    #[test]
    fn a_password_given_as_a_query_parameter_is_not_shown_either() {
        let d = Database::postgres(
            "postgres://u@127.0.0.1/m?password=Qx7-secret&application_name=a",
            None,
        )
        .unwrap();
        let shown = d.display().to_string();
        assert!(!shown.contains("Qx7-secret"), "{shown}");
        assert!(shown.contains("application_name=a"), "{shown}");
        assert!(!format!("{d:?}").contains("Qx7-secret"));
        let Database::Postgres(t) = &d else { panic!() };
        assert_eq!(
            t.connect_config().unwrap().0.get_password(),
            Some(&b"Qx7-secret"[..])
        );
    }

    #[test]
    fn remote_hosts_get_tls_and_refuse_plain_text() {
        let d = Database::postgres("postgres://u@db.example.com/m", None).unwrap();
        let Database::Postgres(t) = &d else { panic!() };
        assert!(t.connect_config().unwrap().1);
        let e =
            Database::postgres("postgres://u@db.example.com/m?sslmode=disable", None).unwrap_err();
        assert!(e.contains("in clear"), "{e}");
        let e = Database::postgres("postgres://u@localhost/m?sslmode=verify-ca", None).unwrap_err();
        assert!(e.contains("not supported"), "{e}");
        assert!(Database::postgres("postgres://u@localhost/", None)
            .unwrap_err()
            .contains("names no database"));
        assert!(Database::postgres("postgres://localhost/m", None)
            .unwrap_err()
            .contains("names no user"));
    }

    #[test]
    fn the_password_file_is_read_at_connect() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "from-file\n").unwrap();
        let d = Database::postgres("postgres://u@127.0.0.1/m", Some(file.clone())).unwrap();
        let Database::Postgres(t) = &d else { panic!() };
        assert_eq!(
            t.connect_config().unwrap().0.get_password(),
            Some(&b"from-file"[..])
        );
        std::fs::remove_file(&file).unwrap();
        let e = t.connect_config().unwrap_err();
        assert!(e.contains("database_password_file"), "{e}");
    }
}
