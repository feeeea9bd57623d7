//! `runvm network`: the pod network of a running container's VM, JSON in and out. A thin layer
//! over runvm-sandbox (`Sandbox::add_interface` and friends).

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use runvm_sandbox::agent::{Interface, Route};
use runvm_sandbox::config::Config;
use runvm_sandbox::network::AddInterface;
use runvm_sandbox::standalone::{self, Attached, StandaloneError};
use runvm_sandbox::ContainerId;
use serde::de::DeserializeOwned;

use crate::args::NetworkCommand;
use crate::oci::block_on;

/// Reads JSON of type `T` from `source`: a file, `-` for stdin, or the JSON text itself.
fn read_json<T: DeserializeOwned>(source: &str, what: &str) -> Result<T> {
    let text = if source.trim_start().starts_with(['{', '[']) {
        source.to_owned()
    } else {
        crate::ops::read_json_input(Path::new(source), what)?
    };
    serde_json::from_str(&text).with_context(|| format!("{source}: not valid JSON for {what}"))
}

fn print<T: serde::Serialize>(value: &T) -> Result<ExitCode> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(ExitCode::SUCCESS)
}

fn running(config: &Config, id: &str) -> Result<Attached> {
    let id = ContainerId::parse(id)?;
    let (sb, st) = standalone::open(config, &id)?;
    if st.status == "stopped" {
        return Err(StandaloneError::NotRunning.into());
    }
    Ok(sb)
}

pub fn run(config: &Config, command: NetworkCommand) -> Result<ExitCode> {
    match command {
        NetworkCommand::Add { id, request } => {
            let request: AddInterface = read_json(&request, "an interface to add")?;
            let added = block_on(async {
                let mut sb = running(config, &id)?;
                Ok(sb.add_interface(&request).await?)
            })?;
            print(&added)
        }
        NetworkCommand::Remove { id, name } => {
            block_on(async {
                let mut sb = running(config, &id)?;
                Ok(sb.remove_interface(&name).await?)
            })?;
            Ok(ExitCode::SUCCESS)
        }
        NetworkCommand::Update { id, interface } => {
            let interface: Interface = read_json(&interface, "an interface")?;
            let now = block_on(async {
                let mut sb = running(config, &id)?;
                Ok(sb.update_interface(&interface).await?)
            })?;
            print(&now)
        }
        NetworkCommand::List { id } => {
            let list = block_on(async {
                let mut sb = running(config, &id)?;
                Ok(sb.list_interfaces().await?)
            })?;
            print(&list)
        }
        NetworkCommand::Routes { id, replace } => {
            let wanted: Option<Vec<Route>> = replace
                .map(|r| read_json(&r, "a list of routes"))
                .transpose()?;
            let routes = block_on(async {
                let mut sb = running(config, &id)?;
                Ok(match &wanted {
                    Some(w) => sb.update_routes(w).await?,
                    None => sb.list_routes().await?,
                })
            })?;
            print(&routes)
        }
    }
}
