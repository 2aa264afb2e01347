//! Background work (password hashing, backups, the integrity scrub after a snapshot start) on
//! threads of its own at the lowest CPU priority, so that it never delays the writer or the
//! WebSocket fan-out.

/// Gives the calling thread the lowest CPU priority, Linux's `SCHED_IDLE` (nice 19 where that is
/// refused): background work (password hashing, backups) then uses only CPU the writer and the
/// fan-out leave, and a waking writer or fan-out thread preempts it at once. With nice 19,
/// WebSocket delivery p99 at 1,000 events/s rose from 3.7-6.7 ms to 9.1-9.9 ms while 20 logins/s
/// were attempted; with SCHED_IDLE, in isolated alternating runs, it rose by 1-2 ms, and in the
/// full bench suite by 2-3 ms (a running hash still leaves the rest one core of two; README).
/// The cost: on a machine kept 100% busy, logins and backups wait (logins beyond 32 queued get
/// `overloaded`). Only for threads we own: a pooled thread would keep the policy for its next task.
pub fn lowest_priority() {
    // SAFETY: sched_setscheduler and setpriority with pid/who = 0 change the calling thread
    // only (Linux semantics); `param` outlives the call.
    unsafe {
        let param = libc::sched_param { sched_priority: 0 };
        if libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) != 0 {
            libc::setpriority(libc::PRIO_PROCESS, 0, 19);
        }
    }
}

/// Runs blocking background work on a new low-priority thread of its own and awaits its result.
pub async fn run<T: Send + 'static>(
    name: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            lowest_priority();
            let _ = tx.send(work());
        })?;
    rx.await
        .map_err(|_| std::io::Error::other(format!("{name} thread stopped without an answer")))
}

/// Starts background work on a new lowest-priority thread without waiting for it.
pub fn spawn(name: &str, work: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            lowest_priority();
            work();
        })
        .map(drop)
}
