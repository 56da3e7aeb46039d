//! One walk of one organisation API account (docs/apple-business-api.md §3): the MDM
//! servers, each server's device list (staged in the database page by page), then every
//! org device page by page, each page committed with its events and the walk's cursor;
//! then AppleCare coverage within the account's budget.
//!
//! The API has no delta: every walk reads the whole list. What makes a re-walk cheap is
//! the store recognising an unchanged device by its content hash. A crash resumes the walk
//! where its last commit left it; only a complete walk removes devices.

use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, OrgAccountConfig};
use crate::model::{format_time, ErrorKind};
use crate::orgapi::{device, ListPage, OrgApiError, OrgClient, OrgClientSettings, RawResource};
use crate::store::{OrgPageStats, Store, StoreError, WalkPhase};

/// Most pages one list may have: 10 million devices at 1,000 a page, and a guard against
/// a cursor that never ends.
const MAX_PAGES: u64 = 10_000;
/// Longest time one run spends on AppleCare coverage; the rest waits for the next run.
const APPLECARE_RUN_BUDGET: Duration = Duration::from_secs(600);

/// A failed walk. Each variant says what to do.
#[derive(Debug, thiserror::Error)]
pub enum OrgSyncError {
    /// Apple refused or could not be reached, or the key is unusable.
    #[error(transparent)]
    Api(#[from] OrgApiError),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Apple returned the cursor it was sent.
    #[error("{0}: Apple returned the cursor it was sent, which would repeat the same page forever; the walk stops here and the next run starts the list again")]
    SameCursor(&'static str),
    /// Apple sent a cursor with control characters.
    #[error("{0}: Apple sent a next-page cursor with control characters, which cannot be sent back; the walk stops here and the next run starts the list again")]
    BadCursor(&'static str),
    /// A list longer than any organisation has.
    #[error("{0}: more than {MAX_PAGES} pages; stopping (the next run starts the list again)")]
    TooManyPages(&'static str),
    /// Stopped by shutdown; committed pages are kept.
    #[error("stopped by shutdown; the next run continues from the last committed page")]
    Cancelled,
    /// A background task died.
    #[error("internal error: {0}")]
    Internal(String),
}

impl OrgSyncError {
    /// A short stable name.
    pub fn kind(&self) -> ErrorKind {
        match self {
            OrgSyncError::Api(e) => e.kind(),
            OrgSyncError::Store(_) => ErrorKind::Database,
            OrgSyncError::SameCursor(_)
            | OrgSyncError::BadCursor(_)
            | OrgSyncError::TooManyPages(_) => ErrorKind::Cursor,
            OrgSyncError::Cancelled => ErrorKind::Cancelled,
            OrgSyncError::Internal(_) => ErrorKind::Internal,
        }
    }
}

/// What one walk did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OrgRunSummary {
    /// Account name.
    pub account: String,
    /// Pages of devices read.
    pub pages: u64,
    /// Devices read.
    pub devices: u64,
    /// Events by kind, and unchanged devices.
    pub stats: OrgPageStats,
    /// MDM servers listed.
    pub servers: u64,
    /// The walk reached the end of the list in this run.
    pub complete: bool,
    /// Resources that could not be read (skipped, never removed for it).
    pub refused: u64,
    /// Devices whose AppleCare coverage was fetched.
    pub applecare: u64,
    /// 429/503 answers.
    pub rate_limited: u64,
    /// Access tokens minted.
    pub tokens_minted: u64,
    /// Wall time.
    pub duration: Duration,
    /// Nothing was done: another replica walks this account now (who, as the database
    /// reports it). Not a failure; this replica tries again on its next run.
    pub held_by: Option<String>,
}

/// The client settings an account's runs use.
pub fn org_client_settings(config: &Config) -> OrgClientSettings {
    OrgClientSettings {
        user_agent: crate::config::default_user_agent(),
        timeout: config.request_timeout,
        retry: config.retry.clone(),
        max_response_bytes: config.max_response_bytes,
    }
}

/// One walk of `account` with a client made for it (`run --once`).
pub async fn run_account(
    config: &Config,
    account: &OrgAccountConfig,
    cancel: &CancellationToken,
) -> Result<OrgRunSummary, OrgSyncError> {
    match OrgClient::new(account, org_client_settings(config)) {
        Ok(client) => run_account_with(config, &client, cancel).await,
        Err(e) => {
            let e = OrgSyncError::Api(e);
            record_end(config, &account.name, Some(&e), 0, None).await;
            Err(e)
        }
    }
}

/// One walk with a client that lives longer (the daemon keeps one per account, so its
/// access token is reused between runs). Records the outcome. On PostgreSQL the walk first
/// takes the account (see `Store::own_account`); when another replica holds it, nothing is
/// done and the summary says who (`held_by`).
pub async fn run_account_with(
    config: &Config,
    client: &OrgClient,
    cancel: &CancellationToken,
) -> Result<OrgRunSummary, OrgSyncError> {
    let name = client.account().name.clone();
    let started = Instant::now();
    let (n, d) = (name.clone(), config.database.clone());
    let (store, held_by) = blocking(move || {
        let mut store = Store::open(&d)?;
        let held_by = store.own_account(&n)?;
        Ok((store, held_by))
    })
    .await?;
    if let Some(holder) = held_by {
        tracing::info!(account = %name, held_by = %holder, "another replica is walking this account; skipped");
        return Ok(OrgRunSummary {
            account: name,
            held_by: Some(holder),
            duration: started.elapsed(),
            ..OrgRunSummary::default()
        });
    }
    let mut owner = Owner(Some(store));
    let limited_before = client
        .counters
        .rate_limited
        .load(std::sync::atomic::Ordering::Relaxed);
    let minted_before = client
        .counters
        .tokens
        .load(std::sync::atomic::Ordering::Relaxed);
    let result = walk(client, cancel, &mut owner).await;
    let limited = client
        .counters
        .rate_limited
        .load(std::sync::atomic::Ordering::Relaxed)
        - limited_before;
    let result = result.map(|mut s| {
        s.duration = started.elapsed();
        s.rate_limited = limited;
        s.tokens_minted = client
            .counters
            .tokens
            .load(std::sync::atomic::Ordering::Relaxed)
            - minted_before;
        s
    });
    if !matches!(result, Err(OrgSyncError::Cancelled)) {
        record_end(config, &name, result.as_ref().err(), limited, owner.0).await;
    }
    result
}

/// Records how a walk ended, through the connection that holds the account (so it is
/// recorded while this replica still owns it). Without one (the client could not be made,
/// or the walk's connection was lost), a new connection takes the account first, and
/// records nothing when another replica holds it: its walk's outcome is the one to show.
async fn record_end(
    config: &Config,
    account: &str,
    error: Option<&OrgSyncError>,
    limited: u64,
    owner: Option<Store>,
) {
    let db = config.database.clone();
    let account = account.to_owned();
    let outcome = error.map(|e| (e.kind().as_str().to_owned(), e.to_string()));
    let recorded = tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
        let mut store = match owner {
            Some(s) => s,
            None => {
                let mut s = Store::open(&db)?;
                if let Some(holder) = s.own_account(&account)? {
                    tracing::debug!(account = %account, held_by = %holder,
                        "not recording this run's outcome: another replica walks the account");
                    return Ok(());
                }
                s
            }
        };
        let now = format_time(chrono::Utc::now());
        store.record_org_run_end(
            &account,
            outcome.as_ref().map(|(k, m)| (k.as_str(), m.as_str())),
            limited,
            &now,
        )
    })
    .await;
    match recorded {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "cannot record the walk's outcome"),
        Err(e) => tracing::error!(error = %e, "cannot record the walk's outcome"),
    }
}

/// The walk's connection: on PostgreSQL the one holding the account's lock, so every
/// write of the walk goes through it and a replica that lost it writes nothing more. Each
/// use runs on a blocking thread and gives the connection back whatever its outcome.
struct Owner(Option<Store>);

impl Owner {
    async fn with<T: Send + 'static>(
        &mut self,
        f: impl FnOnce(&mut Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, OrgSyncError> {
        let mut store = self.take()?;
        let (store, result) = tokio::task::spawn_blocking(move || {
            let r = f(&mut store);
            (store, r)
        })
        .await
        .map_err(|e| OrgSyncError::Internal(e.to_string()))?;
        self.0 = Some(store);
        result.map_err(OrgSyncError::Store)
    }

    fn take(&mut self) -> Result<Store, OrgSyncError> {
        self.0
            .take()
            .ok_or_else(|| OrgSyncError::Internal("the walk's database connection was lost".into()))
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, OrgSyncError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| OrgSyncError::Internal(e.to_string()))?
        .map_err(OrgSyncError::Store)
}

/// Races `fut` against `cancel`.
async fn or_cancel<T>(
    cancel: &CancellationToken,
    fut: impl std::future::Future<Output = Result<T, OrgApiError>>,
) -> Result<T, OrgSyncError> {
    tokio::select! {
        r = fut => r.map_err(OrgSyncError::Api),
        _ = cancel.cancelled() => Err(OrgSyncError::Cancelled),
    }
}

/// [`walk_inner`], and after a failure that would recur at the same place (a cursor
/// Apple keeps refusing or repeating, a list that never ends, another refusal of a paged
/// request) the walk's position is dropped, so the next run lists the servers, or the
/// devices, from the start instead of failing there forever. What was committed stays;
/// the devices seen so far stay seen.
async fn walk(
    client: &OrgClient,
    cancel: &CancellationToken,
    owner: &mut Owner,
) -> Result<OrgRunSummary, OrgSyncError> {
    let result = walk_inner(client, cancel, owner).await;
    if let Err(e) = &result {
        let recurring = matches!(
            e,
            OrgSyncError::SameCursor(_)
                | OrgSyncError::BadCursor(_)
                | OrgSyncError::TooManyPages(_)
                | OrgSyncError::Api(OrgApiError::Http { .. })
                | OrgSyncError::Api(OrgApiError::CursorRefused { .. })
        );
        if recurring {
            let n = client.account().name.clone();
            if let Err(r) = owner.with(move |s| s.reset_walk_position(&n)).await {
                tracing::warn!(account = %client.account().name, error = %r, "cannot reset the walk's position");
            }
        }
    }
    result
}

async fn walk_inner(
    client: &OrgClient,
    cancel: &CancellationToken,
    owner: &mut Owner,
) -> Result<OrgRunSummary, OrgSyncError> {
    let account = client.account().clone();
    let name = account.name.clone();
    let mut summary = OrgRunSummary {
        account: name.clone(),
        ..OrgRunSummary::default()
    };
    let n = name.clone();
    let state = owner
        .with(move |store| {
            store.record_org_run_start(&n, &format_time(chrono::Utc::now()))?;
            store.org_walk(&n)
        })
        .await?;

    if state.phase == WalkPhase::Servers {
        if state.server_index == 0 && state.cursor.is_none() {
            // A new walk: the servers first.
            let mut servers = Vec::new();
            let mut cursor: Option<String> = None;
            for page in 0.. {
                if page >= MAX_PAGES {
                    return Err(OrgSyncError::TooManyPages("GET /v1/mdmServers"));
                }
                let p = or_cancel(cancel, client.mdm_servers(cursor.as_deref())).await?;
                servers.extend(p.data.into_iter().filter_map(device::mdm_server));
                match next_of(p.next_cursor, &cursor, "GET /v1/mdmServers")? {
                    Some(c) => cursor = Some(c),
                    None => break,
                }
            }
            let n = name.clone();
            owner
                .with(move |s| s.save_mdm_servers(&n, &servers, &format_time(chrono::Utc::now())))
                .await?;
        }
        let n = name.clone();
        let servers = owner.with(move |s| s.listed_mdm_servers(&n)).await?;
        summary.servers = servers.len() as u64;
        if servers.is_empty() {
            let n = name.clone();
            owner
                .with(move |s| s.stage_server_devices(&n, "", &[], None, true))
                .await?;
        }
        let mut cursor = state.cursor.clone();
        for (i, (server_id, _)) in servers.iter().enumerate().skip(state.server_index as usize) {
            let mut pages = 0;
            loop {
                pages += 1;
                if pages > MAX_PAGES {
                    return Err(OrgSyncError::TooManyPages(
                        "GET /v1/mdmServers/{id}/relationships/devices",
                    ));
                }
                let page = match or_cancel(
                    cancel,
                    client.server_devices(server_id, cursor.as_deref()),
                )
                .await
                {
                    Err(OrgSyncError::Api(OrgApiError::CursorRefused { .. }))
                        if cursor.is_some() =>
                    {
                        // Read this server's list again from its start; staging is idempotent.
                        cursor = None;
                        continue;
                    }
                    // The server was deleted since it was listed: it holds nothing.
                    Err(OrgSyncError::Api(OrgApiError::Http { status: 404, .. })) => {
                        tracing::warn!(account = %name, server = %crate::model::printable(server_id),
                                "an MDM server listed at the start of the walk is gone; its devices count as unassigned");
                        ListPage {
                            data: Vec::new(),
                            next_cursor: None,
                        }
                    }
                    other => other?,
                };
                // Only usable serials (a device listed with another id can never match one).
                let serials: Vec<String> = page
                    .data
                    .iter()
                    .filter_map(|r| r.id_text())
                    .filter(|id| device::is_serial(id))
                    .collect();
                let next = next_of(
                    page.next_cursor,
                    &cursor,
                    "GET /v1/mdmServers/{id}/relationships/devices",
                )?;
                let last = i + 1 == servers.len();
                let (n, sid, nx) = (name.clone(), server_id.clone(), next.clone());
                owner
                    .with(move |s| s.stage_server_devices(&n, &sid, &serials, nx.as_deref(), last))
                    .await?;
                match next {
                    Some(c) => cursor = Some(c),
                    None => {
                        cursor = None;
                        break;
                    }
                }
            }
        }
    }

    // The device walk, from where it stands.
    let n = name.clone();
    let state = owner.with(move |s| s.org_walk(&n)).await?;
    let mut cursor = state.cursor.clone();
    let mut pending: Option<JoinHandle<PageDone>> = None;
    let mut restarted = false;
    let mut pages = 0u64;
    loop {
        pages += 1;
        if pages > MAX_PAGES {
            summary.settle(pending.take(), owner).await?;
            return Err(OrgSyncError::TooManyPages("GET /v1/orgDevices"));
        }
        let fetched = or_cancel(cancel, client.org_devices(cursor.as_deref())).await;
        // The previous page's commit ran while this page downloaded.
        summary.settle(pending.take(), owner).await?;
        let page: ListPage<RawResource> = match fetched {
            Err(OrgSyncError::Api(OrgApiError::CursorRefused { .. }))
                if cursor.is_some() && !restarted =>
            {
                tracing::warn!(account = %name, "Apple refused the walk's cursor; reading the list again from its start");
                restarted = true;
                let n = name.clone();
                owner.with(move |s| s.restart_device_walk(&n)).await?;
                cursor = None;
                continue;
            }
            other => other?,
        };
        let next = next_of(page.next_cursor, &cursor, "GET /v1/orgDevices")?;
        summary.pages += 1;
        let (n, nx, mut s) = (name.clone(), next.clone(), owner.take()?);
        let walk_run = state.walk_run;
        // Resources become rows on the writer's thread (only new or changed ones are
        // decoded), so the next page downloads meanwhile.
        pending = Some(tokio::task::spawn_blocking(move || {
            let read = page.data.len() as u64;
            let now = format_time(chrono::Utc::now());
            let result = s.apply_org_page(&n, walk_run, page.data, nx.as_deref(), &now);
            PageDone {
                store: s,
                read,
                result,
            }
        }));
        match next {
            Some(c) => cursor = Some(c),
            None => break,
        }
        if cancel.is_cancelled() {
            summary.settle(pending.take(), owner).await?;
            return Err(OrgSyncError::Cancelled);
        }
    }
    summary.settle(pending.take(), owner).await?;
    summary.complete = true;
    tracing::info!(
        account = %name,
        pages = summary.pages,
        devices = summary.devices,
        added = summary.stats.added,
        modified = summary.stats.modified,
        removed = summary.stats.removed,
        "organisation walk complete"
    );

    if account.applecare {
        summary.applecare = applecare(client, &account, owner, cancel).await?;
    }
    Ok(summary)
}

/// A page's commit: the connection back, the devices read, and what the page did.
struct PageDone {
    store: Store,
    read: u64,
    result: Result<OrgPageStats, StoreError>,
}

impl OrgRunSummary {
    /// Waits for the page in flight, if any: the connection goes back to `owner`, the
    /// page's counts into the summary.
    async fn settle(
        &mut self,
        pending: Option<JoinHandle<PageDone>>,
        owner: &mut Owner,
    ) -> Result<(), OrgSyncError> {
        let Some(h) = pending else {
            return Ok(());
        };
        let done = h.await.map_err(|e| OrgSyncError::Internal(e.to_string()))?;
        owner.0 = Some(done.store);
        let stats = done.result?;
        if let Some(first) = &stats.first_refusal {
            tracing::warn!(account = %self.account, refused = stats.refused, first = %first,
                "organisation devices that could not be read were skipped (they are not removed for it)");
        }
        self.refused += stats.refused;
        self.devices += done.read - stats.refused;
        self.stats.add(stats);
        Ok(())
    }
}

/// The cursor of the next page: `None` at the end; the same cursor again is Apple's bug,
/// not a reason to spin; a cursor with control characters cannot be sent back (nor kept).
fn next_of(
    next: Option<String>,
    sent: &Option<String>,
    what: &'static str,
) -> Result<Option<String>, OrgSyncError> {
    match next {
        Some(c) if Some(&c) == sent.as_ref() => Err(OrgSyncError::SameCursor(what)),
        Some(c) if c.chars().any(char::is_control) => Err(OrgSyncError::BadCursor(what)),
        other => Ok(other),
    }
}

/// Fetches coverage of the devices whose coverage is oldest (or missing), within the
/// account's request budget for [`APPLECARE_RUN_BUDGET`]; the rest waits for later runs.
async fn applecare(
    client: &OrgClient,
    account: &OrgAccountConfig,
    owner: &mut Owner,
    cancel: &CancellationToken,
) -> Result<u64, OrgSyncError> {
    let budget = (account.requests_per_second * APPLECARE_RUN_BUDGET.as_secs_f64()) as usize;
    let older_than = chrono::Utc::now()
        - chrono::Duration::from_std(account.applecare_refresh)
            .unwrap_or(chrono::Duration::days(7));
    let (n, older) = (account.name.clone(), format_time(older_than));
    let due = owner
        .with(move |s| s.applecare_due(&n, &older, budget.max(1)))
        .await?;
    let mut done = 0;
    for serial in due {
        // Best effort: the walk is complete whatever happens here. A refusal for one
        // device moves it to the back of the queue; throttling or an outage ends this
        // run's share, and the next run goes on.
        let coverage = match or_cancel(cancel, client.applecare(&serial)).await {
            Ok(c) => Some(c),
            // The device left between the walk and now: nothing to keep.
            Err(OrgSyncError::Api(OrgApiError::Http { status: 404, .. })) => Some(Vec::new()),
            Err(OrgSyncError::Api(e @ OrgApiError::Http { .. })) => {
                tracing::warn!(account = %account.name, serial = %crate::model::printable(&serial), error = %e,
                    "Apple refused this device's AppleCare coverage; it is asked again after applecare_refresh");
                None
            }
            Err(OrgSyncError::Cancelled) => return Err(OrgSyncError::Cancelled),
            Err(e) => {
                tracing::warn!(account = %account.name, error = %e,
                    "AppleCare coverage paused until the next run");
                break;
            }
        };
        let n = account.name.clone();
        owner
            .with(move |s| {
                let now = format_time(chrono::Utc::now());
                match coverage {
                    Some(c) => s.save_applecare(&n, &serial, &c, &now),
                    None => s.applecare_checked(&n, &serial, &now),
                }
            })
            .await?;
        done += 1;
    }
    if done > 0 {
        tracing::info!(account = %account.name, devices = done, "AppleCare coverage refreshed");
    }
    Ok(done)
}
