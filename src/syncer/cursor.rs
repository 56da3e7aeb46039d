//! Apple's fetch/sync cursor protocol as a pure state machine: [`next_step`] decides, from
//! where a token stands and what Apple answered, what to store and what to ask next
//! (docs/apple-dep-api.md §5). No I/O, so it is tested as a table.

use crate::apple::CursorError;
use crate::model::Phase;
use crate::store::CursorState;

/// What Apple answered to one fetch/sync request, as far as the state machine cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome<'a> {
    /// A page: the cursor that was sent, the one returned, and `more_to_follow`.
    Page {
        /// Cursor sent with the request.
        sent: Option<&'a str>,
        /// Cursor in the response.
        cursor: &'a str,
        /// `more_to_follow`.
        more: bool,
    },
    /// A cursor error.
    CursorError(CursorError),
}

/// What to do after a response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Next {
    /// Commit the page with `state`; `completes_fetch` reconciles; then `then`.
    StorePage {
        /// State to store with the page.
        state: CursorState,
        /// The page ends a full fetch.
        completes_fetch: bool,
        /// What follows.
        then: Then,
    },
    /// No page: store `state` and carry on.
    Transition {
        /// The new state.
        state: CursorState,
        /// Whether this transition starts a new full fetch (only once per run).
        restart: bool,
    },
    /// A second restart in one run: give up this run rather than loop.
    GiveUp(CursorError),
    /// The pass is complete; nothing to store.
    Finish,
}

/// What follows a stored page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Then {
    /// Request the next page.
    Continue,
    /// The pass is complete.
    Done,
    /// Apple repeated the cursor with `more_to_follow: true`: stop, resume next run.
    StopSameCursor,
}

/// The pure state transition. `restarted`: a full re-fetch already began in this run.
pub fn next_step(
    current: &CursorState,
    kind: Phase,
    outcome: Outcome<'_>,
    restarted: bool,
    fetch_done: bool,
) -> Next {
    match outcome {
        Outcome::Page { sent, cursor, more } => {
            let same = more && sent == Some(cursor);
            let completes_fetch = kind == Phase::Fetch && !more;
            let phase = if kind == Phase::Sync || completes_fetch {
                Phase::Sync
            } else {
                Phase::Fetch
            };
            let then = if same {
                Then::StopSameCursor
            } else if more || completes_fetch {
                // After a completed fetch, one sync follows at once to pick up changes
                // made while the fetch was paging.
                Then::Continue
            } else {
                Then::Done
            };
            Next::StorePage {
                state: CursorState {
                    phase,
                    cursor: Some(cursor.to_owned()),
                    fetch_run: current.fetch_run,
                },
                completes_fetch,
                then,
            }
        }
        // The fetch had already returned every device (e.g. a pass that stopped on the
        // same-cursor bug before its last page): it is complete, so reconcile and sync
        // with the same cursor.
        // EXHAUSTED_CURSOR on the first request of a fetch (no cursor sent) cannot mean
        // "you have read everything": nothing was read, and reconciling now would mark every
        // device deleted. Give up this run; the next one starts the fetch again.
        Outcome::CursorError(CursorError::Exhausted)
            if kind == Phase::Fetch && current.cursor.is_none() =>
        {
            Next::GiveUp(CursorError::Exhausted)
        }
        Outcome::CursorError(CursorError::Exhausted) if kind == Phase::Fetch => Next::StorePage {
            state: CursorState {
                phase: Phase::Sync,
                cursor: current.cursor.clone(),
                fetch_run: current.fetch_run,
            },
            completes_fetch: true,
            then: Then::Continue,
        },
        // Documented for sync but not seen in practice: right after a completed fetch it
        // can only mean "nothing more"; re-fetching again would loop.
        Outcome::CursorError(CursorError::Exhausted) if fetch_done => Next::Finish,
        Outcome::CursorError(e) if restarted => Next::GiveUp(e),
        // Expired, invalid, required, or exhausted on sync: start a new full fetch.
        Outcome::CursorError(_) => Next::Transition {
            state: CursorState {
                phase: Phase::Fetch,
                cursor: None,
                fetch_run: current.fetch_run + 1,
            },
            restart: true,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(phase: Phase, cursor: Option<&str>, run: i64) -> CursorState {
        CursorState {
            phase,
            cursor: cursor.map(str::to_owned),
            fetch_run: run,
        }
    }

    fn page(sent: Option<&'static str>, cursor: &'static str, more: bool) -> Outcome<'static> {
        Outcome::Page { sent, cursor, more }
    }

    #[test]
    fn cursor_state_transitions() {
        use Phase::*;
        use Then::*;
        let fetch0 = st(Fetch, None, 1);
        let fetch1 = st(Fetch, Some("f1"), 1);
        let sync1 = st(Sync, Some("s1"), 1);
        let mut cases: Vec<(&str, CursorState, Phase, Outcome<'static>, bool, Next)> = vec![
            (
                "first fetch page, more follow",
                fetch0.clone(),
                Phase::Fetch,
                page(None, "f1", true),
                false,
                Next::StorePage {
                    state: st(Fetch, Some("f1"), 1),
                    completes_fetch: false,
                    then: Continue,
                },
            ),
            (
                "last fetch page completes the fetch and a sync follows",
                fetch1.clone(),
                Phase::Fetch,
                page(Some("f1"), "f2", false),
                false,
                Next::StorePage {
                    state: st(Sync, Some("f2"), 1),
                    completes_fetch: true,
                    then: Continue,
                },
            ),
            (
                "single-page fetch with the same cursor and no more is fine",
                fetch1.clone(),
                Phase::Fetch,
                page(Some("f1"), "f1", false),
                false,
                Next::StorePage {
                    state: st(Sync, Some("f1"), 1),
                    completes_fetch: true,
                    then: Continue,
                },
            ),
            (
                "fetch repeats the cursor with more: stop",
                fetch1.clone(),
                Phase::Fetch,
                page(Some("f1"), "f1", true),
                false,
                Next::StorePage {
                    state: st(Fetch, Some("f1"), 1),
                    completes_fetch: false,
                    then: StopSameCursor,
                },
            ),
            (
                "sync page, more follow",
                sync1.clone(),
                Phase::Sync,
                page(Some("s1"), "s2", true),
                false,
                Next::StorePage {
                    state: st(Sync, Some("s2"), 1),
                    completes_fetch: false,
                    then: Continue,
                },
            ),
            (
                "last sync page",
                sync1.clone(),
                Phase::Sync,
                page(Some("s1"), "s2", false),
                false,
                Next::StorePage {
                    state: st(Sync, Some("s2"), 1),
                    completes_fetch: false,
                    then: Done,
                },
            ),
            (
                "sync repeats the cursor with more: stop",
                sync1.clone(),
                Phase::Sync,
                page(Some("s1"), "s1", true),
                false,
                Next::StorePage {
                    state: st(Sync, Some("s1"), 1),
                    completes_fetch: false,
                    then: StopSameCursor,
                },
            ),
            (
                "exhausted fetch cursor: the fetch is complete, reconcile and sync",
                fetch1.clone(),
                Phase::Fetch,
                Outcome::CursorError(CursorError::Exhausted),
                false,
                Next::StorePage {
                    state: st(Sync, Some("f1"), 1),
                    completes_fetch: true,
                    then: Continue,
                },
            ),
            (
                "expired sync cursor: full re-fetch, new run",
                sync1.clone(),
                Phase::Sync,
                Outcome::CursorError(CursorError::Expired),
                false,
                Next::Transition {
                    state: st(Fetch, None, 2),
                    restart: true,
                },
            ),
            (
                "invalid cursor: full re-fetch",
                sync1.clone(),
                Phase::Sync,
                Outcome::CursorError(CursorError::Invalid),
                false,
                Next::Transition {
                    state: st(Fetch, None, 2),
                    restart: true,
                },
            ),
            (
                "cursor required: fetch",
                sync1.clone(),
                Phase::Sync,
                Outcome::CursorError(CursorError::Required),
                false,
                Next::Transition {
                    state: st(Fetch, None, 2),
                    restart: true,
                },
            ),
            (
                "exhausted on sync: full re-fetch",
                sync1.clone(),
                Phase::Sync,
                Outcome::CursorError(CursorError::Exhausted),
                false,
                Next::Transition {
                    state: st(Fetch, None, 2),
                    restart: true,
                },
            ),
            (
                "a second restart in one run gives up",
                fetch0.clone(),
                Phase::Fetch,
                Outcome::CursorError(CursorError::Invalid),
                true,
                Next::GiveUp(CursorError::Invalid),
            ),
        ];
        cases.push((
            "exhausted on a fetch's first request gives up instead of reconciling nothing",
            fetch0.clone(),
            Phase::Fetch,
            Outcome::CursorError(CursorError::Exhausted),
            false,
            Next::GiveUp(CursorError::Exhausted),
        ));
        for (name, state, kind, outcome, restarted, want) in cases {
            assert_eq!(
                next_step(&state, kind, outcome, restarted, false),
                want,
                "{name}"
            );
        }
        // Right after a completed fetch, EXHAUSTED_CURSOR on sync means "nothing more".
        assert_eq!(
            next_step(
                &sync1,
                Phase::Sync,
                Outcome::CursorError(CursorError::Exhausted),
                false,
                true
            ),
            Next::Finish
        );
        assert_eq!(
            next_step(
                &sync1,
                Phase::Sync,
                Outcome::CursorError(CursorError::Exhausted),
                true,
                true
            ),
            Next::Finish
        );
    }
}
