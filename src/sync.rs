//! The one poison-tolerant lock. A panic while a lock is held is caught where the
//! request or job that panicked is answered (the handler's `catch_unwind`, the model
//! thread's), and what braid keeps behind a mutex (counts, pools, queues) is valid
//! after any single update, so the next holder goes on with it rather than failing.

use std::sync::{Mutex, MutexGuard};

pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
