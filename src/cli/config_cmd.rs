//! `vmbackup config show`: the effective system.conf values and where each came from.

use anyhow::Result;

use super::args::ConfigCmd;
use super::output::{print_json, Table};
use super::Ctx;
use crate::error::ExitCode;

pub fn run(ctx: &Ctx, cmd: ConfigCmd) -> Result<ExitCode> {
    match cmd {
        ConfigCmd::Show => {
            let cfg = ctx.system_config()?;
            let entries = cfg.entries();
            if ctx.json {
                print_json(&serde_json::json!({ "file": ctx.config_path, "settings": entries }));
            } else {
                out!("file: {}", ctx.config_path.display());
                let mut t = Table::new(&["KEY", "VALUE", "SOURCE"]);
                for e in &entries {
                    t.row(vec![
                        e.key.to_string(),
                        e.value.clone().unwrap_or_else(|| "-".into()),
                        e.source.clone(),
                    ]);
                }
                t.print();
            }
            Ok(ExitCode::Ok)
        }
    }
}
