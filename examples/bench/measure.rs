//! What the orchestrator reads of a server process: CPU time and context switches from
//! `/proc`, and system calls from `perf stat` when it is installed and allowed.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
};

/// CPU seconds (user + system) a process used so far.
pub fn cpu_secs(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return f64::NAN;
    };
    // Fields after the command name (which may contain spaces) start at ") ".
    let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r) else {
        return f64::NAN;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok());
    match (ticks(11), ticks(12)) {
        (Some(u), Some(s)) => (u + s) / clock_ticks(),
        _ => f64::NAN,
    }
}

fn clock_ticks() -> f64 {
    // Linux reports /proc times in USER_HZ, 100 on every architecture this runs on.
    100.0
}

/// Voluntary plus involuntary context switches of every thread of a process.
pub fn context_switches(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    let mut total = 0;
    for task in tasks.flatten() {
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        for line in status.lines() {
            if let Some(v) = line
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                total += v.trim().parse::<u64>().unwrap_or(0);
            }
        }
    }
    total
}

/// The system calls counted by `perf stat` on a running process.
pub const SYSCALLS: [&str; 10] = [
    "sendmsg",
    "sendmmsg",
    "sendto",
    "write",
    "writev",
    "recvmsg",
    "recvmmsg",
    "recvfrom",
    "read",
    "epoll_wait",
];

/// A `perf stat` counting system calls of one process until stopped.
pub struct Perf {
    child: Child,
    out: PathBuf,
}

impl Perf {
    /// Start counting for these processes, if `perf` can (installed, tracepoints readable).
    pub fn start(pids: &[u32]) -> Option<Perf> {
        let list: Vec<String> = pids.iter().map(u32::to_string).collect();
        let list = list.join(",");
        let out = std::env::temp_dir().join(format!("bench-perf-{}.csv", std::process::id()));
        let events: Vec<String> = SYSCALLS
            .iter()
            .map(|s| format!("syscalls:sys_enter_{s}"))
            .collect();
        let child = Command::new("perf")
            .args([
                "stat",
                "-x",
                ",",
                "-e",
                &events.join(","),
                "-p",
                &list,
                "-o",
            ])
            .arg(&out)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        Some(Perf { child, out })
    }

    /// Stop and read the counts, in the order of [`SYSCALLS`].
    pub fn stop(mut self) -> Option<Vec<(String, u64)>> {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-INT", &pid]).status();
        self.child.wait().ok()?;
        let text = std::fs::read_to_string(&self.out).ok()?;
        let _ = std::fs::remove_file(&self.out);
        let mut counts = Vec::new();
        for line in text.lines() {
            let cols: Vec<&str> = line.split(',').collect();
            if cols.len() < 3 {
                continue;
            }
            if let (Ok(n), Some(name)) = (
                cols[0].parse::<u64>(),
                cols[2].strip_prefix("syscalls:sys_enter_"),
            ) {
                counts.push((name.to_string(), n));
            }
        }
        (!counts.is_empty()).then_some(counts)
    }
}
