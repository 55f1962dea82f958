//! Running the pipeline's binaries: timed, with their peak RSS, or in the background.
//!
//! Peak RSS comes from `getrusage(RUSAGE_CHILDREN)`, which reports the largest child a
//! process has waited for. To get one binary's figure the bench re-runs itself as a small
//! wrapper (`bench measure -- <binary> <args>`) that starts the binary, waits for it and prints
//! its wall time and peak RSS as one JSON line.

use anyhow::{bail, Context, Result};
use nix::sys::resource::{getrusage, UsageWho};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

/// What the wrapper reports of one measured run.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Measured {
    pub code: i32,
    pub secs: f64,
    pub max_rss_kb: u64,
    /// User plus system CPU time of the command (and what it waited for).
    pub cpu_secs: f64,
}

/// The wrapper (`bench measure -- cmd args...`): runs the command with this process's
/// stderr as its stdout and stderr, then prints `Measured` on stdout.
pub fn wrapper_main(cmd: &[String]) -> Result<i32> {
    let (program, args) = cmd.split_first().context("measure needs a command")?;
    let out = std::io::stderr().as_fd().try_clone_to_owned()?;
    let started = Instant::now();
    let status = std::process::Command::new(program)
        .args(args)
        .stdout(Stdio::from(out))
        .status()
        .with_context(|| format!("starting {program}"))?;
    let secs = started.elapsed().as_secs_f64();
    let usage = getrusage(UsageWho::RUSAGE_CHILDREN)?;
    let m = Measured {
        code: status.code().unwrap_or(-1),
        secs,
        // Linux reports ru_maxrss in KiB.
        max_rss_kb: usage.max_rss().max(0) as u64,
        cpu_secs: [usage.user_time(), usage.system_time()]
            .iter()
            .map(|t| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6)
            .sum(),
    };
    println!("{}", serde_json::to_string(&m)?);
    Ok(0)
}

/// How to run the pipeline's binaries: where they are, their environment, where logs go.
#[derive(Debug, Clone)]
pub struct Runner {
    pub bin_dir: PathBuf,
    pub env: Vec<(String, String)>,
    pub log_dir: PathBuf,
    pub cwd: PathBuf,
}

impl Runner {
    fn command(
        &self,
        program: &Path,
        args: &[&str],
        log_name: &str,
    ) -> Result<tokio::process::Command> {
        std::fs::create_dir_all(&self.log_dir)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_dir.join(format!("{log_name}.log")))?;
        let mut c = tokio::process::Command::new(program);
        c.args(args)
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .current_dir(&self.cwd)
            .stdin(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true);
        Ok(c)
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.log_dir.join(format!("{name}.log"))
    }

    /// Runs `binary args` to completion through the wrapper; fails unless it exits 0.
    pub async fn measured(&self, binary: &str, args: &[&str]) -> Result<Measured> {
        let bin = self.bin_dir.join(binary);
        if !bin.exists() {
            bail!(
                "{} not found: build it first (cargo build --release --bins)",
                bin.display()
            );
        }
        self.measured_program(binary, &bin, args).await
    }

    /// Runs `program args` to completion through the wrapper, its output in `<name>.log`;
    /// fails unless it exits 0.
    pub async fn measured_program(
        &self,
        binary: &str,
        bin: &Path,
        args: &[&str],
    ) -> Result<Measured> {
        let me = std::env::current_exe()?;
        let bin_s = bin.display().to_string();
        let mut wargs = vec!["measure", "--", bin_s.as_str()];
        wargs.extend_from_slice(args);
        let out = self
            .command(&me, &wargs, binary)?
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {binary}"))?
            .wait_with_output()
            .await
            .with_context(|| format!("running {binary}"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let m: Measured = serde_json::from_str(text.lines().last().unwrap_or(""))
            .with_context(|| format!("reading the measurement of {binary}: {text:?}"))?;
        if m.code != 0 {
            bail!(
                "{binary} {} exited with {}; see {}",
                args.join(" "),
                m.code,
                self.log_path(binary).display()
            );
        }
        Ok(m)
    }

    /// Starts `binary args` in the background (its output appended to its log).
    pub fn spawn(&self, binary: &str, args: &[&str]) -> Result<Background> {
        self.spawn_program(binary, &self.bin_dir.join(binary), args)
    }

    /// Starts `program args` in the background, its output appended to `<name>.log`.
    pub fn spawn_program(&self, name: &str, program: &Path, args: &[&str]) -> Result<Background> {
        let child = self
            .command(program, args, name)?
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Background {
            name: name.to_owned(),
            child,
            log: self.log_path(name),
        })
    }
}

/// A binary running in the background; killed if dropped.
pub struct Background {
    name: String,
    child: tokio::process::Child,
    pub log: PathBuf,
}

impl Background {
    /// SIGTERM, then waits (SIGKILL after 30 s); fails unless it exited 0.
    pub async fn stop(self) -> Result<()> {
        if let Some(id) = self.child.id() {
            kill(Pid::from_raw(id as i32), Signal::SIGTERM)?;
        }
        self.exited(Duration::from_secs(30), "stop within 30 s of SIGTERM")
            .await
    }

    /// Waits for the process to exit by itself (killed after `timeout`); fails unless it
    /// exited 0.
    pub async fn wait(self, timeout: Duration) -> Result<()> {
        let what = format!("finish within {timeout:?}");
        self.exited(timeout, &what).await
    }

    /// Waits up to `timeout` for the exit (then kills it: it did not `what`); fails unless it
    /// exited 0.
    async fn exited(mut self, timeout: Duration, what: &str) -> Result<()> {
        let status = match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(s) => s?,
            Err(_) => {
                self.child.kill().await?;
                bail!("{} did not {what}; see {}", self.name, self.log.display());
            }
        };
        if !status.success() {
            bail!(
                "{} ended with {status}; see {}",
                self.name,
                self.log.display()
            );
        }
        Ok(())
    }

    /// The process id (fails if it has been waited for).
    pub fn pid(&self) -> Result<u32> {
        self.child
            .id()
            .with_context(|| format!("{} has already exited", self.name))
    }

    /// Fails if the process has already exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited early with {status}; see {}",
                self.name,
                self.log.display()
            );
        }
        Ok(())
    }
}
