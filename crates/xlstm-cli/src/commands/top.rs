//! `xlstm top`: a terminal monitor of a running `xlstm` process — memory (process, system, device),
//! decode speed (instant, average, sparkline), prefill speed, watchdog state, and the processes using
//! the most memory. Reads the snapshots running processes publish (`xlstm_core::live`).
//! Keys: q quit, p pause. `--no-tui` prints text lines, `--json-stream` JSON lines.
use std::time::Duration;

use anyhow::{bail, Result};
use crossterm::event::{self, Event, KeyCode, KeyEventKind};
use ratatui::layout::{Constraint, Direction, Layout};
use ratatui::style::{Color, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Borders, Gauge, Paragraph, Row, Sparkline, Table};
use xlstm_core::live::{live_dir, read_all, Snapshot};

#[derive(clap::Args)]
pub struct Args {
    /// Watch this process (default: the most recently active xlstm process).
    #[arg(long)]
    pub pid: Option<u32>,
    /// Refresh period, ms.
    #[arg(long, default_value_t = 500)]
    pub interval_ms: u64,
    /// Print one text line per refresh instead of the full-screen view.
    #[arg(long)]
    pub no_tui: bool,
    /// Print one JSON object per refresh (for scripts).
    #[arg(long)]
    pub json_stream: bool,
    /// Stop after this many refreshes (0 = until quit).
    #[arg(long, default_value_t = 0)]
    pub count: u64,
}

fn pick(pid: Option<u32>) -> Option<Snapshot> {
    let all = read_all(&live_dir());
    match pid {
        Some(p) => all.into_iter().find(|s| s.pid == p),
        None => all.into_iter().next(),
    }
}

/// (pid, name, rss bytes) of the processes using the most memory.
fn top_processes(n: usize) -> Vec<(u32, String, u64)> {
    let mut v = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
            let Ok(st) = std::fs::read_to_string(e.path().join("status")) else { continue };
            let field = |k: &str| st.lines().find(|l| l.starts_with(k)).map(|l| l[k.len()..].trim().to_string());
            let name = field("Name:").unwrap_or_default();
            let rss = field("VmRSS:").and_then(|r| r.split_whitespace().next().and_then(|x| x.parse::<u64>().ok())).unwrap_or(0) * 1024;
            v.push((pid, name, rss));
        }
    }
    v.sort_by_key(|x| std::cmp::Reverse(x.2));
    v.truncate(n);
    v
}

fn mb(b: u64) -> f64 {
    b as f64 / 1e6
}

fn text_line(s: &Snapshot) -> String {
    format!(
        "pid {} {} [{}] phase {} | prompt {} tok, generated {} | decode {:.1} tok/s (avg {:.1}) | prefill {:.1} tok/s | rss {:.0} MB | sys {:.0}/{:.0} MB | dev {:.0}/{:.0} MB | watchdog {} | chunk {}",
        s.pid, s.model, s.device, s.phase, s.prompt_tokens, s.generated_tokens, s.decode_tok_s_instant, s.decode_tok_s_avg, s.prefill_tok_s,
        mb(s.rss_bytes), mb(s.sys_used_bytes), mb(s.sys_total_bytes), mb(s.dev_used_bytes), mb(s.dev_total_bytes), s.watchdog, s.chunk
    )
}

pub fn run(a: Args) -> Result<()> {
    if a.interval_ms < 50 {
        bail!("--interval-ms must be at least 50");
    }
    let period = Duration::from_millis(a.interval_ms);
    if a.no_tui || a.json_stream {
        let mut n = 0;
        loop {
            match pick(a.pid) {
                Some(s) if a.json_stream => println!("{}", serde_json::to_string(&s)?),
                Some(s) => println!("{}", text_line(&s)),
                None if a.json_stream => println!("{{\"waiting\":true}}"),
                None => println!("waiting for an xlstm process (looking in {})", live_dir().display()),
            }
            n += 1;
            if a.count > 0 && n >= a.count {
                return Ok(());
            }
            std::thread::sleep(period);
        }
    }
    tui(a, period)
}

fn tui(a: Args, period: Duration) -> Result<()> {
    let mut term = ratatui::init();
    let result = (|| -> Result<()> {
        let mut paused = false;
        let mut shown: Option<Snapshot> = None;
        let mut n = 0u64;
        loop {
            if !paused {
                shown = pick(a.pid);
            }
            let procs = top_processes(8);
            term.draw(|f| draw(f, shown.as_ref(), &procs, paused))?;
            n += 1;
            if a.count > 0 && n >= a.count {
                return Ok(());
            }
            if event::poll(period)? {
                if let Event::Key(k) = event::read()? {
                    if k.kind == KeyEventKind::Press {
                        match k.code {
                            KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
                            KeyCode::Char('p') => paused = !paused,
                            _ => {}
                        }
                    }
                }
            }
        }
    })();
    ratatui::restore();
    result
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 { 0.0 } else { (a as f64 / b as f64).clamp(0.0, 1.0) }
}

fn draw(f: &mut ratatui::Frame, s: Option<&Snapshot>, procs: &[(u32, String, u64)], paused: bool) {
    let rows = Layout::default()
        .direction(Direction::Vertical)
        .constraints([Constraint::Length(3), Constraint::Length(3), Constraint::Length(3), Constraint::Length(3), Constraint::Length(7), Constraint::Min(5)])
        .split(f.area());
    let title = format!("xlstm top{}  (q quit, p pause)", if paused { " [paused]" } else { "" });
    let Some(s) = s else {
        let p = Paragraph::new(format!("waiting for an xlstm process (snapshots in {})", live_dir().display())).block(Block::default().borders(Borders::ALL).title(title));
        f.render_widget(p, rows[0]);
        return;
    };
    let head = Paragraph::new(Line::from(format!(
        "pid {}  model {}  device {}  phase {}  prompt {} tok  generated {} tok  watchdog {}  chunk {}",
        s.pid, s.model, s.device, s.phase, s.prompt_tokens, s.generated_tokens, if s.watchdog.is_empty() { "ok" } else { &s.watchdog }, s.chunk
    )))
    .block(Block::default().borders(Borders::ALL).title(title));
    f.render_widget(head, rows[0]);
    let gauge = |label: String, r: f64, color: Color| Gauge::default().block(Block::default().borders(Borders::ALL).title(label)).gauge_style(Style::default().fg(color)).ratio(r);
    f.render_widget(gauge(format!("process memory {:.0} MB of {:.0} MB", mb(s.rss_bytes), mb(s.sys_total_bytes)), ratio(s.rss_bytes, s.sys_total_bytes), Color::Cyan), rows[1]);
    f.render_widget(gauge(format!("system memory {:.0} / {:.0} MB", mb(s.sys_used_bytes), mb(s.sys_total_bytes)), ratio(s.sys_used_bytes, s.sys_total_bytes), Color::Yellow), rows[2]);
    let dev = if s.dev_total_bytes > 0 { format!("device memory {:.0} / {:.0} MB", mb(s.dev_used_bytes), mb(s.dev_total_bytes)) } else { "device memory: none (CPU)".into() };
    f.render_widget(gauge(dev, ratio(s.dev_used_bytes, s.dev_total_bytes), Color::Magenta), rows[3]);
    let hist: Vec<u64> = s.decode_history.iter().map(|&x| x.max(0.0) as u64).collect();
    let spark = Sparkline::default()
        .block(Block::default().borders(Borders::ALL).title(format!(
            "decode {:.1} tok/s (avg {:.1})   prefill {:.1} tok/s",
            s.decode_tok_s_instant, s.decode_tok_s_avg, s.prefill_tok_s
        )))
        .data(&hist)
        .style(Style::default().fg(Color::Green));
    f.render_widget(spark, rows[4]);
    let table = Table::new(
        procs.iter().map(|(pid, name, rss)| Row::new(vec![pid.to_string(), name.clone(), format!("{:.0} MB", mb(*rss))])),
        [Constraint::Length(8), Constraint::Length(24), Constraint::Length(12)],
    )
    .header(Row::new(vec!["pid", "process", "memory"]).style(Style::default().fg(Color::Gray)))
    .block(Block::default().borders(Borders::ALL).title("top processes by memory"));
    f.render_widget(table, rows[5]);
}
