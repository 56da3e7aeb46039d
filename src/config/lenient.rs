//! The config read leniently, for the token commands: the database and each token's
//! files, nothing else checked, so they work before a token is installed or when one is
//! broken.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::Database;
use super::{ConfigError, DEFAULT_DATABASE};

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
    /// The mirror's database.
    pub database: Database,
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
    database_password_file: Option<PathBuf>,
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
                    database: Database::Sqlite(PathBuf::from(DEFAULT_DATABASE)),
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
            database: match raw.database {
                Some(url) if Database::is_url(&url.to_string_lossy()) => Database::postgres(
                    &url.to_string_lossy(),
                    raw.database_password_file.map(&resolve),
                )
                .map_err(|reason| ConfigError::Invalid {
                    path: path.to_owned(),
                    key: "database".into(),
                    reason,
                })?,
                p => Database::Sqlite(resolve(
                    p.unwrap_or_else(|| PathBuf::from(DEFAULT_DATABASE)),
                )),
            },
            dir: dir.clone(),
            tokens,
        })
    }

    /// The entry named `name`.
    pub fn token(&self, name: &str) -> Option<&TokenFiles> {
        self.tokens.iter().find(|t| t.name == name)
    }
}
