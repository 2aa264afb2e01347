//! Process-wide memory and resource settings of the binary (and of the benchmarks, which must
//! measure the same process).

/// Turns transparent huge pages off for this process (Linux `PR_SET_THP_DISABLE`).
///
/// mimalloc marks its arenas `MADV_HUGEPAGE`, and sled 0.34 allocates and frees a node copy on
/// every page it reads or changes, so memory that mimalloc returns to the kernel comes back on the
/// next fault as a whole 2 MiB page the kernel must zero. Measured on a cold `verify` of 1M events
/// (a copy of the data directory just written): 38 % of the samples were `clear_page_erms` under
/// `folio_zero_user`, 11 % with huge pages off, and the run went from 3.44–3.81 s to 2.93–3.46 s
/// (three alternating pairs). The server's RSS is 25–45 MiB lower with the same throughput
/// (W1 and W3 in alternating pairs, within noise).
///
/// Best effort: on a kernel without the call the process runs as before.
pub fn disable_transparent_huge_pages() {
    // SAFETY: PR_SET_THP_DISABLE takes integer arguments only and changes a flag of this process.
    let rc = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if rc != 0 {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "could not turn transparent huge pages off"
        );
    }
}

/// Raises this process's soft limit of open files to its hard limit (the load generator and the
/// benches hold thousands of sockets). Best effort.
pub fn raise_open_files_limit() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a valid, owned struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}
