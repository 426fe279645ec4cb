//! Choosing a candle [`Device`] that never surprises, for command lines and configs: `auto`
//! picks CUDA, then Metal, then the CPU; asking for a backend this build or machine lacks is an
//! error that says what is missing (candle's own `Device::new_cuda` says only that a call
//! failed). Public because every CLI built on the crate needs the same choice.
//!
//! ```rust
//! use candle_glu::device::DeviceChoice;
//! let dev = "cpu".parse::<DeviceChoice>()?.device()?;
//! assert!(dev.is_cpu());
//! # Ok::<(), candle_glu::Error>(())
//! ```

#![forbid(unsafe_code)]

use std::fmt;
use std::str::FromStr;

use candle_core::Device;

use crate::error::ParseError;
use crate::{Error, Result};

/// Which device to run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum DeviceChoice {
    /// The CPU.
    #[default]
    Cpu,
    /// The first CUDA GPU; needs the `cuda` feature and the NVIDIA driver.
    Cuda,
    /// The default Metal GPU; needs the `metal` feature and macOS.
    Metal,
    /// CUDA if this build has it and a GPU answers, else Metal likewise, else the CPU.
    Auto,
}

impl DeviceChoice {
    /// The names [`FromStr`] accepts.
    pub const NAMES: &'static [&'static str] = &["cpu", "cuda", "metal", "auto"];

    /// Opens the device.
    ///
    /// # Errors
    /// [`Error::Device`] when the build lacks the backend's feature or no such device answers.
    pub fn device(self) -> Result<Device> {
        match self {
            DeviceChoice::Cpu => Ok(Device::Cpu),
            DeviceChoice::Cuda => cuda(),
            DeviceChoice::Metal => metal(),
            DeviceChoice::Auto => Ok(cuda().or_else(|_| metal()).unwrap_or(Device::Cpu)),
        }
    }
}

fn cuda() -> Result<Device> {
    if !cfg!(feature = "cuda") {
        return Err(Error::Device {
            message: "cuda was asked for but this build has no CUDA support: rebuild with \
                      `--features cuda`"
                .into(),
        });
    }
    Device::new_cuda(0).map_err(|e| Error::Device {
        message: cuda_message(&e.to_string()),
    })
}

/// One line for a failed `Device::new_cuda`: what the driver's error code means, and the code.
fn cuda_message(error: &str) -> String {
    let code = error.find("CUDA_ERROR_").map(|i| {
        let rest = &error[i..];
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        &rest[..end]
    });
    let meaning = match code {
        Some("CUDA_ERROR_STUB_LIBRARY") => {
            "the libcuda.so.1 loaded is a link-time stub, not the NVIDIA driver's"
        }
        Some("CUDA_ERROR_NO_DEVICE") => "the NVIDIA driver sees no GPU",
        Some("CUDA_ERROR_INSUFFICIENT_DRIVER") => {
            "the NVIDIA driver is older than the CUDA this build needs"
        }
        Some("CUDA_ERROR_INVALID_DEVICE") => "there is no GPU 0",
        _ => "is the NVIDIA driver installed?",
    };
    let detail = code.unwrap_or_else(|| first_line(error));
    format!("cuda was asked for but no CUDA GPU answered: {meaning} ({detail})")
}

fn metal() -> Result<Device> {
    if !cfg!(feature = "metal") {
        return Err(Error::Device {
            message: "metal was asked for but this build has no Metal support: rebuild with \
                      `--features metal` on macOS"
                .into(),
        });
    }
    Device::new_metal(0).map_err(|e| Error::Device {
        message: format!(
            "metal was asked for but no Metal GPU answered: {}",
            first_line(&e.to_string())
        ),
    })
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeviceChoice::Cpu => "cpu",
            DeviceChoice::Cuda => "cuda",
            DeviceChoice::Metal => "metal",
            DeviceChoice::Auto => "auto",
        })
    }
}

impl FromStr for DeviceChoice {
    type Err = ParseError;

    /// Parses a device name (see [`NAMES`](Self::NAMES); `gpu` is an alias of `cuda`);
    /// surrounding whitespace and ASCII case are ignored.
    fn from_str(s: &str) -> std::result::Result<Self, ParseError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" | "gpu" => Ok(DeviceChoice::Cuda),
            "metal" => Ok(DeviceChoice::Metal),
            "auto" => Ok(DeviceChoice::Auto),
            _ => Err(ParseError::new("device", s, Self::NAMES)),
        }
    }
}

/// A short name for a device, for logs and reports: `cpu`, `cuda:0`, `metal:0`.
///
/// ```rust
/// use candle_glu::device::device_name;
/// assert_eq!(device_name(&candle_core::Device::Cpu), "cpu");
/// ```
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_auto_falls_back() {
        for name in DeviceChoice::NAMES {
            assert_eq!(name.parse::<DeviceChoice>().unwrap().to_string(), *name);
        }
        assert!("tpu".parse::<DeviceChoice>().is_err());
        // Without GPU features (or a GPU), auto is the CPU.
        if !cfg!(any(feature = "cuda", feature = "metal")) {
            assert!(DeviceChoice::Auto.device().unwrap().is_cpu());
            let err = DeviceChoice::Cuda.device().unwrap_err().to_string();
            assert!(err.contains("--features cuda"), "{err}");
            let err = DeviceChoice::Metal.device().unwrap_err().to_string();
            assert!(err.contains("--features metal"), "{err}");
        }
    }

    #[test]
    fn cuda_errors_say_what_the_driver_meant() {
        let stub =
            "DriverError(CUDA_ERROR_STUB_LIBRARY, \"<Failure when calling cuGetErrorString()>\")";
        assert_eq!(
            cuda_message(stub),
            "cuda was asked for but no CUDA GPU answered: the libcuda.so.1 loaded is a link-time \
             stub, not the NVIDIA driver's (CUDA_ERROR_STUB_LIBRARY)"
        );
        let none = cuda_message("DriverError(CUDA_ERROR_NO_DEVICE, \"no CUDA-capable device\")");
        assert!(
            none.ends_with("the NVIDIA driver sees no GPU (CUDA_ERROR_NO_DEVICE)"),
            "{none}"
        );
        let other = cuda_message("something else\nbacktrace");
        assert!(
            other.ends_with("is the NVIDIA driver installed? (something else)"),
            "{other}"
        );
    }
}
