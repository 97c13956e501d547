//! Device telemetry (CPU, memory, temperature, load via `sysinfo`) and the device limits under
//! which the agent reports "busy" and sits rounds out.

use sysinfo::{Components, System};

use crate::config::LimitsSection;

/// One reading of the device.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct DeviceSample {
    /// Whole-machine CPU use in percent (0 on the first reading).
    pub cpu_percent: f32,
    pub mem_total_bytes: u64,
    pub mem_used_bytes: u64,
    pub mem_available_bytes: u64,
    /// Hottest sensor, when the board exposes any.
    pub temperature_c: Option<f32>,
    /// 1-minute load average, where the OS has one.
    pub load_avg_1m: Option<f32>,
    pub cpus: usize,
}

/// Keeps the `sysinfo` handles between readings (CPU use needs two of them).
pub struct DeviceMonitor {
    system: System,
    components: Components,
}

impl std::fmt::Debug for DeviceMonitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceMonitor").finish_non_exhaustive()
    }
}

impl Default for DeviceMonitor {
    fn default() -> Self {
        Self::new()
    }
}

impl DeviceMonitor {
    pub fn new() -> DeviceMonitor {
        DeviceMonitor {
            system: System::new(),
            components: Components::new_with_refreshed_list(),
        }
    }

    pub fn sample(&mut self) -> DeviceSample {
        self.system.refresh_memory();
        self.system.refresh_cpu_usage();
        self.components.refresh(false);
        let temperature_c = self
            .components
            .list()
            .iter()
            .filter_map(|c| c.temperature())
            .filter(|t| t.is_finite())
            .fold(None, |m: Option<f32>, t| Some(m.map_or(t, |m| m.max(t))));
        let load = System::load_average().one;
        DeviceSample {
            cpu_percent: self.system.global_cpu_usage(),
            mem_total_bytes: self.system.total_memory(),
            mem_used_bytes: self.system.used_memory(),
            mem_available_bytes: self.system.available_memory(),
            temperature_c,
            load_avg_1m: (load.is_finite() && load > 0.0).then_some(load as f32),
            cpus: self.system.cpus().len().max(1),
        }
    }
}

/// Why the device is outside its limits, or `None` when it may work.
pub fn busy_reason(s: &DeviceSample, limits: &LimitsSection) -> Option<String> {
    let mut reasons = Vec::new();
    let min_free = limits.min_free_memory_mb.saturating_mul(1024 * 1024);
    if limits.min_free_memory_mb > 0 && s.mem_available_bytes < min_free {
        reasons.push(format!(
            "available memory {} MiB < limits.min_free_memory_mb {}",
            s.mem_available_bytes / (1024 * 1024),
            limits.min_free_memory_mb
        ));
    }
    if let Some(t) = s.temperature_c {
        if limits.max_temperature_c > 0.0 && t > limits.max_temperature_c {
            reasons.push(format!(
                "temperature {t:.1} °C > limits.max_temperature_c {}",
                limits.max_temperature_c
            ));
        }
    }
    if let Some(l) = s.load_avg_1m {
        let per_core = f64::from(l) / s.cpus.max(1) as f64;
        if limits.max_load_per_core > 0.0 && per_core > limits.max_load_per_core {
            reasons.push(format!(
                "load {per_core:.2}/core > limits.max_load_per_core {}",
                limits.max_load_per_core
            ));
        }
    }
    (!reasons.is_empty()).then(|| reasons.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> DeviceSample {
        DeviceSample {
            cpu_percent: 10.0,
            mem_total_bytes: 4 << 30,
            mem_used_bytes: 1 << 30,
            mem_available_bytes: 3 << 30,
            temperature_c: Some(60.0),
            load_avg_1m: Some(2.0),
            cpus: 4,
        }
    }

    fn check(limits: LimitsSection, s: DeviceSample, expect: &[&str]) {
        let got = busy_reason(&s, &limits);
        match got {
            None => assert!(expect.is_empty(), "expected {expect:?}, got none"),
            Some(r) => {
                assert!(!expect.is_empty(), "unexpected busy: {r}");
                for e in expect {
                    assert!(r.contains(e), "{r:?} lacks {e:?}");
                }
            }
        }
    }

    #[test]
    fn limits_table() {
        let off = LimitsSection {
            min_free_memory_mb: 0,
            max_temperature_c: 0.0,
            max_load_per_core: 0.0,
        };
        check(off.clone(), sample(), &[]);
        check(
            LimitsSection {
                min_free_memory_mb: 4096,
                ..off.clone()
            },
            sample(),
            &["min_free_memory_mb"],
        );
        check(
            LimitsSection {
                max_temperature_c: 55.0,
                ..off.clone()
            },
            sample(),
            &["max_temperature_c"],
        );
        check(
            LimitsSection {
                max_temperature_c: 55.0,
                ..off.clone()
            },
            DeviceSample {
                temperature_c: None,
                ..sample()
            },
            &[],
        );
        check(
            LimitsSection {
                max_load_per_core: 0.4,
                ..off.clone()
            },
            sample(),
            &["max_load_per_core"],
        );
        check(
            LimitsSection {
                max_load_per_core: 0.6,
                ..off.clone()
            },
            sample(),
            &[],
        );
        check(
            LimitsSection {
                min_free_memory_mb: 4096,
                max_temperature_c: 50.0,
                max_load_per_core: 0.1,
            },
            sample(),
            &[
                "min_free_memory_mb",
                "max_temperature_c",
                "max_load_per_core",
            ],
        );
    }

    #[test]
    fn real_sample_is_plausible() {
        let s = DeviceMonitor::new().sample();
        assert!(
            s.mem_total_bytes > 0 && s.mem_available_bytes <= s.mem_total_bytes,
            "{s:?}"
        );
        assert!(s.cpus >= 1);
    }
}
