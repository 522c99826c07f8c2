//! Where a tool finds the binaries it drives.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// `explicit` when given, else `name` in the directory of the running binary (where cargo puts
/// every binary of the workspace). Whether it exists is the caller's to check, so it can say
/// how to build it.
pub fn sibling_or(explicit: Option<&Path>, name: &str) -> anyhow::Result<PathBuf> {
    if let Some(path) = explicit {
        return Ok(path.to_owned());
    }
    let me = std::env::current_exe().context("where is this binary")?;
    Ok(me
        .parent()
        .context("this binary has no directory")?
        .join(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_explicit_path_wins_else_the_sibling() {
        let explicit = Path::new("/opt/enrichd");
        assert_eq!(
            sibling_or(Some(explicit), "enrichd").unwrap(),
            explicit.to_owned()
        );
        let sibling = sibling_or(None, "enrichd-fakes").unwrap();
        assert_eq!(sibling.parent(), std::env::current_exe().unwrap().parent());
        assert!(sibling.ends_with("enrichd-fakes"));
    }
}
