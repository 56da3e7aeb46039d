//! `adesync-mock`: runs the simulated ADE service on loopback for demos and manual testing,
//! optionally writing a decrypted server token a client can load. Stops cleanly on Ctrl-C or
//! SIGTERM.

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use adesync_mock::{MockConfig, MockHandle, OrgAccountConfig};

/// A simulator of Apple's ADE/DEP device-assignment service (mdmenrollment.apple.com).
///
/// Serves GET /session (OAuth 1.0a, depsim's public credentials), GET /account,
/// POST /server/devices and POST /devices/sync over a generated device population; with
/// X-Server-Protocol-Version 10 or later also the v10 device fields (imei, meid, eid, MAC
/// addresses, is_replacement_device, released_by_replacement on deletions) and
/// GET /device/replacementDetails?device=SERIAL (404 below version 10). Enrollment
/// profiles: POST|PUT /profile defines one (new 32-hex profile_uuid; its "devices" are
/// assigned at once), GET /profile?profile_uuid=U reads it, POST|PUT /profile/devices
/// {"profile_uuid":U,"devices":[..]} assigns it (at most 1000 serials; THROTTLED from
/// version 9, retry_after_seconds from 10), DELETE /profile/devices {"devices":[..]} takes
/// it off; each success is a "modified" sync record.
/// An admin API under /_mock changes the world while a client syncs:
///
///   POST /_mock/devices {"count":n}            assign n new devices
///   POST /_mock/devices/modify {"count":n}     change n devices (or {"serials":[..]})
///   POST /_mock/devices/delete {"count":n}     unassign (a sync reports "deleted")
///   POST /_mock/devices/release {"count":n}    remove with no sync record
///   POST /_mock/devices/replace {"count":n}    Apple replaces devices: "deleted" original,
///                                              "added" replacement (or {"serials":[..]})
///   POST /_mock/devices/reassign {"serials":[..]}   devices that left come back ("added")
///   POST /_mock/clock/advance {"seconds":n}    move the simulated clock
///   POST /_mock/faults {"endpoint":"fetch_devices","status":503,"headers":[["Retry-After","1"]]}
///                          (endpoints: session, account, fetch_devices, sync_devices,
///                          replacement_details, define_profile, get_profile,
///                          assign_profile, remove_profile, any)
///   POST /_mock/profiles/script {"status":"THROTTLED","count":n,"retry_after_seconds":s}
///                          the next n devices of assign calls answer FAILED, THROTTLED
///                          or NOT_ACCESSIBLE instead of SUCCESS
///   GET  /_mock/profiles                       the defined profiles
///   POST /_mock/sessions/expire                forget every session token
///   GET  /_mock/devices | /_mock/stats         the truth; counters
///
/// With --org-devices N it also simulates the Apple School and Business Manager API
/// (one account): POST /auth/oauth2/token (client credentials, ES256 JWT assertion with
/// aud https://account.apple.com/auth/oauth2/v2/token), GET /v1/orgDevices[/{serial}],
/// /v1/orgDevices/{serial}/relationships/assignedServer, /v1/orgDevices/{serial}/appleCareCoverage,
/// /v1/mdmServers and /v1/mdmServers/{id}/relationships/devices. Admin routes (bodies may
/// name "account", default 0):
///
///   POST /_mock/org/devices {"count":n,"server":null}   add n org devices (or to a server id)
///   POST /_mock/org/devices/modify {"count":n}          change colour/capacity/order number
///   POST /_mock/org/devices/release {"serials":[..]}    release from the organisation
///   POST /_mock/org/devices/assign {"count":n,"server":"ID"}   assign (null: unassign)
///   POST /_mock/org/tokens/expire                       expire every access token
///   POST /_mock/org/faults {"endpoint":"org_devices","status":429,"headers":[["Retry-After","1"]]}
///   POST /_mock/org/quirks {"list_values_as_strings":true,"purchase_source_uid":true,"future_field":true}
///   POST /_mock/org/rate {"requests_per_second":2}      limit (429 + Retry-After: 1); null lifts
///   GET  /_mock/org/devices | /_mock/org/stats | /_mock/org/accounts   truth; counters; ids
#[derive(Parser, Debug)]
#[command(name = "adesync-mock", version, verbatim_doc_comment)]
struct Args {
    /// Devices assigned to the MDM server at start.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    devices: usize,

    /// Port to listen on (0 picks a free one).
    #[arg(long, value_name = "P", default_value_t = 8080)]
    port: u16,

    /// Address to listen on. Loopback unless you say otherwise: the service accepts
    /// publicly known credentials.
    #[arg(long, value_name = "ADDR", default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
    host: IpAddr,

    /// Seed of the device generator; the same seed gives the same devices.
    #[arg(long, value_name = "S", default_value_t = 1)]
    seed: u64,

    /// Largest page size a fetch/sync may get; larger `limit`s are clamped.
    #[arg(long, value_name = "M", default_value_t = 1000)]
    max_limit: u32,

    /// Page size when a request names no `limit`.
    #[arg(long, value_name = "N", default_value_t = 100)]
    default_limit: u32,

    /// Write the decrypted server-token JSON (expiring in a year) to FILE, mode 0600, for the
    /// client to load.
    #[arg(long, value_name = "FILE")]
    write_token: Option<PathBuf>,

    /// Send error bodies as JSON strings ("EXPIRED_CURSOR"), as depsim does, instead of
    /// Apple's bare tokens.
    #[arg(long)]
    quoted_errors: bool,

    /// Hand out a new session token in the X-ADM-Auth-Session response header every N
    /// authenticated calls.
    #[arg(long, value_name = "N")]
    rotate_session_every: Option<u32>,

    /// Session tokens expire after this many seconds (simulated clock).
    #[arg(long, value_name = "SECONDS")]
    session_ttl: Option<u64>,

    /// Also simulate the Apple School and Business Manager API with one account holding the
    /// ADE devices plus N organisation-only devices. With --write-token FILE, the account's
    /// key (SEC1 PEM) and ids are written next to FILE as org-account.pem and
    /// org-account.json.
    #[arg(long, value_name = "N")]
    org_devices: Option<usize>,

    /// Make the --org-devices account a school (SCHOOLAPI., scope school.api) instead of a
    /// business (BUSINESSAPI., scope business.api).
    #[arg(long, requires = "org_devices")]
    org_school: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "adesync_mock=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("adesync-mock: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("adesync-mock: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let config = MockConfig {
        devices: args.devices,
        seed: args.seed,
        max_limit: args.max_limit,
        default_limit: args.default_limit,
        quoted_errors: args.quoted_errors,
        rotate_session_every: args.rotate_session_every,
        session_ttl: args.session_ttl.map(Duration::from_secs),
        org_accounts: args
            .org_devices
            .map(|n| {
                let account = if args.org_school {
                    OrgAccountConfig::school(args.seed)
                } else {
                    OrgAccountConfig::business(args.seed)
                };
                OrgAccountConfig {
                    devices: n,
                    ..account
                }
            })
            .into_iter()
            .collect(),
        ..MockConfig::default()
    };
    if let Some(path) = &args.write_token {
        let expiry = chrono::Utc::now() + chrono::Duration::days(365);
        write_private(path, &config.credentials.token_json(expiry))
            .map_err(|e| format!("cannot write the token to {}: {e}", path.display()))?;
    }
    if !args.host.is_loopback() {
        eprintln!(
            "adesync-mock: warning: listening on {} — anyone who can reach it can use the \
             public depsim credentials",
            args.host
        );
    }
    let addr = SocketAddr::new(args.host, args.port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let mock = adesync_mock::start_on(listener, config)
        .await
        .map_err(|e| format!("cannot start: {e}"))?;

    let url = mock.base_url();
    println!(
        "adesync-mock: {} devices (seed {}) at {url}",
        args.devices, args.seed
    );
    match &args.write_token {
        Some(path) => println!(
            "hint: set api_url = \"{url}\" and token_file = \"{}\" for a token in adesync's \
             config; change devices with e.g. curl -d '{{\"count\":5}}' {url}/_mock/devices",
            path.display()
        ),
        None => println!(
            "hint: set api_url = \"{url}\" for a token in adesync's config (--write-token FILE \
             writes a matching token); change devices with e.g. curl -d '{{\"count\":5}}' \
             {url}/_mock/devices"
        ),
    }
    if mock.org_account_count() > 0 {
        announce_org_account(&mock, args.write_token.as_deref())?;
    }
    // Demos pipe this output; make sure the URL shows before the first request.
    let _ = std::io::stdout().flush();

    wait_for_signal().await;
    tracing::info!("stopping");
    stop(&mock).await;
    Ok(())
}

/// Prints the organisation account's ids and, next to the server token if one was written,
/// writes its key (`org-account.pem`) and ids (`org-account.json`), both mode 0600.
fn announce_org_account(mock: &MockHandle, token_file: Option<&Path>) -> Result<(), String> {
    let info = mock.org_account(0);
    let stats = mock.org_stats(0);
    println!(
        "adesync-mock: Apple School and Business Manager API: {} org devices, client id {}, \
         key id {}, token URL {}",
        stats.devices,
        info.client_id,
        info.key_id,
        mock.org_token_url()
    );
    let Some(token_file) = token_file else {
        return Ok(());
    };
    let dir = token_file.parent().unwrap_or_else(|| Path::new("."));
    let key_path = dir.join("org-account.pem");
    let ids_path = dir.join("org-account.json");
    write_private(&key_path, info.private_key_pem.trim_end())
        .map_err(|e| format!("cannot write the org key to {}: {e}", key_path.display()))?;
    let ids = serde_json::json!({ "client_id": info.client_id, "key_id": info.key_id });
    write_private(&ids_path, &ids.to_string())
        .map_err(|e| format!("cannot write the org ids to {}: {e}", ids_path.display()))?;
    println!(
        "adesync-mock: wrote the org account key to {} and its ids to {}",
        key_path.display(),
        ids_path.display()
    );
    Ok(())
}

/// Creates or replaces `path` with `contents`, readable by the owner only.
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        options.mode(0o600);
        let mut file = options.open(path)?;
        // `mode` only applies to new files; tighten an existing one too.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        file.write_all(contents.as_bytes())?;
        file.write_all(b"\n")
    }
    #[cfg(not(unix))]
    {
        let mut file = options.open(path)?;
        file.write_all(contents.as_bytes())?;
        file.write_all(b"\n")
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Graceful stop, bounded: a client holding a connection open must not keep us alive.
async fn stop(mock: &MockHandle) {
    mock.shutdown();
    if tokio::time::timeout(Duration::from_secs(5), mock.stopped())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after 5 s; exiting anyway");
    }
}
