//! The blocking writer thread of one pass: applies pages in the order the driver sent
//! them, several consecutive pages per commit when they are ready (group commit), each
//! page with its rows, events and the cursor that follows it.

use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::SyncError;
use crate::model::{format_time, DeviceRecord, Phase};
use crate::store::{Batch, CursorState, PageStats, PageWrite, Prepared, Store, StoreError};

pub(super) enum WriterMsg {
    Page {
        kind: Phase,
        records: Vec<DeviceRecord>,
        /// The records' stored form, made by the sender (see `store::prepare`), or empty
        /// when the writer makes it (see [`Pipe::prepare`]).
        prepared: Vec<Prepared>,
        state: CursorState,
        fetched_until: Option<String>,
        completes_fetch: bool,
        unreadable: Vec<String>,
    },
    Cursor(CursorState),
}

/// A page's records after the writer wrote them, on their way back to be freed.
type Written = (Vec<DeviceRecord>, Vec<Prepared>);

/// The driver's end of the pipeline to the writer: pages go to the writer, and the pages
/// it has written come back to be freed by the thread that parsed them. glibc's malloc
/// frees memory another thread allocated under that thread's arena lock, so freeing
/// pages anywhere else made the parsing thread wait on the lock (BENCHMARKS.md).
pub(super) struct Pipe {
    tx: mpsc::Sender<WriterMsg>,
    /// The token had devices when the pass started: its fetch pages are mostly looked up
    /// and unchanged, the writer keeps up with the download, and the records' stored form
    /// is made by the writer instead of the parsing thread (see [`Pipe::prepare`]).
    writer_prepares_fetch_pages: bool,
    /// Behind a lock only so the driver's future may be sent between threads.
    written: std::sync::Mutex<std::sync::mpsc::Receiver<Written>>,
}

/// The writer's end: pages in, written pages back.
pub(super) struct WriterEnd {
    rx: mpsc::Receiver<WriterMsg>,
    written: std::sync::mpsc::SyncSender<Written>,
    /// The token had no devices when the pass started: its fetch pages are inserted
    /// without being looked up (see `PageWrite::expect_new`).
    expect_new: bool,
}

/// A pipeline with one page queued ahead of the one being written (so at most two
/// pages in flight, and as many on their way back). `token_has_devices`, read once
/// before the writer starts, decides both where fetch pages are prepared
/// ([`Pipe::prepare`]) and whether the writer expects new devices.
pub(super) fn pipe(token_has_devices: bool) -> (Pipe, WriterEnd) {
    let (tx, rx) = mpsc::channel(1);
    let (back, written) = std::sync::mpsc::sync_channel(2);
    (
        Pipe {
            tx,
            writer_prepares_fetch_pages: token_has_devices,
            written: written.into(),
        },
        WriterEnd {
            rx,
            written: back,
            expect_new: !token_has_devices,
        },
    )
}

impl Pipe {
    /// The records' stored form ([`crate::store::prepare`]) made here, on the parsing
    /// thread, when the writer is the slower side (a first fetch, sync pages); empty when
    /// the writer makes it (a re-fetch, where the parsing thread is the slower side).
    pub(super) fn prepare(&self, kind: Phase, records: &[DeviceRecord]) -> Vec<Prepared> {
        if kind == Phase::Fetch && self.writer_prepares_fetch_pages {
            Vec::new()
        } else {
            crate::store::prepare(records)
        }
    }

    /// Sends a message to the writer, then frees the pages it has written since.
    pub(super) async fn send(&self, msg: WriterMsg) -> Result<(), SyncError> {
        // A closed channel means the writer failed; its error is reported by run_inner.
        self.tx
            .send(msg)
            .await
            .map_err(|_| SyncError::Writer("the database writer stopped early".into()))?;
        if let Ok(written) = self.written.lock() {
            while let Ok(page) = written.try_recv() {
                drop(page);
            }
        }
        Ok(())
    }
}

/// Group commit limits (see [`crate::store::Batch`]): a commit takes every page already
/// downloaded, up to this many pages...
const GROUP_MAX_PAGES: usize = 32;
/// ...or this much writing, whichever comes first, so another token's writer never waits
/// long for the database...
const GROUP_MAX_AGE: Duration = Duration::from_millis(500);
/// ...and waits at most this long for the next page before committing what it has.
const GROUP_WAIT: Duration = Duration::from_millis(20);

/// The blocking writer: applies pages in the order they were sent, several consecutive
/// pages per commit when they are ready (never waiting on Apple with a write open).
/// Returns the store with the stats: its connection holds the token until the pass ends.
pub(super) fn writer_loop(
    mut store: Store,
    token: &str,
    end: WriterEnd,
) -> Result<(PageStats, Store), SyncError> {
    let WriterEnd {
        mut rx,
        written,
        expect_new,
    } = end;
    let runtime = tokio::runtime::Handle::current();
    let mut stats = PageStats::default();
    while let Some(first) = rx.blocking_recv() {
        let mut batch = store.batch()?;
        let opened = Instant::now();
        let mut group = PageStats::default();
        let mut pages = 0;
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            apply(&mut batch, token, expect_new, msg, &written, &mut group)?;
            pages += 1;
            if pages >= GROUP_MAX_PAGES || opened.elapsed() >= GROUP_MAX_AGE {
                break;
            }
            // A page already queued is taken at once; none within GROUP_WAIT, or the
            // driver finished: commit.
            next = runtime
                .block_on(tokio::time::timeout(GROUP_WAIT, rx.recv()))
                .ok()
                .flatten();
        }
        batch.commit()?;
        stats.add(group);
    }
    Ok((stats, store))
}

fn apply(
    batch: &mut Batch<'_>,
    token: &str,
    expect_new: bool,
    msg: WriterMsg,
    written_pages: &std::sync::mpsc::SyncSender<Written>,
    stats: &mut PageStats,
) -> Result<(), StoreError> {
    let now = format_time(chrono::Utc::now());
    match msg {
        WriterMsg::Page {
            kind,
            records,
            prepared,
            state,
            fetched_until,
            completes_fetch,
            unreadable,
        } => {
            let written = batch.apply_page(&PageWrite {
                token,
                kind,
                records: &records,
                next: state,
                fetched_until: fetched_until.as_deref(),
                completes_fetch,
                now: &now,
                unreadable: &unreadable,
                expect_new,
                prepared: Some(&prepared),
            });
            // Freeing a page's records costs the writer, the slower side of a first fetch,
            // about a tenth of its time (BENCHMARKS.md): the driver frees them (see
            // `Pipe`), or this thread when the driver has stopped taking them back.
            if let Err(back) = written_pages.try_send((records, prepared)) {
                drop(back);
            }
            stats.add(written?);
        }
        WriterMsg::Cursor(state) => batch.set_cursor(token, &state, &now)?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Device;

    fn records(serials: &[&str]) -> Vec<DeviceRecord> {
        serials
            .iter()
            .map(|s| DeviceRecord {
                op_type: None,
                op_date: None,
                device: Device {
                    serial_number: (*s).into(),
                    model: Some("iPad".into()),
                    ..Device::default()
                },
            })
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pages_prepared_by_the_writer_are_stored_and_come_back_to_be_freed() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path().join("x.db")).unwrap();
        // The token already has a device: its fetch pages are prepared by the writer.
        store
            .apply_page(&PageWrite {
                token: "acme",
                kind: Phase::Fetch,
                records: &records(&["A"]),
                next: CursorState {
                    phase: Phase::Sync,
                    cursor: Some("c0".into()),
                    fetch_run: 1,
                },
                fetched_until: None,
                completes_fetch: true,
                now: "2026-01-01T00:00:00.000Z",
                unreadable: &[],
                expect_new: false,
                prepared: None,
            })
            .unwrap();
        let (pipe, end) = pipe(true);
        let writer = tokio::task::spawn_blocking(move || writer_loop(store, "acme", end));
        let pages = [records(&["A", "B"]), records(&["C"]), records(&["D"])];
        for (i, recs) in pages.into_iter().enumerate() {
            let prepared = pipe.prepare(Phase::Fetch, &recs);
            assert!(prepared.is_empty(), "the writer prepares re-fetch pages");
            // Sent without taking written pages back, so they stay in the channel.
            pipe.tx
                .send(WriterMsg::Page {
                    kind: Phase::Fetch,
                    prepared,
                    records: recs,
                    state: CursorState {
                        phase: Phase::Fetch,
                        cursor: Some(format!("f{i}")),
                        fetch_run: 2,
                    },
                    fetched_until: None,
                    completes_fetch: false,
                    unreadable: Vec::new(),
                })
                .await
                .map_err(drop)
                .unwrap();
        }
        // Sync pages are still prepared here.
        assert_eq!(pipe.prepare(Phase::Sync, &records(&["E"])).len(), 1);
        // The written pages come back, at most two of them; the third, with nobody taking
        // them back, was freed by the writer.
        let Pipe { tx, written, .. } = pipe;
        drop(tx);
        let (stats, store) = writer.await.unwrap().unwrap();
        assert_eq!((stats.added, stats.unchanged), (3, 1));
        assert_eq!(store.device_counts("acme").unwrap(), (4, 0));
        let back = written.into_inner().unwrap();
        let returned: Vec<usize> = back.try_iter().map(|(recs, _)| recs.len()).collect();
        assert_eq!(returned, [2, 1]);
    }
}
