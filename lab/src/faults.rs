//! Deployment mistakes injected into a [`Sites`] lab, so tests can check
//! what an operator sees of them: a process server restarted with a
//! certificate that does not name the address it is reached at (and put
//! right again the same way).

use crate::config;
use crate::sites::Sites;
use anyhow::{anyhow, Context, Result};
use rebound_common::pki::{write_cert, Ca, Role};
use rebound_ps::config::Config as PsConfig;
use std::time::Duration;

impl Sites {
    /// The deployment's CA, from the CS dir (`ca.pem`, `ca.key`).
    pub fn ca(&self) -> Result<Ca> {
        let read = |name: &str| {
            let p = self.cs_dir.join(name);
            std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))
        };
        Ca::from_pem(&read("ca.pem")?, &read("ca.key")?).map_err(|e| anyhow!("the lab CA: {e}"))
    }

    /// Issues PS `id` of `site` a new certificate from the lab's CA valid
    /// only for `names` (written where its config's `[tls]` points), and
    /// restarts it with it; waits until it is online at the CS again.
    pub fn reissue_ps_cert(&mut self, site: &str, id: &str, names: &[&str]) -> Result<()> {
        let cfg: PsConfig = config::read_toml(&self.path(&format!("{site}/{id}.toml")))?;
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let ck = self.ca()?.issue(Role::Ps, id, &names)?;
        let dir = cfg
            .tls
            .cert
            .parent()
            .ok_or_else(|| anyhow!("PS {id}'s certificate path has no directory"))?;
        let stem = |p: &std::path::Path| p.file_stem().map(|s| s.to_string_lossy().to_string());
        if stem(&cfg.tls.cert) != stem(&cfg.tls.key) || cfg.tls.key.parent() != Some(dir) {
            anyhow::bail!(
                "PS {id}'s certificate {} and key {} are not NAME.pem/NAME.key in one dir",
                cfg.tls.cert.display(),
                cfg.tls.key.display()
            );
        }
        let name = stem(&cfg.tls.cert).unwrap_or_else(|| "ps".into());
        write_cert(dir, &name, &ck)?;
        self.stop(id)?;
        self.start_component(id)?;
        self.wait_online("ps", id, Duration::from_secs(30))
    }
}
