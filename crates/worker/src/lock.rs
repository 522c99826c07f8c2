//! One `enrichd run` per SQLite file.
//!
//! SQLite allows one writer at a time; two workers on one file would spend their time in
//! `busy_timeout` and double the provider calls the leases exist to prevent. The lock is an
//! OS file lock on `<db>.lock`, so it disappears with the process, even after `kill -9`.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};

/// Why the lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds it.
    #[error("another `enrichd run` is already using {}", .0.display())]
    Held(PathBuf),
    /// The lock file could not be opened.
    #[error("cannot open lock file {}", .path.display())]
    Open {
        /// The lock file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Holds the lock until dropped.
#[derive(Debug)]
pub struct RunLock {
    _file: File,
}

/// The SQLite file a `sqlite://` URL names, or `None` for other databases and in-memory ones.
pub fn sqlite_path(database_url: &str) -> Option<PathBuf> {
    let rest = database_url
        .strip_prefix("sqlite://")
        .or_else(|| database_url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or_default();
    (!path.is_empty() && path != ":memory:").then(|| PathBuf::from(path))
}

/// Takes the run lock for the SQLite database at `db_path`.
///
/// # Errors
/// [`LockError::Held`] when another process has it.
pub fn acquire(db_path: &Path) -> Result<RunLock, LockError> {
    let mut lock_path = db_path.as_os_str().to_owned();
    lock_path.push(".lock");
    let lock_path = PathBuf::from(lock_path);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|source| LockError::Open {
            path: lock_path.clone(),
            source,
        })?;
    match file.try_lock() {
        Ok(()) => Ok(RunLock { _file: file }),
        Err(TryLockError::WouldBlock) => Err(LockError::Held(db_path.to_path_buf())),
        Err(TryLockError::Error(source)) => Err(LockError::Open {
            path: lock_path,
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_file_behind_sqlite_urls() {
        assert_eq!(
            sqlite_path("sqlite://enrichd.db?mode=rwc"),
            Some(PathBuf::from("enrichd.db"))
        );
        assert_eq!(
            sqlite_path("sqlite:///var/lib/e.db"),
            Some(PathBuf::from("/var/lib/e.db"))
        );
        assert_eq!(sqlite_path("sqlite::memory:"), None);
        assert_eq!(sqlite_path("postgres://x@h/db"), None);
    }

    #[test]
    fn a_second_holder_is_refused_until_the_first_lets_go() {
        let path = std::env::temp_dir().join(format!("enrichd-lock-{}.db", std::process::id()));
        let first = acquire(&path).expect("first lock");
        assert!(matches!(acquire(&path), Err(LockError::Held(_))));
        drop(first);
        assert!(acquire(&path).is_ok());
    }
}
