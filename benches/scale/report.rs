//! The printed report: figures with their targets, percentiles and process memory.

use std::time::Duration;

pub const MIB: f64 = 1024.0 * 1024.0;

/// One figure of the report.
struct Row {
    figure: String,
    value: String,
    target: String,
    pass: Option<bool>,
}

#[derive(Default)]
pub struct Report {
    rows: Vec<Row>,
    notes: Vec<String>,
}

impl Report {
    /// A figure without a target.
    pub fn row(&mut self, figure: impl Into<String>, value: impl Into<String>) {
        self.rows.push(Row {
            figure: figure.into(),
            value: value.into(),
            target: String::new(),
            pass: None,
        });
    }

    /// A figure judged against its target.
    pub fn judged(
        &mut self,
        figure: impl Into<String>,
        value: impl Into<String>,
        target: &str,
        pass: bool,
    ) {
        self.rows.push(Row {
            figure: figure.into(),
            value: value.into(),
            target: target.into(),
            pass: Some(pass),
        });
    }

    pub fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    pub fn print(&self, title: &str) {
        let w0 = self.rows.iter().map(|r| r.figure.len()).max().unwrap_or(0);
        let w1 = self.rows.iter().map(|r| r.value.len()).max().unwrap_or(0);
        let w2 = self.rows.iter().map(|r| r.target.len()).max().unwrap_or(0);
        println!();
        println!("{title}");
        let line = "-".repeat(w0 + w1 + w2 + 16);
        println!("{line}");
        println!(
            "{:w0$} | {:w1$} | {:w2$} | result",
            "figure", "measured", "target"
        );
        println!("{line}");
        for r in &self.rows {
            let result = match r.pass {
                Some(true) => "PASS",
                Some(false) => "FAIL",
                None => "",
            };
            println!(
                "{:w0$} | {:w1$} | {:w2$} | {result}",
                r.figure, r.value, r.target
            );
        }
        println!("{line}");
        for note in &self.notes {
            println!("note: {note}");
        }
        let judged = self.rows.iter().filter(|r| r.pass.is_some()).count();
        let failed = self.rows.iter().filter(|r| r.pass == Some(false)).count();
        if judged > 0 {
            println!("{} of {judged} targets met", judged - failed);
        }
    }
}

/// Resident memory of a process, from /proc/PID/status (bytes; 0 where unavailable).
#[derive(Clone, Copy, Debug, Default)]
pub struct Memory {
    pub rss: u64,
    /// The peak resident size so far.
    pub hwm: u64,
}

impl Memory {
    pub fn of(pid: u32) -> Memory {
        let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let field = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
                .map_or(0, |kb| kb * 1024)
        };
        Memory {
            rss: field("VmRSS:"),
            hwm: field("VmHWM:"),
        }
    }

    pub fn show(&self) -> String {
        format!(
            "RSS {:.1} MiB, peak {:.1} MiB",
            self.rss as f64 / MIB,
            self.hwm as f64 / MIB
        )
    }
}

/// CPU time a process has used so far, all its threads, user and system, from /proc/PID/stat
/// (zero where unavailable). The kernel counts it in USER_HZ ticks, 100 per second on Linux.
pub fn cpu_time(pid: &str) -> Duration {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name in parentheses may hold spaces: count the fields after it.
    let fields: Vec<&str> = text
        .rsplit_once(')')
        .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime, fields 14 and 15 of the line, are the 12th and 13th after the name.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

pub struct Percentiles {
    count: usize,
    pub p50: Duration,
    pub p99: Duration,
    max: Duration,
}

impl Percentiles {
    pub fn of(samples: &mut [Duration]) -> Percentiles {
        samples.sort();
        let at = |q: f64| {
            if samples.is_empty() {
                return Duration::ZERO;
            }
            // Nearest rank.
            let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
            samples[rank - 1]
        };
        Percentiles {
            count: samples.len(),
            p50: at(0.50),
            p99: at(0.99),
            max: samples.last().copied().unwrap_or_default(),
        }
    }

    pub fn show(&self) -> String {
        if self.count == 0 {
            return "no samples".into();
        }
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        format!(
            "p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms ({} samples)",
            ms(self.p50),
            ms(self.p99),
            ms(self.max),
            self.count
        )
    }
}
