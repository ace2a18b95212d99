//! How much memory this machine (and this process's cgroup) has, so a pool that can never be
//! resident is reported at start instead of ending in swap storms or an OOM kill once it fills.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The memory figures a pool is compared with; `None` where the machine does not say.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostMemory {
    /// `MemTotal` of `/proc/meminfo`, in bytes.
    pub mem_total: Option<u64>,
    /// The smallest memory limit of this process's cgroup and its ancestors (cgroup v2
    /// `memory.max`, v1 `memory.limit_in_bytes`), in bytes; `None` when unlimited.
    pub cgroup_limit: Option<u64>,
}

impl HostMemory {
    /// Reads the figures of the running system.
    pub fn read() -> HostMemory {
        let mem_total = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|t| parse_mem_total(&t));
        let cgroup_limit = std::fs::read_to_string("/proc/self/cgroup")
            .ok()
            .and_then(|t| cgroup_limit(Path::new("/sys/fs/cgroup"), &t));
        HostMemory {
            mem_total,
            cgroup_limit: cgroup_limit.filter(|&l| mem_total.is_none_or(|m| l < m)),
        }
    }

    /// A description of why `bytes` of pool cannot all be resident, or `None` when it fits.
    pub fn too_small_for(&self, bytes: u64) -> Option<String> {
        let mut over = Vec::new();
        if let Some(m) = self.mem_total.filter(|&m| bytes > m) {
            over.push(format!("the machine's memory (MemTotal {})", human(m)));
        }
        if let Some(l) = self.cgroup_limit.filter(|&l| bytes > l) {
            over.push(format!("this process's cgroup memory limit ({})", human(l)));
        }
        (!over.is_empty()).then(|| {
            format!(
                "the memory pool ({}) is larger than {}: it can never be resident, and the \
                 process will swap or be OOM-killed as it fills; lower max_local_cpu_size",
                human(bytes),
                over.join(" and ")
            )
        })
    }
}

/// Checks a pool of `bytes` against this machine: larger than its memory or the cgroup
/// limit, it starts with a warning (memory is committed as the pool fills, so one that never
/// fills can run), unless `prefault` would touch all of it at start: that is refused, since
/// the process would be OOM-killed before serving anything.
pub(crate) fn check_pool_size(bytes: u64, prefault: bool) -> Result<()> {
    let host = HostMemory::read();
    if let Some(why) = host.verdict(bytes, prefault)? {
        tracing::warn!(
            pool_bytes = bytes,
            mem_total = host.mem_total,
            cgroup_limit = host.cgroup_limit,
            "{why}"
        );
    }
    Ok(())
}

impl HostMemory {
    /// `Ok(None)`: the pool fits; `Ok(Some(warning))`: it does not but may start; `Err`: it
    /// cannot start (prefaulted).
    fn verdict(&self, bytes: u64, prefault: bool) -> Result<Option<String>> {
        match self.too_small_for(bytes) {
            Some(why) if prefault => Err(Error::invalid(format!(
                "{why}; with local_cpu_prefault on, every page is touched at start and the \
                 process would be killed before serving: lower max_local_cpu_size or turn \
                 local_cpu_prefault off"
            ))),
            other => Ok(other),
        }
    }
}

/// Bytes as a short human figure (`1.5 GiB`), exact bytes in parentheses.
pub(crate) fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {} ({bytes} bytes)", UNITS[u])
    }
}

/// `MemTotal` in bytes from the text of `/proc/meminfo`.
fn parse_mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut it = line["MemTotal:".len()..].split_whitespace();
    let n: u64 = it.next()?.parse().ok()?;
    match it.next() {
        Some("kB") => n.checked_mul(1024),
        None => Some(n),
        Some(_) => None,
    }
}

/// One limit file's value: `max` (v2) or a figure near `i64::MAX` (v1's "unlimited") is none.
fn parse_limit(text: &str) -> Option<u64> {
    let v: u64 = text.trim().parse().ok()?;
    (v < 1 << 62).then_some(v)
}

/// The smallest limit on the memory controller's path of `/proc/self/cgroup` (text in
/// `cgroups`), under the cgroup mount `root`: v2 (`0::/path`, `root/path/memory.max`) and v1
/// (`N:...memory...:/path`, `root/memory/path/memory.limit_in_bytes`). Every ancestor up to
/// the mount's root counts (a parent's limit caps its children); paths that are not there
/// (a container that mounts only its own cgroup) are skipped.
fn cgroup_limit(root: &Path, cgroups: &str) -> Option<u64> {
    let mut files: Vec<PathBuf> = Vec::new();
    for line in cgroups.lines() {
        let mut f = line.splitn(3, ':');
        let (Some(id), Some(ctrls), Some(path)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let (base, file) = if id == "0" && ctrls.is_empty() {
            (root.to_path_buf(), "memory.max")
        } else if ctrls.split(',').any(|c| c == "memory") {
            (root.join("memory"), "memory.limit_in_bytes")
        } else {
            continue;
        };
        let mut dir = base.join(path.trim_start_matches('/'));
        loop {
            files.push(dir.join(file));
            if dir == base || !dir.pop() {
                break;
            }
        }
    }
    files
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .filter_map(|t| parse_limit(&t))
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_total_is_read_in_bytes() {
        let t = "MemFree:  100 kB\nMemTotal:       24683584 kB\nSwapTotal: 0 kB\n";
        assert_eq!(parse_mem_total(t), Some(24_683_584 * 1024));
        assert_eq!(parse_mem_total("MemFree: 1 kB\n"), None);
        assert!(HostMemory::read().mem_total.is_some_and(|m| m > 0));
    }

    #[test]
    fn cgroup_limits_take_the_smallest_ancestor_and_ignore_unlimited() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::create_dir_all(r.join("a/b")).unwrap();
        std::fs::write(r.join("memory.max"), "max\n").unwrap();
        std::fs::write(r.join("a/memory.max"), "1073741824\n").unwrap();
        std::fs::write(r.join("a/b/memory.max"), "max\n").unwrap();
        assert_eq!(cgroup_limit(r, "0::/a/b\n"), Some(1 << 30));
        // v1: the memory controller's own hierarchy; "unlimited" is a huge figure.
        std::fs::create_dir_all(r.join("memory/c")).unwrap();
        std::fs::write(
            r.join("memory/memory.limit_in_bytes"),
            "9223372036854771712\n",
        )
        .unwrap();
        std::fs::write(r.join("memory/c/memory.limit_in_bytes"), "536870912\n").unwrap();
        assert_eq!(
            cgroup_limit(r, "5:cpu,cpuacct:/c\n4:memory:/c\n"),
            Some(512 << 20)
        );
        // A path the container does not mount: only the mount's root is read.
        assert_eq!(cgroup_limit(r, "4:memory:/elsewhere/x\n"), None);
        assert_eq!(cgroup_limit(r, "1:name=systemd:/\n"), None);
    }

    #[test]
    fn the_warning_names_the_figures() {
        let h = HostMemory {
            mem_total: Some(8 << 30),
            cgroup_limit: Some(4 << 30),
        };
        assert_eq!(h.too_small_for(4 << 30), None);
        let w = h.too_small_for(6 << 30).unwrap();
        assert!(
            w.contains("6.0 GiB") && w.contains("cgroup") && w.contains("4.0 GiB"),
            "{w}"
        );
        assert!(!w.contains("MemTotal"), "{w}");
        let w = h.too_small_for(9 << 30).unwrap();
        assert!(
            w.contains("MemTotal 8.0 GiB") && w.contains("cgroup"),
            "{w}"
        );
        assert_eq!(HostMemory::default().too_small_for(u64::MAX), None);
    }

    #[test]
    fn an_oversized_pool_warns_and_a_prefaulted_one_is_refused() {
        let h = HostMemory {
            mem_total: Some(8 << 30),
            cgroup_limit: None,
        };
        assert_eq!(h.verdict(4 << 30, true).unwrap(), None);
        assert!(h.verdict(9 << 30, false).unwrap().is_some());
        let e = h.verdict(9 << 30, true).unwrap_err().to_string();
        assert!(
            e.contains("MemTotal 8.0 GiB") && e.contains("local_cpu_prefault"),
            "{e}"
        );
    }
}
