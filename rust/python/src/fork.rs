//! Rayon's global thread pool does not survive `fork()`: a child process
//! (a DataLoader worker, a forked Ray or multiprocessing worker) would hand
//! work to threads that no longer exist and wait forever. A fork handler
//! marks the child; from then on every core call runs in a pool the child
//! builds for itself.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once};

static FORKED: AtomicBool = AtomicBool::new(false);
static REGISTER: Once = Once::new();
/// The pool of the current (forked) process, tagged with the pid that built
/// it: a grandchild must not reuse its parent's dead pool either.
static CHILD_POOL: Mutex<Option<(u32, Arc<rayon::ThreadPool>)>> = Mutex::new(None);

#[cfg(unix)]
extern "C" fn mark_child() {
    FORKED.store(true, Ordering::SeqCst);
}

/// Installs the fork handler once per process.
pub fn register() {
    REGISTER.call_once(|| {
        #[cfg(unix)]
        // SAFETY: `mark_child` only stores to an atomic, which is
        // async-signal-safe as a post-fork child handler must be.
        unsafe {
            libc::pthread_atfork(None, None, Some(mark_child));
        }
    });
}

fn child_pool() -> Option<Arc<rayon::ThreadPool>> {
    let pid = std::process::id();
    let mut slot = CHILD_POOL.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((owner, pool)) = slot.as_ref() {
        if *owner == pid {
            return Some(Arc::clone(pool));
        }
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pool = Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .ok()?,
    );
    // A pool inherited from a parent process is dead: leak it rather than
    // join threads that do not exist.
    if let Some((_, old)) = slot.take() {
        std::mem::forget(old);
    }
    *slot = Some((pid, Arc::clone(&pool)));
    Some(pool)
}

/// Runs `f` on the global pool, or, in a forked child, on the child's own.
pub fn run<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    if FORKED.load(Ordering::SeqCst) {
        if let Some(pool) = child_pool() {
            return pool.install(f);
        }
    }
    f()
}
