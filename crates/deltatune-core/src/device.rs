//! The device a run's model and deltas live on (`--device`, `DELTATUNE_DEVICE`).
//!
//! Loading weights ([`crate::Weights`], GGUF files), random initialisation ([`crate::Rng`]'s
//! tensors) and the deltas a method attaches all make their tensors on [`current`], so a
//! command picks the device once, before it loads anything, and every family and method
//! follows. The CPU is the default. Tensors on another device take the ops layer's composed
//! path ([`crate::ops::portable`]): candle's own kernels for that device, with backward passes
//! candle derives, tested on the CPU against our kernels op by op and over whole training
//! steps.

use std::sync::RwLock;

use candle_core::Device;

use crate::error::{Error, Result};

static CURRENT: RwLock<Option<Device>> = RwLock::new(None);

/// The device new model and delta tensors are made on (the CPU unless [`set`] chose another).
pub fn current() -> Device {
    CURRENT
        .read()
        .ok()
        .and_then(|d| d.clone())
        .unwrap_or(Device::Cpu)
}

/// Chooses the device for what is loaded and created from now on.
pub fn set(device: Device) {
    if let Ok(mut d) = CURRENT.write() {
        *d = Some(device);
    }
}

/// Whether this build can use CUDA GPUs (the `cuda` cargo feature).
pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

/// Parses a device name: `cpu`, `cuda` (the first GPU) or `cuda:N`.
pub fn parse(spec: &str) -> Result<Device> {
    let spec = spec.trim();
    let lower = spec.to_ascii_lowercase();
    let ordinal = match lower.as_str() {
        "cpu" => return Ok(Device::Cpu),
        "cuda" | "gpu" => 0,
        s => match s
            .strip_prefix("cuda:")
            .or_else(|| s.strip_prefix("gpu:"))
            .map(str::parse::<usize>)
        {
            Some(Ok(n)) => n,
            _ => {
                return Err(Error::Msg(format!(
                    "unknown device `{spec}`: use `cpu`, `cuda` (the first GPU) or `cuda:N`"
                )))
            }
        },
    };
    if !CUDA_BUILT {
        return Err(Error::Msg(format!(
            "device `{spec}`: this deltatune was built without CUDA; rebuild it with \
             `cargo build --release --features cuda` on a machine with the CUDA toolkit \
             (docs/gpu.md), or use `--device cpu`"
        )));
    }
    Device::new_cuda(ordinal).map_err(|e| {
        Error::Msg(format!(
            "device `{spec}`: no CUDA GPU {ordinal} ({e}); check `nvidia-smi`, or use \
             `--device cpu`"
        ))
    })
}

/// A short name for messages: `cpu`, `cuda:0`.
pub fn name(device: &Device) -> String {
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
    fn parses_names_and_explains_what_is_missing() {
        assert!(parse("cpu").unwrap().is_cpu());
        assert!(parse(" CPU ").unwrap().is_cpu());
        let bad = parse("tpu").unwrap_err().to_string();
        assert!(
            bad.contains("unknown device `tpu`") && bad.contains("cuda:N"),
            "{bad}"
        );
        let bad = parse("cuda:x").unwrap_err().to_string();
        assert!(bad.contains("unknown device `cuda:x`"), "{bad}");
        if !CUDA_BUILT {
            let e = parse("cuda:1").unwrap_err().to_string();
            assert!(
                e.contains("built without CUDA") && e.contains("--features cuda"),
                "{e}"
            );
        }
        assert_eq!(name(&Device::Cpu), "cpu");
    }
}
