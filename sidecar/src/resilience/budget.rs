//! The retry budget: retries may be at most `ratio` of the requests of the last 10 s,
//! plus `minPerSecond` × 10 s so that quiet services can still retry.
//!
//! It implements `tower::retry::budget::Budget`, the interface tower's retry uses, but not
//! with tower's `TpsBudget`: that one counts in whole tokens and turns a ratio r ≤ 1 into
//! one retry per ⌊1/r⌋ requests, so 0.6 allows every request a retry and 0.4 allows one in
//! two. Operators write the ratio they mean; this budget keeps exact counts per bucket.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use ballast_api::policy::MAX_RETRY_MIN_PER_SECOND;
use tokio::time::Instant;
use tower::retry::budget::Budget;

const WINDOW: Duration = Duration::from_secs(10);
const BUCKETS: u32 = 10;

pub struct RatioBudget {
    ratio: f64,
    floor: f64,
    /// (bucket start, requests, retries), oldest first.
    buckets: Mutex<VecDeque<(Instant, u64, u64)>>,
}

impl RatioBudget {
    pub fn new(ratio: f64, min_per_second: u32) -> Self {
        Self {
            ratio: ratio.clamp(0.0, 1.0),
            floor: f64::from(min_per_second.min(MAX_RETRY_MIN_PER_SECOND)) * WINDOW.as_secs_f64(),
            buckets: Mutex::new(VecDeque::new()),
        }
    }

    /// Runs `f` on the window with its newest bucket current; `f` sums the buckets only
    /// if it needs the totals (a withdrawal does, every request's deposit does not).
    fn with_current<T>(&self, f: impl FnOnce(&mut VecDeque<(Instant, u64, u64)>) -> T) -> T {
        let now = Instant::now();
        let bucket = WINDOW / BUCKETS;
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        while b.front().is_some_and(|&(start, _, _)| now >= start + WINDOW) {
            b.pop_front();
        }
        if b.back().is_none_or(|&(start, _, _)| now >= start + bucket) {
            b.push_back((now, 0, 0));
        }
        f(&mut b)
    }
}

impl Budget for RatioBudget {
    /// One original request.
    fn deposit(&self) {
        self.with_current(|b| {
            if let Some(cur) = b.back_mut() {
                cur.1 += 1;
            }
        });
    }

    /// One retry, if the window allows it.
    fn withdraw(&self) -> bool {
        self.with_current(|b| {
            let (requests, retries) = b.iter().fold((0, 0), |(r, x), &(_, rr, xx)| (r + rr, x + xx));
            let allowed = requests as f64 * self.ratio + self.floor;
            match b.back_mut() {
                Some(cur) if (retries + 1) as f64 <= allowed => {
                    cur.2 += 1;
                    true
                }
                _ => false,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn ratio_is_exact_not_rounded() {
        let b = RatioBudget::new(0.6, 0);
        for _ in 0..100 {
            b.deposit();
        }
        let granted = (0..100).filter(|_| b.withdraw()).count();
        assert_eq!(granted, 60);
    }

    #[tokio::test(start_paused = true)]
    async fn the_floor_refills_as_the_window_moves() {
        let b = RatioBudget::new(0.0, 2);
        assert_eq!((0..50).filter(|_| b.withdraw()).count(), 20, "2/s over 10 s");
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!((0..50).filter(|_| b.withdraw()).count(), 0, "the first retries are still in the window");
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!((0..50).filter(|_| b.withdraw()).count(), 20);
    }

    #[tokio::test(start_paused = true)]
    async fn old_requests_leave_the_window() {
        let b = RatioBudget::new(0.5, 0);
        for _ in 0..10 {
            b.deposit();
        }
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(!b.withdraw(), "deposits older than 10 s no longer count");
    }
}
