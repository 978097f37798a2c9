//! The retry budget: retries may add at most a fraction of the traffic (Finagle's and
//! Linkerd's budgets), so that retries cannot multiply the load on a struggling service.

use std::sync::Mutex;

/// Retries banked at start, so that a quiet service can still retry a few requests.
const RESERVE: f64 = 10.0;

#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    balance: Mutex<f64>,
}

impl RetryBudget {
    /// `ratio`: retries per request (0.2: at most 20 % extra load, beyond the reserve).
    pub fn new(ratio: f64) -> Self {
        Self {
            ratio,
            balance: Mutex::new(RESERVE),
        }
    }

    /// Every first attempt adds `ratio` to the balance, up to the reserve.
    pub fn deposit(&self) {
        let mut balance = self.lock();
        *balance = (*balance + self.ratio).min(RESERVE);
    }

    /// Takes one retry from the balance, if there is one.
    pub fn withdraw(&self) -> bool {
        let mut balance = self.lock();
        if *balance >= 1.0 {
            *balance -= 1.0;
            true
        } else {
            false
        }
    }

    pub fn balance(&self) -> f64 {
        *self.lock()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, f64> {
        match self.balance.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_stay_within_the_ratio_after_the_reserve() {
        let budget = RetryBudget::new(0.2);
        let mut retries = 0;
        for _ in 0..1000 {
            budget.deposit();
            if budget.withdraw() {
                retries += 1;
            }
        }
        // Every request failing: the reserve, then one retry per five requests.
        assert!((200..=212).contains(&retries), "{retries}");
    }
}
