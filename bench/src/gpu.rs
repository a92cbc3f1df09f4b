//! GPU sampling cost: raw NVML calls (utilisation, memory, temperature, power) against the
//! agent's collector doing the same through its own code path, plus the full sample the agent
//! sends, and one `nvidia-smi` query for reference. Needs an NVIDIA GPU and driver.

use std::time::Instant;

use anyhow::{bail, Context};
use nebula_agent::telemetry::gpu::GpuCollector;
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use nvml_wrapper::Nvml;
use serde_json::json;

use crate::percentile;

fn median_us(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    (percentile(&v, 0.5), percentile(&v, 0.99))
}

pub fn gpu_bench(iterations: usize, out: &std::path::Path) -> anyhow::Result<()> {
    let nvml = Nvml::init().context("NVML is not available (no NVIDIA driver on this host)")?;
    let count = nvml.device_count()?;
    if count == 0 {
        bail!("NVML found no GPU");
    }
    let device = nvml.device_by_index(0)?;
    let name = device.name()?;
    let driver = nvml.sys_driver_version()?;
    println!("{count} GPU(s); GPU 0: {name}; driver {driver}");

    // Raw NVML: the four calls a fleet view needs, on an already-open device handle.
    let mut raw = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let t = Instant::now();
        let u = device.utilization_rates()?;
        let m = device.memory_info()?;
        let c = device.temperature(TemperatureSensor::Gpu)?;
        let p = device.power_usage()?;
        raw.push(t.elapsed().as_secs_f64() * 1e6);
        std::hint::black_box((u, m, c, p));
    }
    let _ = device;
    drop(nvml);

    // The agent's collector: same figures for every GPU, as it samples them.
    let collector = GpuCollector::new();
    let per_gpu = collector.count().max(1) as f64;
    let mut core = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let t = Instant::now();
        let s = collector.sample_core();
        core.push(t.elapsed().as_secs_f64() * 1e6 / per_gpu);
        std::hint::black_box(s);
    }
    let mut full = Vec::with_capacity(iterations / 10);
    for _ in 0..(iterations / 10).max(10) {
        let t = Instant::now();
        let s = collector.sample();
        full.push(t.elapsed().as_secs_f64() * 1e6 / per_gpu);
        std::hint::black_box(s);
    }
    let sample = collector.sample();
    let inventory = collector.inventory();
    println!("inventory: {}", serde_json::to_string(&inventory)?);
    println!("one full sample: {}", serde_json::to_string(&sample)?);

    let smi = std::process::Command::new("nvidia-smi")
        .args([
            "--query-gpu=utilization.gpu,memory.used,temperature.gpu,power.draw",
            "--format=csv,noheader",
        ])
        .output();
    let mut smi_ms = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        if std::process::Command::new("nvidia-smi")
            .args([
                "--query-gpu=utilization.gpu,memory.used,temperature.gpu,power.draw",
                "--format=csv,noheader",
            ])
            .output()
            .is_ok_and(|o| o.status.success())
        {
            smi_ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    let (raw_p50, raw_p99) = median_us(raw);
    let (core_p50, core_p99) = median_us(core);
    let (full_p50, full_p99) = median_us(full);
    let (smi_p50, _) = median_us(smi_ms.clone());
    println!(
        "raw NVML (util+mem+temp+power): median {raw_p50:.1} us (p99 {raw_p99:.1}); agent collector, same figures: \
         median {core_p50:.1} us per GPU (p99 {core_p99:.1}) = {:.2}x raw; full sample (fan, clocks, processes): \
         median {full_p50:.1} us per GPU; nvidia-smi query: median {smi_p50:.1} ms",
        core_p50 / raw_p50
    );
    let result = json!({
        "bench": "gpu",
        "command": format!("nebula-bench gpu --iterations {iterations}"),
        "gpu": name,
        "gpus": count,
        "driver": driver,
        "iterations": iterations,
        "raw_nvml_us": {"median": raw_p50, "p99": raw_p99},
        "agent_core_sample_us_per_gpu": {"median": core_p50, "p99": core_p99},
        "agent_core_over_raw": core_p50 / raw_p50,
        "agent_full_sample_us_per_gpu": {"median": full_p50, "p99": full_p99},
        "nvidia_smi_query_ms": {"median": smi_p50, "runs": smi_ms.len(), "first_output": smi.ok().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())},
        "sample": sample,
        "inventory": inventory,
    });
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(out, serde_json::to_string_pretty(&result)? + "\n")?;
    println!("wrote {}", out.display());
    Ok(())
}
