//! Where a client's frames go: a new directory of JPEGs, MJPEG on stdout or an `.mjpeg` file,
//! each complete or absent (staged, renamed when the session is done).

use std::io::Write;
use std::path::{Path, PathBuf};

use lipsync_stages::io::staged::{check_new_dir, parent_dir, temp_sibling, StagedDir};

use crate::client::ClientError;

/// A frame output that cannot be made or completed.
#[derive(Debug, thiserror::Error)]
pub enum FrameOutError {
    /// The path cannot be used (named in the message).
    #[error("{0}")]
    Path(String),
    /// Writing or renaming failed.
    #[error("cannot write {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Frames written by the client: a directory built under a temporary name, stdout or a file
/// (temporary sibling, renamed when complete).
pub enum FrameOut {
    /// Frames are counted only.
    None,
    /// A new directory of `NNNNNN.jpg`, renamed into place when complete.
    Dir {
        /// The staged directory.
        dir: StagedDir,
        /// Name buffer.
        name: String,
    },
    /// Concatenated JPEGs on a stream (stdout).
    Stream(Box<dyn Write + Send>),
    /// Concatenated JPEGs in a file, written under a temporary name and renamed when complete.
    File {
        /// The temporary file.
        tmp: PathBuf,
        /// The final name.
        path: PathBuf,
        /// The writer.
        file: std::io::BufWriter<std::fs::File>,
    },
}

impl FrameOut {
    /// The writer for `output` (`None`: count only; `-`: stdout; `*.mjpeg`: a file; else a
    /// new directory), checked before anything streams.
    pub fn open(output: Option<&Path>) -> Result<Self, FrameOutError> {
        let Some(path) = output else { return Ok(FrameOut::None) };
        if path == Path::new("-") {
            return Ok(FrameOut::Stream(Box::new(std::io::BufWriter::new(std::io::stdout()))));
        }
        let parent = parent_dir(path);
        if !parent.is_dir() {
            return Err(FrameOutError::Path(format!("directory {} does not exist", parent.display())));
        }
        if path.file_name().is_none() {
            return Err(FrameOutError::Path(format!("output path {} has no file name", path.display())));
        }
        if path.extension().is_some_and(|e| e == "mjpeg" || e == "mjpg") {
            let tmp = temp_sibling(path);
            let file = std::fs::File::create(&tmp).map_err(|source| FrameOutError::Io { path: tmp.clone(), source })?;
            return Ok(FrameOut::File { tmp, path: path.to_path_buf(), file: std::io::BufWriter::new(file) });
        }
        check_new_dir(path).map_err(FrameOutError::Path)?;
        Ok(FrameOut::Dir { dir: StagedDir::create(path).map_err(FrameOutError::Path)?, name: String::new() })
    }

    /// Writes frame `index`.
    pub fn write(&mut self, index: u32, jpeg: &[u8]) -> Result<(), ClientError> {
        let io = |what: String| move |source| ClientError::Io { what, source };
        match self {
            FrameOut::None => Ok(()),
            FrameOut::Dir { dir, name } => {
                use std::fmt::Write as _;
                name.clear();
                let _ = write!(name, "{index:06}.jpg");
                let p = dir.dir().join(&*name);
                std::fs::write(&p, jpeg).map_err(io(format!("writing {}", p.display())))
            }
            FrameOut::Stream(w) => w.write_all(jpeg).map_err(io("writing to stdout".into())),
            FrameOut::File { file, tmp, .. } => file.write_all(jpeg).map_err(io(format!("writing {}", tmp.display()))),
        }
    }

    /// Completes the output (renames it into place).
    pub fn finish(self) -> Result<(), FrameOutError> {
        match self {
            FrameOut::None => Ok(()),
            FrameOut::Dir { mut dir, .. } => dir.commit().map_err(FrameOutError::Path),
            FrameOut::Stream(mut w) => w.flush().map_err(|source| FrameOutError::Io { path: "stdout".into(), source }),
            FrameOut::File { tmp, path, file } => {
                file.into_inner().map_err(|e| FrameOutError::Io { path: tmp.clone(), source: e.into_error() })?;
                std::fs::rename(&tmp, &path).map_err(|source| FrameOutError::Io { path: path.clone(), source })
            }
        }
    }

    /// Removes what was written (a staged directory removes itself when dropped).
    pub fn discard(self) {
        if let FrameOut::File { tmp, .. } = self {
            let _ = std::fs::remove_file(tmp);
        }
    }
}
