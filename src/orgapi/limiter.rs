//! One account's request budget: a token bucket of `requests_per_second` (bursts of up to
//! one second's worth), and a pause after a 429 that holds back every request of the
//! account until its `Retry-After` has passed. On tokio's clock, so tests can pause time.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

pub(super) struct Limiter {
    rate: f64,
    capacity: f64,
    state: Mutex<State>,
}

struct State {
    tokens: f64,
    refilled_at: Instant,
    paused_until: Option<Instant>,
}

impl Limiter {
    pub(super) fn new(requests_per_second: f64) -> Self {
        let capacity = requests_per_second.max(1.0);
        Self {
            rate: requests_per_second,
            capacity,
            state: Mutex::new(State {
                tokens: capacity,
                refilled_at: Instant::now(),
                paused_until: None,
            }),
        }
    }

    /// No request of the account before `d` from now (a later pause wins).
    pub(super) fn pause_for(&self, d: Duration) {
        let until = Instant::now() + d;
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.paused_until.is_none_or(|p| p < until) {
            s.paused_until = Some(until);
        }
    }

    /// Waits until the account may send one request, and takes it.
    pub(super) async fn acquire(&self) {
        loop {
            let wait = {
                let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
                let now = Instant::now();
                match s.paused_until {
                    Some(p) if p > now => p - now,
                    _ => {
                        s.paused_until = None;
                        let elapsed = now.duration_since(s.refilled_at).as_secs_f64();
                        s.tokens = (s.tokens + elapsed * self.rate).min(self.capacity);
                        s.refilled_at = now;
                        if s.tokens >= 1.0 {
                            s.tokens -= 1.0;
                            return;
                        }
                        Duration::from_secs_f64((1.0 - s.tokens) / self.rate)
                    }
                }
            };
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_budget_spaces_requests_and_a_pause_holds_them_all() {
        let l = Limiter::new(5.0);
        let start = Instant::now();
        for _ in 0..5 {
            l.acquire().await; // the first second's burst
        }
        assert_eq!(start.elapsed(), Duration::ZERO);
        for _ in 0..5 {
            l.acquire().await;
        }
        let e = start.elapsed();
        assert!(
            e >= Duration::from_millis(999) && e <= Duration::from_millis(1001),
            "{e:?}"
        );
        l.pause_for(Duration::from_secs(30));
        l.pause_for(Duration::from_secs(5)); // an earlier end does not shorten it
        let before = Instant::now();
        l.acquire().await;
        assert!(before.elapsed() >= Duration::from_secs(30));
    }
}
