//! Benchmark floor of the organisation walk: download and parse every orgDevices page,
//! store nothing.
//!
//! `org_fetch_floor CONFIG EXPECTED` loads CONFIG as `adesync run` does, takes its first
//! `[[org_accounts]]` entry and pages `GET /v1/orgDevices` (the account's `page_size`)
//! through the same client (`OrgClient`: assertion, access token, request budget) and
//! parser (`orgapi::device::org_device`) the walk uses, and exits non-zero if the number of
//! devices read differs from EXPECTED or a resource is refused. Used by `bench/bench.py`.

use adesync::config::Config;
use adesync::orgapi::{device, OrgClient};
use adesync::syncer::org_client_settings;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(args.len() == 3, "usage: org_fetch_floor CONFIG EXPECTED");
    let config = Config::load(std::path::Path::new(&args[1]))?;
    let expected: u64 = args[2].parse()?;
    let account = config
        .org_accounts
        .first()
        .ok_or_else(|| anyhow::anyhow!("{} has no [[org_accounts]]", args[1]))?;
    let client = OrgClient::new(account, org_client_settings(&config))?;
    let mut cursor: Option<String> = None;
    let mut devices = 0u64;
    let mut refused = 0u64;
    loop {
        let page = client.org_devices(cursor.as_deref()).await?;
        for r in page.data {
            match device::org_device(r) {
                Ok(d) => {
                    std::hint::black_box(&d);
                    devices += 1;
                }
                Err(_) => refused += 1,
            }
        }
        match page.next_cursor {
            Some(c) if Some(&c) != cursor.as_ref() => cursor = Some(c),
            Some(_) => anyhow::bail!("the simulator returned the cursor it was sent"),
            None => break,
        }
    }
    anyhow::ensure!(refused == 0, "{refused} resources refused");
    anyhow::ensure!(
        devices == expected,
        "read {devices} org devices, expected {expected}"
    );
    Ok(())
}
