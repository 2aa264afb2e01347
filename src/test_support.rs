//! Helpers shared by the unit tests.

use std::path::Path;
use std::time::{Duration, Instant};

/// Opens a sled directory that this process closed a moment ago. sled 0.34's IO threads can
/// still hold the file, and with it sled's lock, briefly after the last `Db` handle is dropped;
/// under a loaded test run an immediate reopen failed now and then. Retries for up to 10 s.
pub fn reopen_sled(path: &Path) -> sled::Db {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match sled::Config::new().path(path).open() {
            Ok(db) => return db,
            Err(e) if Instant::now() >= deadline => panic!("reopen {}: {e}", path.display()),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}
