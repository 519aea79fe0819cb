//! `ballastctl`: the operator's command line (DESIGN §5).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use ballast_control_plane::ctl::{self, Api, ApplyArgs, DeleteKind, Kind, Output};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "ballastctl", version, about = "Operate a Ballast mesh")]
struct Cli {
    /// The control plane's admin API.
    #[arg(long, env = "BALLAST_CONTROL_PLANE", default_value = "http://127.0.0.1:9990", global = true)]
    control_plane: String,
    /// The admin token (a file holding the control plane's --admin-token-file token),
    /// needed when the control plane runs with workload identity.
    #[arg(long, env = "BALLAST_TOKEN_FILE", global = true)]
    token_file: Option<PathBuf>,
    /// The mesh's trust anchor (CA certificate, PEM) to verify an https://
    /// --control-plane with (ConfigMap ballast-trust-anchors, key ca.crt).
    #[arg(long, env = "BALLAST_CA_FILE", global = true)]
    ca_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create or update policies and services from a YAML file.
    Apply {
        #[command(flatten)]
        args: ApplyArgs,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
    },
    /// List policies, services, endpoints or connected sidecars (proxies).
    Get {
        #[arg(value_enum)]
        kind: Kind,
        /// Only this namespace (default: all).
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Delete a policy or a service.
    Delete {
        #[arg(value_enum)]
        kind: DeleteKind,
        name: String,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
    },
    /// A service's endpoints and policy, and what each sidecar reports.
    Describe {
        /// Only `service` can be described.
        #[arg(value_parser = ["service", "svc"])]
        kind: String,
        name: String,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Run the local mesh demo: a control plane, sample services behind sidecars that
    /// call each other over mutual TLS, traffic.
    Demo(ballast_control_plane::demo::DemoArgs),
    /// Print the ResiliencePolicy CustomResourceDefinition (YAML) for `kubectl apply -f -`.
    Crd,
    /// Bootstrap tokens: proof of a service account for sidecars without a Kubernetes
    /// token (workload identity).
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a bootstrap token and print it (shown once; the control plane keeps only
    /// its hash). A sidecar passes it to get certificates for that service account.
    Create {
        #[arg(short = 'n', long)]
        namespace: String,
        #[arg(long)]
        service_account: String,
        /// How long the token stays valid (at most 365 days).
        #[arg(long, default_value = "24h", value_parser = ballast_api::duration::parse_flag)]
        ttl: Duration,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ballastctl: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Command::Demo(args) = cli.command {
        return match rt.block_on(ballast_control_plane::demo::run(args)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ballastctl demo: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let Command::Crd = cli.command {
        print!("{}", ctl::crd());
        return ExitCode::SUCCESS;
    }
    let api = match Api::from_files(&cli.control_plane, cli.ca_file.as_deref(), cli.token_file.as_deref()) {
        Ok(api) => api,
        Err(e) => {
            eprintln!("ballastctl: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match &cli.command {
            Command::Apply { args, output } => ctl::apply(&api, args, *output).await,
            Command::Get { kind, namespace, output } => {
                ctl::get(&api, *kind, namespace.as_deref(), *output).await
            }
            Command::Delete { kind, name, namespace } => ctl::delete(&api, *kind, namespace, name).await,
            Command::Describe { name, namespace, output, .. } => {
                ctl::describe(&api, namespace, name, *output).await
            }
            Command::Token(TokenCommand::Create { namespace, service_account, ttl, output }) => {
                ctl::create_token(&api, namespace, service_account, *ttl, *output).await
            }
            Command::Crd => Ok(ctl::crd()),
            Command::Demo(_) => unreachable!("handled above"),
        }
    });
    match result {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ballastctl: {e}");
            ExitCode::FAILURE
        }
    }
}
