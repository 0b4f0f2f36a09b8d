//! Outputs written whole or not at all: built under a temporary sibling name
//! (`.NAME.tmpPID`) and renamed into place only when complete.

use std::path::{Path, PathBuf};

/// The directory `path` lives in (`.` for a bare name).
pub fn parent_dir(path: &Path) -> &Path {
    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// The temporary sibling of `path`: `.NAME.tmpPID` in the same directory, so that the final
/// rename stays on one file system.
pub fn temp_sibling(path: &Path) -> PathBuf {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("out");
    parent_dir(path).join(format!(".{name}.tmp{}", std::process::id()))
}

/// Refuses an output directory that exists and is not empty (an empty one is replaced).
pub fn check_new_dir(path: &Path) -> Result<(), String> {
    if path.exists() && std::fs::read_dir(path).map(|mut d| d.next().is_some()).unwrap_or(true) {
        return Err(format!("output directory {} exists and is not empty", path.display()));
    }
    Ok(())
}

/// A directory of output files that appears at its final path only when
/// [`StagedDir::commit`] renames it there; dropped uncommitted, it is removed.
#[derive(Debug)]
pub struct StagedDir {
    tmp: PathBuf,
    path: PathBuf,
    done: bool,
}

impl StagedDir {
    /// Creates the temporary directory for `path` (and `path`'s parent directories).
    pub fn create(path: &Path) -> Result<Self, String> {
        let parent = parent_dir(path);
        std::fs::create_dir_all(parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        let tmp = temp_sibling(path);
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir(&tmp).map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
        Ok(Self { tmp, path: path.to_path_buf(), done: false })
    }

    /// Where files go until the commit.
    pub fn dir(&self) -> &Path {
        &self.tmp
    }

    /// Moves the directory into place (replacing an empty directory there).
    pub fn commit(&mut self) -> Result<(), String> {
        if self.path.exists() {
            std::fs::remove_dir(&self.path)
                .map_err(|e| format!("cannot replace empty {}: {e}", self.path.display()))?;
        }
        std::fs::rename(&self.tmp, &self.path)
            .map_err(|e| format!("cannot move frames into {}: {e}", self.path.display()))?;
        self.done = true;
        Ok(())
    }
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_or_gone() {
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("frames");
        let mut d = StagedDir::create(&out).unwrap();
        assert_eq!(d.dir(), temp_sibling(&out));
        std::fs::write(d.dir().join("a"), b"x").unwrap();
        assert!(!out.exists());
        d.commit().unwrap();
        assert!(out.join("a").is_file());
        assert!(check_new_dir(&out).unwrap_err().contains("not empty"));

        let other = root.path().join("sub/other");
        let d = StagedDir::create(&other).unwrap();
        let tmp = d.dir().to_path_buf();
        assert!(tmp.is_dir());
        drop(d);
        assert!(!tmp.exists() && !other.exists(), "an uncommitted directory leaves nothing");
        check_new_dir(&other).unwrap();
    }
}
