//! Benchmark floor: download and parse every fetch page, store nothing.
//!
//! `fetch_floor BASE_URL TOKEN_FILE EXPECTED` pages `POST /server/devices` at 1000 per page
//! through the same client and parser `adesync run` uses, and exits non-zero if the device
//! count differs from EXPECTED. Used by `bench/bench.py`.

use std::time::Duration;

use adesync::apple::{AppleClient, ClientSettings};
use adesync::config::RetryPolicy;
use adesync::token::ServerToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        args.len() == 4,
        "usage: fetch_floor BASE_URL TOKEN_FILE EXPECTED"
    );
    let token = ServerToken::load(std::path::Path::new(&args[2]))?;
    let expected: u64 = args[3].parse()?;
    let client = AppleClient::new(
        token,
        ClientSettings {
            base_url: reqwest::Url::parse(&args[1])?,
            user_agent: adesync::config::default_user_agent(),
            protocol_version: adesync::config::DEFAULT_PROTOCOL_VERSION,
            timeout: Duration::from_secs(60),
            retry: RetryPolicy::default(),
            max_response_bytes: adesync::apple::DEFAULT_MAX_RESPONSE_BYTES,
        },
    )?;
    let mut cursor: Option<String> = None;
    let mut devices = 0u64;
    loop {
        let page = client.fetch_devices(cursor.as_deref(), 1000).await?;
        devices += page.devices.len() as u64;
        // The first `expected` devices (all of them when it is the simulator's count).
        if !page.more_to_follow || devices >= expected {
            break;
        }
        cursor = Some(page.cursor);
    }
    anyhow::ensure!(
        devices >= expected,
        "fetched {devices} devices, expected {expected}"
    );
    Ok(())
}
