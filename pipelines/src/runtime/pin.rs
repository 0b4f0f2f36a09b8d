//! Thread pinning policy.

use super::Placement;

/// Where stage threads run.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum PinPolicy {
    /// Let the OS schedule every thread.
    #[default]
    None,
    /// Spread stages over the cores left after the inference thread and ONNX Runtime's
    /// intra-op threads (the first `reserved` cores); no pinning when fewer than
    /// `reserved + 2` cores exist (pinned stages would then fight ORT for the same cores).
    Auto {
        /// Cores left to the inference stage and its intra-op pool.
        reserved: usize,
    },
    /// Pin the stages, in the order they are spawned, to these core ids (cycling).
    List(Vec<usize>),
}

/// A `--pin` value that is none of `auto`, `none` or a list of core ids.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad core id `{0}` in --pin (expected auto, none or a list like 0,1,2)")]
pub struct PinParseError(pub String);

/// A `--pin` setting as given: `auto` needs the inference threads to become a [`PinPolicy`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum PinSetting {
    /// `none`.
    None,
    /// `auto`.
    Auto,
    /// A list of core ids.
    List(Vec<usize>),
}

impl std::str::FromStr for PinSetting {
    type Err = PinParseError;
    fn from_str(s: &str) -> Result<Self, PinParseError> {
        match s {
            "none" => Ok(PinSetting::None),
            "auto" => Ok(PinSetting::Auto),
            list => list
                .split(',')
                .map(|c| c.trim().parse::<usize>().map_err(|_| PinParseError(c.to_string())))
                .collect::<Result<Vec<_>, _>>()
                .map(PinSetting::List),
        }
    }
}

impl TryFrom<String> for PinSetting {
    type Error = PinParseError;
    fn try_from(s: String) -> Result<Self, PinParseError> {
        s.parse()
    }
}

impl PinSetting {
    /// The policy, `auto` reserving `intra_threads` cores for inference.
    pub fn policy(&self, intra_threads: usize) -> PinPolicy {
        match self {
            PinSetting::None => PinPolicy::None,
            PinSetting::Auto => PinPolicy::Auto { reserved: intra_threads.max(1) },
            PinSetting::List(ids) => PinPolicy::List(ids.clone()),
        }
    }
}

impl PinPolicy {
    /// Parses `auto`, `none` or a comma-separated list of core ids; `auto` reserves
    /// `intra_threads` cores for inference.
    pub fn parse(s: &str, intra_threads: usize) -> Result<Self, PinParseError> {
        s.parse::<PinSetting>().map(|p| p.policy(intra_threads))
    }

    /// The core for the `k`-th stage, if pinned.
    pub(super) fn core_for(
        &self,
        k: usize,
        placement: Placement,
        cores: &[core_affinity::CoreId],
    ) -> Option<core_affinity::CoreId> {
        match self {
            PinPolicy::None => None,
            PinPolicy::List(ids) if !ids.is_empty() => {
                let id = ids[k % ids.len()];
                cores.iter().find(|c| c.id == id).copied()
            }
            PinPolicy::List(_) => None,
            PinPolicy::Auto { reserved } => {
                if placement == Placement::Inference || cores.len() < reserved + 2 {
                    return None;
                }
                let free = &cores[*reserved..];
                Some(free[k % free.len()])
            }
        }
    }
}
