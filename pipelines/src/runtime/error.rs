//! The runtime's errors: a stage's ([`StageError`]) and a pipeline's ([`PipelineError`]).

use std::sync::Arc;

/// A boxed error that crosses threads.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A failure described only by text (for checks that have no error type of their own).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct Message(pub String);

/// Why a stage stopped early.
#[derive(Debug)]
pub enum StageError {
    /// The stage failed; the pipeline reports this.
    Failed {
        /// The item (output frame) being worked on, when known.
        item: Option<usize>,
        /// What went wrong.
        source: BoxError,
    },
    /// Another stage failed or a neighbour went away: stop quietly.
    Cancelled,
}

impl StageError {
    /// A failure at item `item` caused by `source`.
    pub fn failed(item: Option<usize>, source: impl Into<BoxError>) -> Self {
        StageError::Failed { item, source: source.into() }
    }

    /// A failure at item `item` described by `message`.
    pub fn at(item: usize, message: impl std::fmt::Display) -> Self {
        StageError::Failed { item: Some(item), source: Box::new(Message(message.to_string())) }
    }

    /// A failure not tied to one item, described by `message`.
    pub fn msg(message: impl std::fmt::Display) -> Self {
        StageError::Failed { item: None, source: Box::new(Message(message.to_string())) }
    }
}

/// What stopped a pipeline.
#[derive(Debug, Clone)]
pub enum ErrorKind {
    /// A stage returned an error.
    Failed(Arc<dyn std::error::Error + Send + Sync + 'static>),
    /// A stage panicked (the panic's text).
    Panicked(String),
    /// The pipeline was cancelled from outside (no stage failed).
    Cancelled,
}

/// The error a pipeline run returns: the first stage failure.
#[derive(Debug, Clone, thiserror::Error)]
#[error("stage `{stage}` {}{}: {}",
    match kind { ErrorKind::Panicked(_) => "panicked", ErrorKind::Cancelled => "was cancelled", ErrorKind::Failed(_) => "failed" },
    item.map(|f| format!(" at frame {f}")).unwrap_or_default(),
    self.message())]
pub struct PipelineError {
    /// The stage's name (`pipeline` for a cancel from outside).
    pub stage: String,
    /// The item (frame index), when known.
    pub item: Option<usize>,
    /// What happened.
    pub kind: ErrorKind,
}

impl PipelineError {
    /// A failure of `stage` before or outside its item loop (setup, opening a model).
    pub fn setup(stage: &str, source: impl Into<BoxError>) -> Self {
        let source: BoxError = source.into();
        PipelineError { stage: stage.to_string(), item: None, kind: ErrorKind::Failed(Arc::from(source)) }
    }

    /// The error's own text, without the stage and item.
    pub fn message(&self) -> String {
        match &self.kind {
            ErrorKind::Failed(e) => e.to_string(),
            ErrorKind::Panicked(m) => m.clone(),
            ErrorKind::Cancelled => "cancelled".to_string(),
        }
    }

    /// Whether the pipeline was cancelled from outside rather than failing.
    pub fn is_cancelled(&self) -> bool {
        matches!(self.kind, ErrorKind::Cancelled)
    }
}
