//! The in-process lab of the bench's failover part: a configuration server
//! (`init` + `run`, SQLite), per site a process server `ps-<site>` and a
//! master target `mt-<site>`, and one machine's agent, all tasks of this
//! process on loopback ports with mutual TLS; every component enrolls with
//! the CS's passphrase. Each MT's `[hooks] power_on` is `power_on.sh
//! <site>`: it "boots" the machine at that site by starting this very
//! executable's hidden `__demo-agent` subcommand ([`agent_main`]) over the
//! replica files the MT handed over, detached, with its pid in
//! `agents/<machine>@<site>.pid` and the time it ran (ms) in
//! `agents/<machine>@<site>/powered_on_ms`. [`Lab::shutdown`] stops them
//! all. `rebound demo` itself runs on child processes
//! ([`rebound_lab::Sites`]); this lab stays until the bench does too.

use anyhow::{anyhow, bail, Context, Result};
use rebound_common::enrollment::Enrolled;
use rebound_common::pki::Role;
use rebound_lab::admin::call as agent_admin;
use rebound_proto::control as pb;
use rebound_proto::control::admin_client::AdminClient;
use std::collections::BTreeMap;
use std::future::Future;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

pub const MACHINE: &str = "m1";
pub const DISK: &str = "disk0";

type Task = (String, oneshot::Sender<()>, JoinHandle<Result<()>>);

/// A component running as a task, stopped through its shutdown future.
fn task<F, E>(name: &str, f: impl FnOnce(oneshot::Receiver<()>) -> F) -> Task
where
    F: Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display,
{
    let (tx, rx) = oneshot::channel();
    let fut = f(rx);
    let n = name.to_string();
    let h = tokio::spawn(async move { fut.await.map_err(|e| anyhow!("{n}: {e}")) });
    (name.to_string(), tx, h)
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The hidden `__demo-agent --config FILE` of the binary running this lab:
/// an agent over the config the power_on hook wrote, until SIGTERM.
pub async fn agent_main(config: &Path) -> Result<()> {
    let cfg: rebound_agent::config::Config = rebound_common::config::load(Some(config))
        .map_err(|e| anyhow!("loading the agent config: {e}"))?;
    let l = std::net::TcpListener::bind(&cfg.nbd_listen)
        .map_err(|e| anyhow!("cannot listen for NBD on {}: {e}", cfg.nbd_listen))?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    rebound_agent::run(cfg, l, async move {
        term.recv().await;
    })
    .await
    .map_err(|e| anyhow!("agent: {e}"))
}

pub struct Lab {
    pub dir: PathBuf,
    pub cs_addr: String,
    passphrase: String,
    pub admin: AdminClient<Channel>,
    /// NBD port of each site's MT (point views).
    pub mt_nbd: BTreeMap<String, u16>,
    /// CS, PSs and MTs, in start order.
    tasks: Vec<Task>,
    /// The machine's first agent (in process, at the first site).
    agent: Option<Task>,
}

fn tls_toml(e: &Enrolled) -> String {
    format!(
        "[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
        e.ca, e.cert, e.key
    )
}

impl Lab {
    /// `rebound_cs::init` in `<dir>/cs` (short heartbeats and timeouts for
    /// the demo), the CS task, and an admin client with its admin cert.
    pub async fn start_cs(dir: &Path) -> Result<Lab> {
        Self::start_cs_with(dir, Some(0.5)).await
    }

    /// As [`Lab::start_cs`], with the CS's heartbeat (the period of every
    /// component's status report, which the failover's catch-up waits on):
    /// `None` keeps the CS's default (the bench measures a default setup).
    pub async fn start_cs_with(dir: &Path, heartbeat_secs: Option<f64>) -> Result<Lab> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let cs_addr = listener.local_addr()?.to_string();
        let cs_dir = dir.join("cs");
        let init = rebound_cs::init::init(&cs_dir, &[], Some(&cs_addr))
            .await
            .map_err(|e| anyhow!("initialising the configuration server: {e}"))?;
        let text = std::fs::read_to_string(&init.config_file)?;
        let text: Vec<String> = text
            .lines()
            .map(|l| {
                let set = |k: &str, v: &str| l.starts_with(k).then(|| format!("{k} = {v}"));
                heartbeat_secs
                    .and_then(|h| set("heartbeat_secs", &h.to_string()))
                    .or_else(|| set("command_timeout_secs", "30"))
                    .or_else(|| set("drain_timeout_secs", "60"))
                    .or_else(|| set("initial_sync_timeout_secs", "120"))
                    .unwrap_or_else(|| l.to_string())
            })
            .collect();
        std::fs::write(&init.config_file, text.join("\n") + "\n")?;
        let cfg: rebound_cs::Config = rebound_common::config::load(Some(&init.config_file))
            .map_err(|e| anyhow!("the CS config: {e}"))?;
        let t = task("configuration server", |rx| {
            rebound_cs::run(cfg, listener, async move {
                let _ = rx.await;
            })
        });
        let cs = crate::operator::CsArgs {
            cs: Some(cs_addr.clone()),
            certs: Some(cs_dir.clone()),
        };
        let t0 = Instant::now();
        let admin = loop {
            if let Ok(mut c) = crate::operator::connect(&cs).await {
                if c.status(pb::StatusRequest {}).await.is_ok() {
                    break c;
                }
            }
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("the configuration server did not answer within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        Ok(Lab {
            dir: dir.to_path_buf(),
            cs_addr,
            passphrase: init.passphrase,
            admin,
            mt_nbd: BTreeMap::new(),
            tasks: vec![t],
            agent: None,
        })
    }

    async fn enroll(&self, role: Role, id: &str, out: &Path) -> Result<Enrolled> {
        std::fs::create_dir_all(out)?;
        rebound_common::enrollment::enroll(&self.cs_addr, &self.passphrase, role, id, out)
            .await
            .map_err(|e| anyhow!("enrolling {role} {id}: {e}"))
    }

    fn cs_toml(&self) -> String {
        format!(
            "[cs]\naddr = {:?}\nserver_name = \"localhost\"\n",
            self.cs_addr
        )
    }

    /// Enrolls and starts `ps-<site>` and `mt-<site>`; waits until the CS
    /// sees both online.
    pub async fn start_site(&mut self, site: &str) -> Result<()> {
        let ps_l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let mt_l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let mt_nbd = std::net::TcpListener::bind("127.0.0.1:0")?;
        let (ps_addr, mt_addr) = (ps_l.local_addr()?, mt_l.local_addr()?);
        let nbd_port = mt_nbd.local_addr()?.port();
        let base = self.dir.join(site);
        let ps_certs = self
            .enroll(Role::Ps, &format!("ps-{site}"), &base.join("ps/certs"))
            .await?;
        let mt_certs = self
            .enroll(Role::Mt, &format!("mt-{site}"), &base.join("mt/certs"))
            .await?;
        let origin = Path::new("<demo>");
        let hook = format!("{} {site}", self.dir.join("power_on.sh").display());
        let mt_cfg: rebound_mt::config::Config = rebound_common::config::parse(
            &format!(
                "listen = \"{mt_addr}\"\nnbd_listen = \"127.0.0.1:{nbd_port}\"\nsite = {site:?}\ndata_dir = {:?}\n{}{}[hooks]\npower_on = {hook:?}\nhook_timeout_secs = 30\n",
                base.join("mt/data"),
                tls_toml(&mt_certs),
                self.cs_toml()
            ),
            origin,
        )?;
        let ps_cfg: rebound_ps::config::Config = rebound_common::config::parse(
            &format!(
                "listen = \"{ps_addr}\"\nsite = {site:?}\ncache_dir = {:?}\n{}[mt]\naddr = \"{mt_addr}\"\nserver_name = \"localhost\"\n{}",
                base.join("ps/cache"),
                tls_toml(&ps_certs),
                self.cs_toml()
            ),
            origin,
        )?;
        self.tasks.push(task(&format!("mt-{site}"), |rx| {
            rebound_mt::run(mt_cfg, mt_l, mt_nbd, async move {
                let _ = rx.await;
            })
        }));
        self.tasks.push(task(&format!("ps-{site}"), |rx| {
            rebound_ps::run(ps_cfg, ps_l, async move {
                let _ = rx.await;
            })
        }));
        self.mt_nbd.insert(site.to_string(), nbd_port);
        self.wait_online("ps", &format!("ps-{site}")).await?;
        self.wait_online("mt", &format!("mt-{site}")).await
    }

    pub async fn wait_online(&mut self, role: &str, id: &str) -> Result<()> {
        let t0 = Instant::now();
        loop {
            if let Ok(r) = self.admin.status(pb::StatusRequest {}).await {
                if r.into_inner()
                    .components
                    .iter()
                    .any(|c| c.role == role && c.id == id && c.health == "online")
                {
                    return Ok(());
                }
            }
            if t0.elapsed() > Duration::from_secs(60) {
                bail!("{role} {id} not online at the CS within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn agent_dir(&self, site: &str) -> PathBuf {
        self.dir.join(format!("agents/{MACHINE}@{site}"))
    }

    fn pid_file(&self, site: &str) -> PathBuf {
        self.dir.join(format!("agents/{MACHINE}@{site}.pid"))
    }

    /// The machine's disk at the first site, its agent's enrollment, the
    /// agent config pieces for both sites, the power_on hook; then starts
    /// the agent in process at the first site.
    pub async fn add_machine(&mut self, sites: &[&str], disk_size: u64) -> Result<PathBuf> {
        let disk = self.dir.join(format!("disks/{MACHINE}/{DISK}.img"));
        std::fs::create_dir_all(disk.parent().unwrap_or(&self.dir))?;
        std::fs::File::create(&disk)?.set_len(disk_size)?;
        let certs = self
            .enroll(
                Role::Agent,
                MACHINE,
                &self.dir.join(format!("agents/{MACHINE}/certs")),
            )
            .await?;
        for site in sites {
            let d = self.agent_dir(site);
            std::fs::create_dir_all(&d)?;
            let port = free_port()?;
            std::fs::write(
                d.join("agent.head.toml"),
                format!("machine_id = {MACHINE:?}\nsite = {site:?}\nnbd_listen = \"127.0.0.1:{port}\"\ncrash_interval_ms = 1000\nshutdown_drain_secs = 10\n"),
            )?;
            std::fs::write(
                d.join("agent.tail.toml"),
                format!("{}{}", tls_toml(&certs), self.cs_toml()),
            )?;
            std::fs::write(d.join("nbd_port"), port.to_string())?;
        }
        self.write_power_on_script()?;

        let d = self.agent_dir(sites[0]);
        let state = d.join("state");
        std::fs::write(d.join("state_dir"), state.as_os_str().as_encoded_bytes())?;
        let text = format!(
            "{}state_dir = {state:?}\n[[disks]]\nname = {DISK:?}\npath = {disk:?}\n{}",
            std::fs::read_to_string(d.join("agent.head.toml"))?,
            std::fs::read_to_string(d.join("agent.tail.toml"))?
        );
        let cfg: rebound_agent::config::Config =
            rebound_common::config::parse(&text, &d.join("agent.toml"))?;
        let l = std::net::TcpListener::bind(&cfg.nbd_listen)?;
        self.agent = Some(task(&format!("agent {MACHINE}@{}", sites[0]), |rx| {
            rebound_agent::run(cfg, l, async move {
                let _ = rx.await;
            })
        }));
        self.wait_agent_ready(sites[0]).await?;
        self.wait_online("agent", MACHINE).await?;
        Ok(disk)
    }

    fn write_power_on_script(&self) -> Result<()> {
        let exe = std::env::current_exe().context("finding the rebound executable")?;
        let script = format!(
            r#"#!/bin/sh
# power_on hook of `rebound demo`: boot $REBOUND_MACHINE at site $1 from the
# replica the MT handed over, as `rebound __demo-agent` in the background.
set -e
site="$1"
m="$REBOUND_MACHINE"
base={base:?}
d="$base/agents/$m@$site"
date +%s%3N > "$d/powered_on_ms.tmp"
state="$d/state-$REBOUND_REPLICATION"
mkdir -p "$state"
cp "$d/agent.head.toml" "$d/agent.toml"
printf 'state_dir = "%s"\n' "$state" >> "$d/agent.toml"
printf '%s' "$state" > "$d/state_dir"
for f in $REBOUND_DISKS; do
  n=$(basename "$f" .img)
  printf '[[disks]]\nname = "%s"\npath = "%s"\n' "$n" "$f" >> "$d/agent.toml"
done
cat "$d/agent.tail.toml" >> "$d/agent.toml"
RUST_LOG=info setsid {exe:?} __demo-agent --config "$d/agent.toml" >> "$d/agent.log" 2>&1 < /dev/null &
echo $! > "$base/agents/$m@$site.pid"
mv "$d/powered_on_ms.tmp" "$d/powered_on_ms"
"#,
            base = self.dir,
        );
        let path = self.dir.join("power_on.sh");
        std::fs::write(&path, script)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        Ok(())
    }

    pub fn agent_port(&self, site: &str) -> Result<u16> {
        Ok(
            std::fs::read_to_string(self.agent_dir(site).join("nbd_port"))?
                .trim()
                .parse()?,
        )
    }

    pub fn agent_sock(&self, site: &str) -> Result<PathBuf> {
        let p = std::fs::read_to_string(self.agent_dir(site).join("state_dir"))
            .with_context(|| format!("no agent of {MACHINE} was started at {site}"))?;
        Ok(PathBuf::from(p.trim()).join("admin.sock"))
    }

    async fn wait_agent_ready(&self, site: &str) -> Result<()> {
        let t0 = Instant::now();
        let port = self.agent_port(site)?;
        loop {
            let ok = self
                .agent_sock(site)
                .map(|s| UnixStream::connect(s).is_ok())
                .unwrap_or(false)
                && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
            if ok {
                return Ok(());
            }
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("the agent of {MACHINE} at {site} did not come up within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Forgets an earlier power-on at `site` (before a hand-over to it).
    pub fn clear_power_on(&self, site: &str) {
        let _ = std::fs::remove_file(self.agent_dir(site).join("powered_on_ms"));
    }

    /// Waits for the power_on hook at `site` and for its agent to be up;
    /// the time (ms since the epoch) the hook ran.
    pub async fn wait_powered_on(&self, site: &str) -> Result<u64> {
        let f = self.agent_dir(site).join("powered_on_ms");
        let t0 = Instant::now();
        let ms = loop {
            if let Ok(t) = std::fs::read_to_string(&f) {
                break t.trim().parse::<u64>()?;
            }
            if t0.elapsed() > Duration::from_secs(60) {
                bail!("the power_on hook at {site} did not run within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        self.wait_agent_ready(site).await?;
        Ok(ms)
    }

    /// Tags a crash point on the agent at `site`: its id and seq.
    pub fn tag(&self, site: &str) -> Result<(String, u64)> {
        let v = agent_admin(
            &self.agent_sock(site)?,
            serde_json::json!({"cmd": "tag", "kind": "crash"}),
        )?;
        Ok((
            v["id"].as_str().unwrap_or_default().to_string(),
            v["seq"].as_u64().unwrap_or_default(),
        ))
    }

    /// Stops the machine's agent at `site`: the in-process one, or the
    /// hook-started one (SIGTERM, then SIGKILL after 15 s).
    pub async fn stop_agent(&mut self, site: &str) -> Result<()> {
        if let Some(a) = self.agent.take() {
            if a.0.ends_with(&format!("@{site}")) {
                let _ = a.1.send(());
                return a.2.await?;
            }
            self.agent = Some(a);
        }
        let pid_file = self.pid_file(site);
        if let Ok(p) = std::fs::read_to_string(&pid_file) {
            if let Ok(pid) = p.trim().parse::<i32>() {
                // SAFETY: kill(2) on the pid our power_on hook recorded.
                unsafe { libc::kill(pid, libc::SIGTERM) };
                let t0 = Instant::now();
                // SAFETY: signal 0 only checks that the process exists.
                while unsafe { libc::kill(pid, 0) } == 0 {
                    if t0.elapsed() > Duration::from_secs(15) {
                        // SAFETY: as above.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            let _ = std::fs::remove_file(&pid_file);
        }
        Ok(())
    }

    /// Stops everything: hook-started agents, the in-process agent, PSs and
    /// MTs, the CS last. The first error, if any.
    pub async fn shutdown(&mut self, sites: &[&str]) -> Result<()> {
        let mut first: Option<anyhow::Error> = None;
        for site in sites {
            if let Err(e) = self.stop_agent(site).await {
                first.get_or_insert(e);
            }
        }
        let mut all: Vec<Task> = self.agent.take().into_iter().collect();
        all.extend(self.tasks.drain(..).rev());
        for (name, tx, h) in all {
            let _ = tx.send(());
            match tokio::time::timeout(Duration::from_secs(20), h).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => {
                    first.get_or_insert(e);
                }
                Ok(Err(e)) => {
                    first.get_or_insert(anyhow!("{name}: {e}"));
                }
                Err(_) => {
                    first.get_or_insert(anyhow!("{name} did not stop within 20 s"));
                }
            }
        }
        first.map_or(Ok(()), Err)
    }

    // -------------------------------------------------------- Admin calls

    pub async fn machine(&mut self) -> Result<pb::MachineInfo> {
        let r = self.admin.machines(pb::MachinesRequest {}).await?;
        r.into_inner()
            .machines
            .into_iter()
            .find(|m| m.id == MACHINE)
            .ok_or_else(|| anyhow!("machine {MACHINE} unknown to the CS"))
    }

    pub async fn wait_state(&mut self, state: &str) -> Result<pb::MachineInfo> {
        let t0 = Instant::now();
        loop {
            let m = self.machine().await?;
            if m.state == state {
                return Ok(m);
            }
            if t0.elapsed() > Duration::from_secs(90) {
                bail!("{MACHINE} is {} after 90 s, not {state}", m.state);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Follows a started job to its end; the job when it succeeded.
    pub async fn finish(&mut self, job: Option<pb::Job>) -> Result<pb::Job> {
        let id = job.ok_or_else(|| anyhow!("the CS started no job"))?.id;
        let t0 = Instant::now();
        loop {
            let j = self
                .admin
                .get_job(pb::GetJobRequest { id: id.clone() })
                .await?
                .into_inner();
            match j.state.as_str() {
                "succeeded" => return Ok(j),
                "failed" => bail!("job {id} ({}) failed: {}", j.kind, j.error),
                _ => {}
            }
            if t0.elapsed() > Duration::from_secs(120) {
                bail!(
                    "job {id} ({}) still {} after 120 s: {}",
                    j.kind,
                    j.state,
                    j.status
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the CS lists point `id` of the machine.
    pub async fn wait_point(&mut self, id: &str) -> Result<()> {
        let t0 = Instant::now();
        loop {
            if let Ok(r) = self
                .admin
                .points(pb::PointsRequest {
                    machine: MACHINE.into(),
                })
                .await
            {
                if r.into_inner().points.iter().any(|p| p.id == id) {
                    return Ok(());
                }
            }
            if t0.elapsed() > Duration::from_secs(60) {
                bail!("point {id} of {MACHINE} not listed by the CS within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
