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

/// Raises this process's soft limit of open files to its hard limit, and returns the soft limit
/// now in force (`None` if it cannot be read). The server holds a descriptor per connection, and
/// the soft limit is often 1,024 (systemd services, many container runtimes) while the hard
/// limit is far higher: a server out of descriptors cannot open the files a commit needs and
/// stops taking writes. The load generator and the benches hold thousands of sockets too.
pub fn raise_open_files_limit() -> Option<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a valid, owned struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return None;
        }
        if r.rlim_cur < r.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: r.rlim_max,
                rlim_max: r.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                r = raised;
            }
        }
    }
    Some(r.rlim_cur)
}

/// This process's soft limit of open files (`None` if it cannot be read).
pub fn open_files_limit() -> Option<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a plain syscall on a valid, owned struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return None;
    }
    Some(r.rlim_cur)
}

/// Files and directories this process creates are its user's alone (umask 077): the data
/// directory holds password hashes (users), the audit trail, the JWT secret and backups, and
/// sled creates its files with the default mode, which under the usual umask 022 made them
/// world-readable.
pub fn restrict_new_files() {
    // SAFETY: umask takes an integer and only changes this process's file-creation mask.
    unsafe {
        libc::umask(0o077);
    }
}

/// Ignores SIGXFSZ, so that a write beyond the file-size limit (`ulimit -f`, `RLIMIT_FSIZE`)
/// fails with `EFBIG` like any other refused write (appends refused with a clear error, the
/// server up for reads, `/healthz` 503) instead of killing the process at once.
pub fn ignore_file_size_signal() {
    // SAFETY: signal(2) with SIG_IGN installs no handler code; no Rust state is involved.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}
