//! `adesync-mock`: runs the simulated ADE service on loopback for demos and manual testing,
//! optionally writing a decrypted server token a client can load. Stops cleanly on Ctrl-C or
//! SIGTERM.

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use adesync_mock::{MockConfig, MockHandle};

/// A simulator of Apple's ADE/DEP device-assignment service (mdmenrollment.apple.com).
///
/// Serves GET /session (OAuth 1.0a, depsim's public credentials), GET /account,
/// POST /server/devices and POST /devices/sync over a generated device population.
/// An admin API under /_mock changes the world while a client syncs:
///
///   POST /_mock/devices {"count":n}            assign n new devices
///   POST /_mock/devices/modify {"count":n}     change n devices (or {"serials":[..]})
///   POST /_mock/devices/delete {"count":n}     unassign (a sync reports "deleted")
///   POST /_mock/devices/release {"count":n}    remove with no sync record
///   POST /_mock/clock/advance {"seconds":n}    move the simulated clock
///   POST /_mock/faults {"endpoint":"fetch_devices","status":503,"headers":[["Retry-After","1"]]}
///   POST /_mock/sessions/expire                forget every session token
///   GET  /_mock/devices | /_mock/stats         the truth; counters
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
    // Demos pipe this output; make sure the URL shows before the first request.
    let _ = std::io::stdout().flush();

    wait_for_signal().await;
    tracing::info!("stopping");
    stop(&mock).await;
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
