//! A numeric setting's range and default, declared once as a constant that its `--help` text
//! and its check both read.

use super::SettingsError;

/// A numeric setting: its name in errors, the values it may take and the one it takes when not
/// given.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limit<T> {
    /// The setting, as errors name it.
    pub name: &'static str,
    /// Its smallest value.
    pub min: T,
    /// Its largest value.
    pub max: T,
    /// Its value when not given.
    pub default: T,
}

impl<T: Copy + PartialOrd + std::fmt::Display> Limit<T> {
    /// A setting named `name` in `min..=max`, `default` when not given.
    pub const fn new(name: &'static str, min: T, max: T, default: T) -> Self {
        Self { name, min, max, default }
    }

    /// The range as errors and help texts write it (`1..=4096`).
    pub fn allowed(&self) -> String {
        format!("{}..={}", self.min, self.max)
    }

    /// `what`, then the range and the default: a flag's `--help` line.
    pub fn help(&self, what: &str) -> String {
        format!("{what} ({}) [default: {}]", self.allowed(), self.default)
    }

    /// `what`, then the range, and `default` as the default's description (a default that
    /// depends on the machine or on other settings).
    pub fn help_with(&self, what: &str, default: &str) -> String {
        format!("{what} ({}) [default: {default}]", self.allowed())
    }

    /// `value`, or the default when not given; an error naming the range when out of it.
    pub fn check(&self, value: Option<T>) -> Result<T, SettingsError> {
        let v = value.unwrap_or(self.default);
        // Written so that a NaN is out of every range.
        if self.min <= v && v <= self.max {
            Ok(v)
        } else {
            Err(SettingsError::Range { name: self.name, value: v.to_string(), allowed: self.allowed() })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECS: Limit<f64> = Limit::new("a timeout (s)", 0.1, 60.0, 10.0);

    #[test]
    fn a_limit_checks_what_its_help_says() {
        assert_eq!(SECS.help("Seconds to wait"), "Seconds to wait (0.1..=60) [default: 10]");
        assert_eq!(SECS.check(None).unwrap(), 10.0);
        assert_eq!(SECS.check(Some(0.1)).unwrap(), 0.1);
        assert_eq!(SECS.check(Some(60.0)).unwrap(), 60.0);
        for bad in [0.0, 60.5, f64::NAN, f64::INFINITY] {
            let e = SECS.check(Some(bad)).unwrap_err().to_string();
            assert!(e.contains("a timeout (s)") && e.contains("0.1..=60"), "{e}");
        }
    }
}
