//! Benchmark floor of the organisation walk: download and parse everything a walk reads
//! (the MDM servers, each server's device list, every orgDevices page), store nothing.
//!
//! `org_fetch_floor CONFIG EXPECTED` loads CONFIG as `adesync run` does, takes its first
//! `[[org_accounts]]` entry and pages `GET /v1/orgDevices` (the account's `page_size`)
//! through the same client (`OrgClient`: assertion, access token, request budget) and
//! parser (`RawResource::decode`, every resource fully decoded) the walk uses, and exits non-zero if the number of
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
    // The servers and their device lists, as the walk reads them first.
    let mut servers = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let page = client.mdm_servers(cursor.as_deref()).await?;
        servers.extend(page.data.into_iter().filter_map(device::mdm_server));
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    let mut assigned = 0usize;
    for server in &servers {
        let mut cursor: Option<String> = None;
        loop {
            let page = client.server_devices(&server.id, cursor.as_deref()).await?;
            assigned += page.data.iter().filter_map(|r| r.id_text()).count();
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
    }
    std::hint::black_box(assigned);
    let mut cursor: Option<String> = None;
    let mut devices = 0u64;
    let mut refused = 0u64;
    loop {
        let page = client.org_devices(cursor.as_deref()).await?;
        for r in page.data {
            match r.decode() {
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
