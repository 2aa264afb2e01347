//! Writing a result (a backup directory, an export file) under a staging name beside its
//! destination, and renaming it into place only once it is complete and durable: a destination
//! that exists is whole, never a prefix that could pass for a smaller complete result.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// `dest` with `.partial` appended to its name; `None` when `dest` has no file name.
pub fn staging_path(dest: &Path) -> Option<PathBuf> {
    let mut name: OsString = dest.file_name()?.to_os_string();
    name.push(".partial");
    Some(dest.with_file_name(name))
}

/// The directory `path` is in (`.` for a bare name).
pub fn parent_dir(path: &Path) -> PathBuf {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf()
}

/// Renames the complete, synced `staging` to `dest` and syncs the directory, so the rename
/// itself survives a power cut.
pub fn publish(staging: &Path, dest: &Path) -> std::io::Result<()> {
    std::fs::rename(staging, dest)?;
    std::fs::File::open(parent_dir(dest))?.sync_all()
}
