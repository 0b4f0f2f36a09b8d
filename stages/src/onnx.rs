//! ONNX Runtime, found without surprises: locating the shared library, creating the
//! environment, opening models with explicit threading, and checking model signatures.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::ValueType;

/// The ONNX Runtime version this project pins (the PyPI wheel that `scripts/setup.sh` installs).
pub const PINNED_ORT_VERSION: &str = "1.31.1";

/// Errors from locating ONNX Runtime or opening and checking models.
#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    /// A path given explicitly (flag or environment variable) does not exist.
    #[error("ONNX Runtime library given by {source_name} does not exist: {path}")]
    GivenPathMissing {
        /// Where the path came from (`--ort-lib`, `$LIPSYNC_ORT_LIB`, ...).
        source_name: String,
        /// The missing path.
        path: PathBuf,
    },
    /// No library was found anywhere.
    #[error(
        "ONNX Runtime shared library not found (looked at --ort-lib, $LIPSYNC_ORT_LIB, $ORT_DYLIB_PATH \
         and the project venv under {searched}). Run ./scripts/setup.sh to install onnxruntime=={PINNED_ORT_VERSION} \
         into .venv, or pass --ort-lib /path/to/libonnxruntime.so"
    )]
    NotFound {
        /// The directories searched for a project `.venv`.
        searched: String,
    },
    /// The library exists but could not be loaded.
    #[error("could not load ONNX Runtime from {path}: {message}")]
    Load {
        /// The library path.
        path: PathBuf,
        /// The loader's message.
        message: String,
    },
    /// Creating the ONNX Runtime environment failed.
    #[error("could not create the ONNX Runtime environment: {0}")]
    Environment(String),
    /// A model file is missing.
    #[error("{what} model not found: {path}")]
    ModelMissing {
        /// Which model (UNet, audio encoder).
        what: String,
        /// The path that was expected to hold it.
        path: PathBuf,
    },
    /// ONNX Runtime refused to open a model.
    #[error("could not open {what} model {path}: {message}")]
    ModelOpen {
        /// Which model.
        what: String,
        /// Its path.
        path: PathBuf,
        /// ONNX Runtime's message.
        message: String,
    },
    /// A model's inputs or outputs are not what the pipeline needs.
    #[error("{what} model {path} has the wrong signature: {problem}; expected {expected}; the model has {actual}")]
    Signature {
        /// Which model.
        what: String,
        /// Its path.
        path: PathBuf,
        /// The first mismatch found.
        problem: String,
        /// The expected signature, printed.
        expected: String,
        /// The model's signature, printed.
        actual: String,
    },
}

/// Where the ONNX Runtime library was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrtLibSource {
    /// `--ort-lib PATH`.
    Flag,
    /// `$LIPSYNC_ORT_LIB`.
    LipsyncEnv,
    /// `$ORT_DYLIB_PATH`.
    OrtDylibEnv,
    /// The project's `.venv` made by `scripts/setup.sh`.
    ProjectVenv,
}

impl fmt::Display for OrtLibSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OrtLibSource::Flag => "--ort-lib",
            OrtLibSource::LipsyncEnv => "$LIPSYNC_ORT_LIB",
            OrtLibSource::OrtDylibEnv => "$ORT_DYLIB_PATH",
            OrtLibSource::ProjectVenv => "project .venv",
        })
    }
}

/// A located ONNX Runtime shared library.
#[derive(Debug, Clone)]
pub struct OrtLibrary {
    /// Path of the shared library.
    pub path: PathBuf,
    /// Which rule found it.
    pub source: OrtLibSource,
}

/// Finds the ONNX Runtime library: `flag`, then `$LIPSYNC_ORT_LIB`, `$ORT_DYLIB_PATH`, then a
/// project `.venv` in the ancestors of the executable, of the working directory, or of this
/// source tree. A flag or variable that names a missing file is an error (no silent fallback).
pub fn locate_ort_library(flag: Option<&Path>) -> Result<OrtLibrary, OnnxError> {
    let env = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    let given = [
        (flag.map(Path::to_path_buf), OrtLibSource::Flag),
        (env("LIPSYNC_ORT_LIB"), OrtLibSource::LipsyncEnv),
        (env("ORT_DYLIB_PATH"), OrtLibSource::OrtDylibEnv),
    ];
    for (path, source) in given {
        if let Some(path) = path {
            if !path.is_file() {
                return Err(OnnxError::GivenPathMissing { source_name: source.to_string(), path });
            }
            return Ok(OrtLibrary { path, source });
        }
    }
    let roots = venv_search_roots();
    for root in &roots {
        if let Some(path) = find_in_venv(&root.join(".venv")) {
            return Ok(OrtLibrary { path, source: OrtLibSource::ProjectVenv });
        }
    }
    let searched = roots.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
    Err(OnnxError::NotFound { searched })
}

fn venv_search_roots() -> Vec<PathBuf> {
    let mut starts = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        starts.push(exe);
    }
    if let Ok(cwd) = std::env::current_dir() {
        starts.push(cwd);
    }
    starts.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    let mut roots: Vec<PathBuf> = Vec::new();
    for start in starts {
        for dir in start.ancestors() {
            if dir.join(".venv").is_dir() && !roots.iter().any(|r| r == dir) {
                roots.push(dir.to_path_buf());
            }
        }
    }
    roots
}

/// The project's Python (`.venv/bin/python`, made by `scripts/setup.sh`), searched like the
/// ONNX Runtime library: from the executable, the working directory and this source tree up.
pub fn find_venv_python() -> Option<PathBuf> {
    venv_search_roots().into_iter().map(|root| root.join(".venv/bin/python")).find(|p| p.is_file())
}

/// The `libonnxruntime.so*` inside a Python venv's `onnxruntime` package, if any.
pub fn find_in_venv(venv: &Path) -> Option<PathBuf> {
    let lib = venv.join("lib");
    let mut pythons: Vec<PathBuf> = std::fs::read_dir(&lib)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("python3")))
        .collect();
    pythons.sort();
    for py in pythons {
        let capi = py.join("site-packages/onnxruntime/capi");
        let pinned = capi.join(format!("libonnxruntime.so.{PINNED_ORT_VERSION}"));
        if pinned.is_file() {
            return Some(pinned);
        }
        let mut libs: Vec<PathBuf> = std::fs::read_dir(&capi)
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("libonnxruntime.so")))
            .collect();
        libs.sort();
        if let Some(lib) = libs.pop() {
            return Some(lib);
        }
    }
    None
}

/// A loaded ONNX Runtime: the library it came from and the environment sessions are built in.
#[derive(Clone)]
pub struct OrtRuntime {
    /// The library in use.
    pub library: OrtLibrary,
    /// The ONNX Runtime environment (shared by all sessions).
    pub env: Arc<ort::environment::Environment>,
}

impl fmt::Debug for OrtRuntime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OrtRuntime").field("library", &self.library).finish()
    }
}

impl OrtRuntime {
    /// Locates (see [`locate_ort_library`]) and loads ONNX Runtime, and creates the environment.
    /// ONNX Runtime allows one environment per process: later calls return the same runtime
    /// (an error if they locate a different library).
    pub fn load(flag: Option<&Path>) -> Result<Self, OnnxError> {
        static RUNTIME: std::sync::Mutex<Option<OrtRuntime>> = std::sync::Mutex::new(None);
        let library = locate_ort_library(flag)?;
        let mut slot = RUNTIME.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(rt) = slot.as_ref() {
            if rt.library.path != library.path {
                return Err(OnnxError::Load {
                    path: library.path,
                    message: format!(
                        "ONNX Runtime is already loaded from {} in this process",
                        rt.library.path.display()
                    ),
                });
            }
            return Ok(rt.clone());
        }
        let builder = ort::init_from(&library.path)
            .map_err(|e| OnnxError::Load { path: library.path.clone(), message: e.to_string() })?;
        let env = builder
            .with_name("lipsync")
            .with_telemetry(false)
            .build()
            .map_err(|e| OnnxError::Environment(e.to_string()))?;
        let rt = Self { library, env: Arc::new(env) };
        *slot = Some(rt.clone());
        Ok(rt)
    }

    /// ONNX Runtime's build string (`ORT Build Info: git-branch=rel-1.31.1, ...`).
    pub fn build_info(&self) -> &'static str {
        ort::info()
    }

    /// The ONNX Runtime version (`OrtGetApiBase()->GetVersionString()`, e.g. `1.31.1`).
    pub fn version(&self) -> String {
        library_version(&self.library.path).unwrap_or_else(|| "unknown".to_string())
    }

    /// Names of the execution providers this ONNX Runtime build supports.
    pub fn available_providers(&self) -> Vec<String> {
        let api = ort::api();
        let mut list: *mut *mut std::ffi::c_char = std::ptr::null_mut();
        let mut n: std::ffi::c_int = 0;
        // SAFETY: the function fills `list` with `n` NUL-terminated strings that stay valid until
        // ReleaseAvailableProviders; we copy them out before releasing.
        unsafe {
            let status = (api.GetAvailableProviders)(&mut list, &mut n);
            if !status.0.is_null() {
                (api.ReleaseStatus)(status.0);
                return Vec::new();
            }
            if list.is_null() {
                return Vec::new();
            }
            let names = (0..n as isize)
                .map(|i| std::ffi::CStr::from_ptr(*list.offset(i)).to_string_lossy().into_owned())
                .collect();
            let status = (api.ReleaseAvailableProviders)(list, n);
            if !status.0.is_null() {
                (api.ReleaseStatus)(status.0);
            }
            names
        }
    }

    /// Opens a model for CPU inference with explicit threading: `intra_threads` intra-op threads,
    /// one inter-op thread, spinning as given, all graph optimisations.
    pub fn open_model(&self, what: &str, path: &Path, opts: &SessionOptions) -> Result<Session, OnnxError> {
        if !path.is_file() {
            return Err(OnnxError::ModelMissing { what: what.to_string(), path: path.to_path_buf() });
        }
        let err = |message: String| OnnxError::ModelOpen { what: what.to_string(), path: path.to_path_buf(), message };
        let msg = |e: ort::Error<ort::session::builder::SessionBuilder>| err(e.to_string());
        let builder = Session::builder(&self.env).map_err(|e| err(e.to_string()))?;
        let builder = builder.with_optimization_level(GraphOptimizationLevel::All).map_err(msg)?;
        let builder = builder.with_intra_threads(opts.intra_threads.max(1)).map_err(msg)?;
        let builder = builder.with_inter_threads(1).map_err(msg)?;
        let builder = builder.with_intra_op_spinning(opts.spinning).map_err(msg)?;
        let builder = builder.with_inter_op_spinning(false).map_err(msg)?;
        // No memory pattern: ORT would preallocate every activation of the largest batch seen
        // in one block. Measured on the sample (full UNet, 200 frames, 2 threads): batch 8
        // 3.59 -> 2.28 GB peak RSS and 13.3 -> 14.0 frames/s; batch 1 1.16 -> 1.00 GB, 14.2 ->
        // 13.8 frames/s.
        let mut builder = builder.with_memory_pattern(false).map_err(msg)?;
        builder.commit_from_file(path).map_err(|e| err(e.to_string()))
    }
}

#[cfg(feature = "cuda")]
impl OrtRuntime {
    /// Opens a model on the CUDA execution provider; an error when CUDA cannot be registered.
    pub fn open_model_cuda(&self, what: &str, path: &Path, opts: &SessionOptions) -> Result<Session, OnnxError> {
        if !path.is_file() {
            return Err(OnnxError::ModelMissing { what: what.to_string(), path: path.to_path_buf() });
        }
        let err = |message: String| OnnxError::ModelOpen { what: what.to_string(), path: path.to_path_buf(), message };
        let msg = |e: ort::Error<ort::session::builder::SessionBuilder>| err(e.to_string());
        let builder = Session::builder(&self.env).map_err(|e| err(e.to_string()))?;
        let builder =
            builder.with_execution_providers([ort::ep::CUDA::default().build().error_on_failure()]).map_err(msg)?;
        let builder = builder.with_optimization_level(GraphOptimizationLevel::All).map_err(msg)?;
        let builder = builder.with_intra_threads(opts.intra_threads.max(1)).map_err(msg)?;
        let mut builder = builder.with_intra_op_spinning(opts.spinning).map_err(msg)?;
        builder.commit_from_file(path).map_err(|e| err(e.to_string()))
    }
}

/// Reads the version string of an ONNX Runtime library without creating anything.
pub fn library_version(path: &Path) -> Option<String> {
    // SAFETY: OrtGetApiBase takes no arguments and returns a pointer to a static struct whose
    // GetVersionString returns a static NUL-terminated string. The library stays loaded (ort
    // holds its own handle), so dropping ours only lowers the reference count.
    unsafe {
        let lib = libloading::Library::new(path).ok()?;
        let get: libloading::Symbol<unsafe extern "C" fn() -> *const ort::sys::OrtApiBase> =
            lib.get(b"OrtGetApiBase").ok()?;
        let base = get();
        if base.is_null() {
            return None;
        }
        let v = ((*base).GetVersionString)();
        (!v.is_null()).then(|| std::ffi::CStr::from_ptr(v).to_string_lossy().into_owned())
    }
}

/// Threading options of one ONNX Runtime session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionOptions {
    /// Intra-op threads (at least 1).
    pub intra_threads: usize,
    /// Whether ORT's threads spin while waiting (off by default: they fight pinned stages).
    pub spinning: bool,
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self { intra_threads: 1, spinning: false }
    }
}

/// One dimension of an expected tensor shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dim {
    /// The batch dimension: dynamic in the model, or any fixed size.
    Batch,
    /// A fixed size the model must have (or leave dynamic).
    Fixed(i64),
}

/// An expected f32 tensor: name and shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// Input or output name.
    pub name: String,
    /// Expected shape.
    pub dims: Vec<Dim>,
}

impl fmt::Display for TensorSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dims: Vec<String> = self
            .dims
            .iter()
            .map(|d| match d {
                Dim::Batch => "N".to_string(),
                Dim::Fixed(v) => v.to_string(),
            })
            .collect();
        write!(f, "`{}` f32 [{}]", self.name, dims.join(","))
    }
}

/// The inputs and outputs a model must have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    /// Required inputs (the model may not have others).
    pub inputs: Vec<TensorSpec>,
    /// Required outputs (the model may have more).
    pub outputs: Vec<TensorSpec>,
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |v: &[TensorSpec]| v.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
        write!(f, "inputs {} -> outputs {}", list(&self.inputs), list(&self.outputs))
    }
}

/// Names of the model inputs and outputs (docs/spec.md defaults; an avatar may rename them).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelIo {
    /// UNet image input (`input`, [N,6,S,S]).
    pub unet_image_input: String,
    /// UNet audio input (`audio`, [N,32,16,16]).
    pub unet_audio_input: String,
    /// UNet output (`output`, [N,3,S,S]).
    pub unet_output: String,
    /// Audio encoder input (`mel_spectrogram`, [N,1,80,16]).
    pub encoder_input: String,
    /// Audio encoder output (`audio_features`, [N,512]).
    pub encoder_output: String,
}

impl Default for ModelIo {
    fn default() -> Self {
        Self {
            unet_image_input: "input".into(),
            unet_audio_input: "audio".into(),
            unet_output: "output".into(),
            encoder_input: "mel_spectrogram".into(),
            encoder_output: "audio_features".into(),
        }
    }
}

fn spec(name: &str, dims: &[Dim]) -> TensorSpec {
    TensorSpec { name: name.to_string(), dims: dims.to_vec() }
}

impl ModelIo {
    /// The UNet signature for a square model input of `size` pixels (320 for the 328 family).
    pub fn unet_signature(&self, size: i64) -> Signature {
        use Dim::*;
        Signature {
            inputs: vec![
                spec(&self.unet_image_input, &[Batch, Fixed(6), Fixed(size), Fixed(size)]),
                spec(&self.unet_audio_input, &[Batch, Fixed(32), Fixed(16), Fixed(16)]),
            ],
            outputs: vec![spec(&self.unet_output, &[Batch, Fixed(3), Fixed(size), Fixed(size)])],
        }
    }

    /// The audio encoder signature.
    pub fn encoder_signature(&self) -> Signature {
        use Dim::*;
        Signature {
            inputs: vec![spec(&self.encoder_input, &[Batch, Fixed(1), Fixed(80), Fixed(16)])],
            outputs: vec![spec(&self.encoder_output, &[Batch, Fixed(512)])],
        }
    }
}

/// A model's actual inputs and outputs, printed as `name type [dims]` with `-1` for dynamic.
pub fn describe(session: &Session) -> String {
    let list = |outlets: &[ort::value::Outlet]| {
        outlets.iter().map(|o| format!("`{}` {}", o.name(), describe_type(o.dtype()))).collect::<Vec<_>>().join(", ")
    };
    format!("inputs {} -> outputs {}", list(session.inputs()), list(session.outputs()))
}

fn describe_type(t: &ValueType) -> String {
    match (t.tensor_type(), t.tensor_shape()) {
        (Some(ty), Some(shape)) => {
            let dims: Vec<String> =
                shape.iter().map(|d| if *d < 0 { "N".to_string() } else { d.to_string() }).collect();
            format!("{ty} [{}]", dims.join(","))
        }
        _ => format!("{t}"),
    }
}

/// Checks `session` against `expected`; the error names the first mismatch, the whole
/// expected signature and what the model has.
pub fn check_signature(session: &Session, expected: &Signature, what: &str, path: &Path) -> Result<(), OnnxError> {
    let fail = |problem: String| OnnxError::Signature {
        what: what.to_string(),
        path: path.to_path_buf(),
        problem,
        expected: expected.to_string(),
        actual: describe(session),
    };
    let check = |outlets: &[ort::value::Outlet], spec: &TensorSpec, kind: &str| -> Result<(), OnnxError> {
        let outlet = outlets
            .iter()
            .find(|o| o.name() == spec.name)
            .ok_or_else(|| fail(format!("no {kind} named `{}`", spec.name)))?;
        let ty = outlet.dtype();
        if ty.tensor_type() != Some(ort::value::TensorElementType::Float32) {
            return Err(fail(format!("{kind} `{}` is {}, not f32", spec.name, describe_type(ty))));
        }
        let shape = ty.tensor_shape().ok_or_else(|| fail(format!("{kind} `{}` is not a tensor", spec.name)))?;
        if shape.len() != spec.dims.len() {
            return Err(fail(format!("{kind} `{}` has rank {}, expected {}", spec.name, shape.len(), spec.dims.len())));
        }
        for (axis, (have, want)) in shape.iter().zip(&spec.dims).enumerate() {
            if let Dim::Fixed(want) = want {
                if *have >= 0 && have != want {
                    return Err(fail(format!("{kind} `{}` axis {axis} is {have}, expected {want}", spec.name)));
                }
            }
        }
        Ok(())
    };
    for spec in &expected.inputs {
        check(session.inputs(), spec, "input")?;
    }
    if let Some(extra) = session.inputs().iter().find(|o| !expected.inputs.iter().any(|s| s.name == o.name())) {
        return Err(fail(format!("unexpected extra input `{}`", extra.name())));
    }
    for spec in &expected.outputs {
        check(session.outputs(), spec, "output")?;
    }
    Ok(())
}
