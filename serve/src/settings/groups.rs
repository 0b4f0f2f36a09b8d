//! The settings `lipsync render` and `lipsync serve` share, declared once: each group is a set
//! of flags (`#[command(flatten)]`) and of config-file keys (`#[serde(flatten)]`) with one set
//! of defaults and ranges, resolved by one function.

use std::time::Duration;

use clap::Args;
use lipsync_stages::unet::{BatchSetting, PrecisionSetting, Provider, RemoteSettings, RemoteUrlError};
use serde::Deserialize;

use super::limits::Limit;
use super::SettingsError;

/// ONNX Runtime intra-op threads of a UNet (default: every CPU, [`cpus`]).
pub const THREADS: Limit<usize> = Limit::new("threads", 1, 1024, 0);
/// Deadline of each remote request, ms.
pub const REMOTE_TIMEOUT_MS: Limit<u64> =
    Limit::new("remote timeout (ms)", 1, 600_000, RemoteSettings::DEFAULT_TIMEOUT.as_millis() as u64);
/// Retries of a remote request the server could not take.
pub const REMOTE_RETRIES: Limit<u32> = Limit::new("remote retries", 0, 10, RemoteSettings::DEFAULT_RETRIES);
/// Decoded template frames a graph keeps for the ping-pong's backward pass, MiB.
pub const TEMPLATE_CACHE_MB: Limit<usize> = Limit::new("template cache (MiB)", 1, 65_536, 24);
/// The most an avatar's JPEG frames may take, MiB (0: none).
pub const JPEG_TEMPLATE_MB: Limit<usize> = Limit::new("JPEG template (MiB)", 0, 65_536, 256);

/// The CPUs this process may use (the default of [`THREADS`]).
pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Where and how the UNet runs.
#[derive(Debug, Clone, Default, Args, Deserialize)]
pub struct InferenceOptions {
    // Flags and keys share their names; help texts come from the constants above.
    #[arg(long, value_enum, help = "UNet execution provider [default: cpu]")]
    pub provider: Option<Provider>,
    #[arg(
        long,
        value_enum,
        help = "Which of the avatar's UNets to run (an int8 model is made by `lipsync model quantize`) [default: auto]"
    )]
    pub precision: Option<PrecisionSetting>,
    #[arg(
        long,
        alias = "batch",
        help = "Most frames per UNet run (across sessions in a daemon): auto (1 on the CPU, measured at start on a GPU) or 1..=32 [default: auto]"
    )]
    #[serde(alias = "batch")]
    pub max_batch: Option<BatchSetting>,
    #[arg(long, alias = "intra-threads", value_name = "N", help = THREADS.help_with("ONNX Runtime intra-op threads of each UNet", "every CPU"))]
    #[serde(alias = "intra_threads")]
    pub threads: Option<usize>,
    #[arg(long, help = "Let ONNX Runtime's threads spin while idle (lower latency, busy cores)")]
    #[serde(default)]
    pub spin: bool,
}

/// The inference server of `--provider remote`.
#[derive(Debug, Clone, Default, Args, Deserialize)]
pub struct RemoteOptions {
    #[arg(
        long,
        value_name = "URL",
        help = "Inference server of `--provider remote`: grpc://HOST:PORT (Open Inference Protocol: Triton, KServe, MLServer)"
    )]
    pub remote_url: Option<String>,
    #[arg(long, value_name = "NAME", help = "The UNet's model name on the remote server")]
    pub remote_model: Option<String>,
    #[arg(long, value_name = "MS", help = REMOTE_TIMEOUT_MS.help("Deadline of each remote request, ms"))]
    pub remote_timeout_ms: Option<u64>,
    #[arg(long, value_name = "N", help = REMOTE_RETRIES.help("Retries of a request the remote server could not take"))]
    pub remote_retries: Option<u32>,
}

/// How the template is held.
#[derive(Debug, Clone, Default, Args, Deserialize)]
pub struct TemplateOptions {
    #[arg(
        long,
        value_name = "MIB",
        help = TEMPLATE_CACHE_MB.help_with(
            "Decoded template frames kept for the ping-pong's backward pass, MiB (a frames directory: raw frames held, the rest compressed): for each session of a daemon; for a render, also the most its JPEG frames may take",
            "a daemon: 24; a render: what --memory-mb leaves after the models, up to the whole template",
        )
    )]
    pub template_cache_mb: Option<usize>,
    #[arg(
        long,
        value_name = "MIB",
        help = JPEG_TEMPLATE_MB.help_with(
            "Most an avatar's JPEG frames may take, MiB (0: none): each template frame's JPEG and its face region, for JPEG output, which then decodes nothing and encodes only the mouth region; a template too large for it is decoded instead",
            "a daemon: 256, shared by the avatar's sessions at its quality; a render: --template-cache-mb, else what --memory-mb leaves",
        )
    )]
    pub jpeg_template_mb: Option<usize>,
}

/// [`InferenceOptions`], checked.
#[derive(Debug, Clone)]
pub struct Inference {
    /// Execution provider.
    pub provider: Provider,
    /// Which of an avatar's UNets runs.
    pub precision: PrecisionSetting,
    /// Most frames per UNet run.
    pub max_batch: BatchSetting,
    /// ONNX Runtime intra-op threads of each UNet.
    pub threads: usize,
    /// Whether ONNX Runtime's threads spin.
    pub spin: bool,
    /// The server of [`Provider::Remote`].
    pub remote: Option<RemoteSettings>,
}

impl InferenceOptions {
    /// These options over `base` (each one given here wins).
    pub fn over(self, base: InferenceOptions) -> InferenceOptions {
        InferenceOptions {
            provider: self.provider.or(base.provider),
            precision: self.precision.or(base.precision),
            max_batch: self.max_batch.or(base.max_batch),
            threads: self.threads.or(base.threads),
            spin: self.spin || base.spin,
        }
    }

    /// The defaults filled in, every value checked, with the server of `remote` for the remote
    /// provider. (A group of its own: serde's `flatten` does not nest under
    /// `deny_unknown_fields`.)
    pub fn resolve(&self, remote: &RemoteOptions) -> Result<Inference, SettingsError> {
        let provider = self.provider.unwrap_or_default();
        let threads = Limit { default: cpus(), ..THREADS }.check(self.threads)?;
        Ok(Inference {
            provider,
            precision: self.precision.unwrap_or_default(),
            max_batch: self.max_batch.unwrap_or_default(),
            threads,
            spin: self.spin,
            remote: remote.resolve(provider)?,
        })
    }
}

impl RemoteOptions {
    /// These options over `base`.
    pub fn over(self, base: RemoteOptions) -> RemoteOptions {
        RemoteOptions {
            remote_url: self.remote_url.or(base.remote_url),
            remote_model: self.remote_model.or(base.remote_model),
            remote_timeout_ms: self.remote_timeout_ms.or(base.remote_timeout_ms),
            remote_retries: self.remote_retries.or(base.remote_retries),
        }
    }

    /// The server of `provider`: `Some` for [`Provider::Remote`] (URL and model required),
    /// `None` otherwise.
    pub fn resolve(&self, provider: Provider) -> Result<Option<RemoteSettings>, SettingsError> {
        if provider != Provider::Remote {
            return Ok(None);
        }
        let (Some(url), Some(model)) = (&self.remote_url, &self.remote_model) else {
            return Err(SettingsError::NoRemote);
        };
        let timeout = Duration::from_millis(REMOTE_TIMEOUT_MS.check(self.remote_timeout_ms)?);
        let retries = REMOTE_RETRIES.check(self.remote_retries)?;
        let settings =
            RemoteSettings::new(url, model, timeout, retries).map_err(|e: RemoteUrlError| SettingsError::Remote(e))?;
        Ok(Some(settings))
    }
}

impl TemplateOptions {
    /// These options over `base`.
    pub fn over(self, base: TemplateOptions) -> TemplateOptions {
        TemplateOptions {
            template_cache_mb: self.template_cache_mb.or(base.template_cache_mb),
            jpeg_template_mb: self.jpeg_template_mb.or(base.jpeg_template_mb),
        }
    }

    /// The template cache in bytes: given, or `None` (each front end has its default).
    pub fn template_cache(&self) -> Result<Option<usize>, SettingsError> {
        self.template_cache_mb.map(|mb| TEMPLATE_CACHE_MB.check(Some(mb)).map(|mb| mb << 20)).transpose()
    }

    /// The bound on JPEG frames in bytes: given, or `None`.
    pub fn jpeg_template(&self) -> Result<Option<usize>, SettingsError> {
        self.jpeg_template_mb.map(|mb| JPEG_TEMPLATE_MB.check(Some(mb)).map(|mb| mb << 20)).transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_remote_server_is_checked_only_for_the_remote_provider() {
        let none = RemoteOptions::default();
        assert!(none.resolve(Provider::Cpu).unwrap().is_none());
        assert!(matches!(none.resolve(Provider::Remote), Err(SettingsError::NoRemote)));
        let ok = RemoteOptions {
            remote_url: Some("grpc://127.0.0.1:8001".into()),
            remote_model: Some("unet".into()),
            ..Default::default()
        };
        let s = ok.resolve(Provider::Remote).unwrap().unwrap();
        assert_eq!((s.timeout, s.retries), (RemoteSettings::DEFAULT_TIMEOUT, RemoteSettings::DEFAULT_RETRIES));
        let slow = RemoteOptions { remote_timeout_ms: Some(600_001), ..ok.clone() };
        assert!(slow.resolve(Provider::Remote).unwrap_err().to_string().contains("1..=600000"));
        let many = RemoteOptions { remote_retries: Some(11), ..ok.clone() };
        assert!(many.resolve(Provider::Remote).unwrap_err().to_string().contains("0..=10"));
        let http = RemoteOptions { remote_url: Some("https://x:1".into()), ..ok };
        assert!(http.resolve(Provider::Remote).unwrap_err().to_string().contains("grpc://"));
    }

    #[test]
    fn threads_default_to_every_cpu_and_are_checked() {
        let o = InferenceOptions::default();
        let i = o.resolve(&RemoteOptions::default()).unwrap();
        assert_eq!((i.threads, i.provider, i.max_batch, i.spin), (cpus(), Provider::Cpu, BatchSetting::Auto, false));
        let zero = InferenceOptions { threads: Some(0), ..Default::default() };
        assert!(zero.resolve(&RemoteOptions::default()).unwrap_err().to_string().contains("1..=1024"));
    }

    #[test]
    fn template_sizes_are_checked_when_given() {
        let t = TemplateOptions { template_cache_mb: Some(8), jpeg_template_mb: Some(0) };
        assert_eq!((t.template_cache().unwrap(), t.jpeg_template().unwrap()), (Some(8 << 20), Some(0)));
        assert_eq!(TemplateOptions::default().template_cache().unwrap(), None);
        let big = TemplateOptions { template_cache_mb: Some(0), ..Default::default() };
        assert!(big.template_cache().is_err());
    }
}
