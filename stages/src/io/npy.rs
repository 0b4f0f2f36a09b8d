//! `.npy` files (numpy's format) for inspection outputs and test fixtures, written whole or
//! not at all.

use std::path::{Path, PathBuf};

use ndarray::{Array2, ArrayView2};

/// Errors reading or writing `.npy` files.
#[derive(Debug, thiserror::Error)]
pub enum NpyError {
    /// Reading failed (missing file, wrong dtype or rank).
    #[error("could not read {path} as a 2-D f32 .npy array: {message}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// Writing failed.
    #[error("could not write {path}: {message}")]
    Write {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
}

/// Reads a 2-D f32 array.
pub fn read_f32_2d(path: &Path) -> Result<Array2<f32>, NpyError> {
    ndarray_npy::read_npy(path).map_err(|e| NpyError::Read { path: path.to_path_buf(), message: e.to_string() })
}

/// Writes a 2-D f32 array atomically (temporary file, then rename).
pub fn write_f32_2d(path: &Path, array: ArrayView2<'_, f32>) -> Result<(), NpyError> {
    let err = |message: String| NpyError::Write { path: path.to_path_buf(), message };
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| err(e.to_string()))?;
    ndarray_npy::write_npy(tmp.path(), &array).map_err(|e| err(e.to_string()))?;
    tmp.persist(path).map_err(|e| err(e.to_string()))?;
    Ok(())
}
