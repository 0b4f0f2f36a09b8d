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

/// An f32 `.npy` file written as its values come, for arrays too large to hold: the shape is
/// given first, [`NpyStream::finish`] checks that exactly that many values came.
#[derive(Debug)]
pub struct NpyStream {
    out: std::io::BufWriter<std::fs::File>,
    path: PathBuf,
    left: usize,
}

impl NpyStream {
    /// Creates `path` (npy format 1.0, little-endian f32, C order) for an array of `shape`.
    pub fn create(path: &Path, shape: &[usize]) -> Result<Self, NpyError> {
        use std::io::Write;
        let err = |e: std::io::Error| NpyError::Write { path: path.to_path_buf(), message: e.to_string() };
        let dims = shape.iter().map(|d| format!("{d},")).collect::<String>();
        let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({dims}), }}");
        // Magic (6) + version (2) + header length (2) + header, padded to 64 bytes with '\n' last.
        let pad = (64 - (10 + header.len() + 1) % 64) % 64;
        header.push_str(&" ".repeat(pad));
        header.push('\n');
        let mut out = std::io::BufWriter::new(std::fs::File::create(path).map_err(err)?);
        out.write_all(b"\x93NUMPY\x01\x00").map_err(err)?;
        let len = u16::try_from(header.len()).expect("a short header");
        out.write_all(&len.to_le_bytes()).map_err(err)?;
        out.write_all(header.as_bytes()).map_err(err)?;
        Ok(Self { out, path: path.to_path_buf(), left: shape.iter().product() })
    }

    /// Appends values (row-major order).
    pub fn push(&mut self, values: &[f32]) -> Result<(), NpyError> {
        use std::io::Write;
        if values.len() > self.left {
            return Err(NpyError::Write {
                path: self.path.clone(),
                message: "more values than the shape holds".into(),
            });
        }
        self.left -= values.len();
        for v in values {
            self.out
                .write_all(&v.to_le_bytes())
                .map_err(|e| NpyError::Write { path: self.path.clone(), message: e.to_string() })?;
        }
        Ok(())
    }

    /// Flushes the file; an error unless every value of the shape was pushed.
    pub fn finish(mut self) -> Result<(), NpyError> {
        use std::io::Write;
        if self.left != 0 {
            return Err(NpyError::Write { path: self.path, message: format!("{} values missing", self.left) });
        }
        self.out.flush().map_err(|e| NpyError::Write { path: self.path.clone(), message: e.to_string() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_streamed_array_reads_back_with_ndarray_npy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.npy");
        let mut s = NpyStream::create(&path, &[2, 3]).unwrap();
        s.push(&[1.0, 2.0]).unwrap();
        s.push(&[3.0, 4.0, 5.5, -6.0]).unwrap();
        assert!(s.push(&[7.0]).is_err(), "more than the shape");
        s.finish().unwrap();
        let a = read_f32_2d(&path).unwrap();
        assert_eq!(a.shape(), &[2, 3]);
        assert_eq!(a.iter().copied().collect::<Vec<_>>(), vec![1.0, 2.0, 3.0, 4.0, 5.5, -6.0]);
        let short = NpyStream::create(&path, &[4]).unwrap();
        assert!(short.finish().unwrap_err().to_string().contains("4 values missing"));
    }
}
