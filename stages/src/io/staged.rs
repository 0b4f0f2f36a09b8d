//! Outputs written whole or not at all: built under a temporary sibling and renamed into place
//! only when complete. Temporaries get unpredictable names (`.NAME.XXXXXX.tmp`) and are created
//! exclusively (`mkdir`, or `O_CREAT | O_EXCL`, which never follows a symbolic link), so a link
//! planted next to the output cannot redirect what is written; one left uncommitted is removed.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Why an output cannot be staged or committed.
#[derive(Debug, thiserror::Error)]
pub enum StagedError {
    /// The output directory exists with files in it.
    #[error("output directory {0} exists and is not empty")]
    DirNotEmpty(PathBuf),
    /// The output file's directory is missing.
    #[error("directory {0} does not exist")]
    NoParent(PathBuf),
    /// The output path ends in `..` or `/`.
    #[error("output path {0} has no file name")]
    NoFileName(PathBuf),
    /// The output file's path is a directory.
    #[error("output {0} is an existing directory")]
    IsDir(PathBuf),
    /// A file system call failed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was being done (`create`, `move the output into`...).
        action: &'static str,
        /// The path it was done to.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StagedError + 'a {
    move |source| StagedError::Io { action, path: path.to_path_buf(), source }
}

/// The directory `path` lives in (`.` for a bare name).
pub fn parent_dir(path: &Path) -> &Path {
    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

fn prefix(path: &Path) -> String {
    format!(".{}.", path.file_name().and_then(|n| n.to_str()).unwrap_or("out"))
}

/// Refuses an output directory that exists and is not empty (an empty one is replaced).
pub fn check_new_dir(path: &Path) -> Result<(), StagedError> {
    if path.exists() && std::fs::read_dir(path).map(|mut d| d.next().is_some()).unwrap_or(true) {
        return Err(StagedError::DirNotEmpty(path.to_path_buf()));
    }
    Ok(())
}

/// Refuses an output file path whose directory is missing or that names a directory.
pub fn check_new_file(path: &Path) -> Result<(), StagedError> {
    let parent = parent_dir(path);
    if !parent.is_dir() {
        return Err(StagedError::NoParent(parent.to_path_buf()));
    }
    if path.file_name().is_none() {
        return Err(StagedError::NoFileName(path.to_path_buf()));
    }
    if path.is_dir() {
        return Err(StagedError::IsDir(path.to_path_buf()));
    }
    Ok(())
}

/// A directory of output files that appears at its final path only when
/// [`StagedDir::commit`] renames it there; dropped uncommitted, it is removed.
#[derive(Debug)]
pub struct StagedDir {
    tmp: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl StagedDir {
    /// Creates the temporary directory for `path` (and `path`'s parent directories).
    pub fn create(path: &Path) -> Result<Self, StagedError> {
        let parent = parent_dir(path);
        std::fs::create_dir_all(parent).map_err(io("create", parent))?;
        let tmp = tempfile::Builder::new()
            .prefix(&prefix(path))
            .suffix(".tmp")
            // The usual mode of a new directory (the umask still applies), not a temporary's 0700.
            .permissions(std::fs::Permissions::from_mode(0o755))
            .tempdir_in(parent)
            .map_err(io("create a temporary directory in", parent))?;
        Ok(Self { tmp: Some(tmp), path: path.to_path_buf() })
    }

    /// Where files go until the commit.
    pub fn dir(&self) -> &Path {
        self.tmp.as_ref().map(|t| t.path()).unwrap_or(&self.path)
    }

    /// Moves the directory into place (replacing an empty directory there).
    pub fn commit(&mut self) -> Result<(), StagedError> {
        let Some(tmp) = self.tmp.take() else { return Ok(()) };
        if self.path.is_dir() {
            std::fs::remove_dir(&self.path).map_err(io("replace empty", &self.path))?;
        }
        let tmp = tmp.keep();
        std::fs::rename(&tmp, &self.path).map_err(|e| {
            let _ = std::fs::remove_dir_all(&tmp);
            io("move the output into", &self.path)(e)
        })
    }
}

/// An output file written under an exclusive temporary name beside `path` and renamed into
/// place by [`StagedFile::commit`]; dropped uncommitted, it is removed.
#[derive(Debug)]
pub struct StagedFile {
    tmp: tempfile::NamedTempFile,
    path: PathBuf,
}

impl StagedFile {
    /// Creates the temporary file for `path` (its name ends like `path`'s, so tools that
    /// guess the format from the extension still can).
    pub fn create(path: &Path) -> Result<Self, StagedError> {
        check_new_file(path)?;
        let ext = path.extension().and_then(|e| e.to_str()).map(|e| format!(".{e}")).unwrap_or_default();
        let tmp = tempfile::Builder::new()
            .prefix(&prefix(path))
            .suffix(&format!(".tmp{ext}"))
            // The usual mode of a new file (the umask still applies), not a temporary's 0600.
            .permissions(std::fs::Permissions::from_mode(0o644))
            .tempfile_in(parent_dir(path))
            .map_err(io("create a temporary file beside", path))?;
        Ok(Self { tmp, path: path.to_path_buf() })
    }

    /// The temporary file's path (for writers that open it by name).
    pub fn tmp_path(&self) -> &Path {
        self.tmp.path()
    }

    /// The open temporary file.
    pub fn file(&mut self) -> &mut std::fs::File {
        self.tmp.as_file_mut()
    }

    /// Renames the file into place (replacing a file or link at `path`, never writing through
    /// it).
    pub fn commit(self) -> Result<(), StagedError> {
        let path = self.path;
        self.tmp.persist(&path).map(drop).map_err(|e| io("move the output into", &path)(e.error))
    }
}

/// Writes `bytes` to `path` whole or not at all.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StagedError> {
    let mut f = StagedFile::create(path)?;
    let tmp = f.tmp_path().to_path_buf();
    f.file().write_all(bytes).map_err(io("write", &tmp))?;
    f.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_or_gone() {
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("frames");
        let mut d = StagedDir::create(&out).unwrap();
        std::fs::write(d.dir().join("a"), b"x").unwrap();
        assert!(!out.exists());
        d.commit().unwrap();
        assert!(out.join("a").is_file());
        assert!(matches!(check_new_dir(&out), Err(StagedError::DirNotEmpty(p)) if p == out));

        let other = root.path().join("sub/other");
        let d = StagedDir::create(&other).unwrap();
        let tmp = d.dir().to_path_buf();
        assert!(tmp.is_dir());
        drop(d);
        assert!(!tmp.exists() && !other.exists(), "an uncommitted directory leaves nothing");
        check_new_dir(&other).unwrap();

        let meta = std::fs::metadata(&out).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o755 & !umask(), "an output directory has the usual mode");
        let json = root.path().join("r.json");
        write_atomic(&json, b"{}").unwrap();
        let meta = std::fs::metadata(&json).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o644 & !umask(), "an output file has the usual mode");

        let file = root.path().join("x.mp4");
        let f = StagedFile::create(&file).unwrap();
        assert!(f.tmp_path().to_str().unwrap().ends_with(".mp4"));
        let tmp = f.tmp_path().to_path_buf();
        drop(f);
        assert!(!tmp.exists() && !file.exists());
        std::fs::create_dir(&file).unwrap();
        assert!(matches!(check_new_file(&file), Err(StagedError::IsDir(_))));
    }

    /// The process's umask (read from /proc, without changing it).
    fn umask() -> u32 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("Umask:")).unwrap();
        u32::from_str_radix(line.split_whitespace().nth(1).unwrap(), 8).unwrap()
    }

    /// A link planted where the old predictable temporary names were (`.NAME.tmpPID`), or at
    /// the final name, is never written through.
    #[test]
    fn planted_links_are_never_written_through() {
        let root = tempfile::tempdir().unwrap();
        let victim = root.path().join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        let pid = std::process::id();
        for name in ["o.json", "frames"] {
            std::os::unix::fs::symlink(&victim, root.path().join(format!(".{name}.tmp{pid}"))).unwrap();
        }
        std::os::unix::fs::symlink(&victim, root.path().join(format!(".o.json.tmp{pid}.json"))).unwrap();
        write_atomic(&root.path().join("o.json"), b"new").unwrap();
        let mut d = StagedDir::create(&root.path().join("frames")).unwrap();
        std::fs::write(d.dir().join("a"), b"x").unwrap();
        d.commit().unwrap();
        // At the final name, the link itself is replaced.
        let out = root.path().join("p.json");
        std::os::unix::fs::symlink(&victim, &out).unwrap();
        write_atomic(&out, b"new").unwrap();
        assert!(!std::fs::symlink_metadata(&out).unwrap().file_type().is_symlink());
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        assert_eq!(std::fs::read(root.path().join("o.json")).unwrap(), b"new");
    }
}
