//! The `salon` command: serve, check the configuration, administer.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use salon::{
    config::{Config, LogFormat},
    service::Services,
};

#[derive(Parser)]
#[command(
    name = "salon",
    version,
    about = "A Matrix homeserver for an organisation's own staff"
)]
struct Cli {
    /// TOML configuration file; without one, every key has its default.
    #[arg(long, short, global = true, env = "SALON_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the homeserver.
    Serve,
    /// Check the configuration and explain what is wrong.
    CheckConfig,
    /// Administration commands (run while the server is stopped).
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Create a local account; prompts for nothing, prints the generated password if none is given.
    CreateUser {
        /// Localpart of the new user (`alice` for `@alice:<server_name>`).
        name: String,
        #[arg(long)]
        password: Option<String>,
        #[arg(long)]
        admin: bool,
        /// Their email address: the email bridge delivers mail for it to them.
        #[arg(long)]
        email: Option<String>,
    },
    /// Manage registration tokens.
    RegistrationToken {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Manage appservice registrations kept in the database.
    Appservice {
        #[command(subcommand)]
        command: AppserviceCommand,
    },
    /// The organisation's directory (LDAP / Active Directory).
    Ldap {
        #[command(subcommand)]
        command: LdapCommand,
    },
}

#[derive(Subcommand)]
enum LdapCommand {
    /// Import the directory's users, update names, and deactivate or lock accounts that
    /// left it.
    Sync {
        /// Only say what would change.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Subcommand)]
enum AppserviceCommand {
    /// Add (or replace) the registration in a YAML file.
    Register { file: std::path::PathBuf },
    /// Every registration: from the database, the registration directory and bundled ones.
    List,
    /// Remove a registration added with `register`.
    Unregister { id: String },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a token (random unless given).
    Create {
        #[arg(long)]
        token: Option<String>,
        /// How many registrations it allows (unlimited if absent).
        #[arg(long)]
        uses: Option<u64>,
        /// Valid for this many hours (forever if absent).
        #[arg(long)]
        valid_hours: Option<u64>,
    },
    List,
    Delete {
        token: String,
    },
}

fn load_config(path: Option<&std::path::Path>) -> Result<Config, String> {
    Config::load(path, std::env::vars()).map_err(|e| format!("configuration error: {e}"))
}

fn init_logging(config: &Config) {
    use std::io::IsTerminal;
    use tracing_subscriber::{EnvFilter, fmt};
    // The authorisation rules log every decision at info; that is debugging detail.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("ruma_state_res=warn,{}", config.log.level)));
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Pretty => builder.init(),
    }
}

fn main() -> std::process::ExitCode {
    salon::allocator::tune();
    let cli = Cli::parse();
    let config = match load_config(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return std::process::ExitCode::from(2);
        }
    };
    match cli.command {
        Command::CheckConfig => {
            println!(
                "configuration is valid: server_name = {}, listening on {}, data in {}",
                config.server_name,
                config.listen,
                config.data_dir.display()
            );
            std::process::ExitCode::SUCCESS
        }
        Command::Serve => {
            init_logging(&config);
            let runtime = salon::runtime::build(&config.runtime).expect("tokio runtime");
            let result = runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind(config.listen)
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
                salon::run(config, listener, shutdown_signal()).await
            });
            match result {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("salon: {e:#}");
                    std::process::ExitCode::FAILURE
                }
            }
        }
        Command::Admin { command } => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            match runtime.block_on(admin(config, command)) {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("salon admin: {e:#}");
                    std::process::ExitCode::FAILURE
                }
            }
        }
    }
}

/// `[=====>     ] 120/800` on stderr, redrawn in place.
fn progress_bar(done: usize, total: usize) {
    use std::io::Write;
    const WIDTH: usize = 30;
    let filled = if total == 0 {
        WIDTH
    } else {
        done * WIDTH / total
    };
    let bar: String = (0..WIDTH)
        .map(|i| match i.cmp(&filled) {
            std::cmp::Ordering::Less => '=',
            std::cmp::Ordering::Equal => '>',
            std::cmp::Ordering::Greater => ' ',
        })
        .collect();
    let mut err = std::io::stderr();
    let _ = write!(err, "\r[{bar}] {done}/{total}");
    let _ = err.flush();
}

async fn admin(config: Config, command: AdminCommand) -> anyhow::Result<()> {
    let services = Services::build(config)?;
    match command {
        AdminCommand::CreateUser {
            name,
            password,
            admin,
            email,
        } => {
            let user_id =
                salon::service::users::new_local_user_id(&name, services.globals.server_name())
                    .map_err(|e| anyhow::anyhow!("invalid user name {name:?}: {e}"))?;
            if services.users.exists(&user_id)? {
                anyhow::bail!("{user_id} already exists");
            }
            let generated = password.is_none();
            let password = password.unwrap_or_else(|| salon::service::globals::random_string(20));
            services
                .users
                .create(&user_id, Some(&password), admin, false)
                .await?;
            if let Some(email) = email {
                services
                    .users
                    .set_email(&user_id, Some(email.trim().to_owned()))?;
            }
            println!(
                "created {user_id}{}",
                if admin { " (server admin)" } else { "" }
            );
            if generated {
                println!("password: {password}");
            }
        }
        AdminCommand::RegistrationToken { command } => match command {
            TokenCommand::Create {
                token,
                uses,
                valid_hours,
            } => {
                let expiry = valid_hours.map(|h| salon::service::users::now_ms() + h * 3_600_000);
                let t = services
                    .users
                    .create_registration_token(token, uses, expiry)?;
                println!("{}", t.token);
            }
            TokenCommand::List => {
                for t in services.users.registration_tokens()? {
                    let uses = t
                        .uses_allowed
                        .map(|u| u.to_string())
                        .unwrap_or_else(|| "unlimited".into());
                    println!(
                        "{}\tused {}/{}\t{}",
                        t.token,
                        t.completed,
                        uses,
                        if t.is_valid(salon::service::users::now_ms()) {
                            "valid"
                        } else {
                            "expired"
                        }
                    );
                }
            }
            TokenCommand::Delete { token } => {
                if !services.users.delete_registration_token(&token)? {
                    anyhow::bail!("no such token: {token}");
                }
                println!("deleted {token}");
            }
        },
        AdminCommand::Ldap {
            command: LdapCommand::Sync { dry_run },
        } => {
            let report = salon::service::ldap::sync(&services, dry_run, |done, total| {
                progress_bar(done, total);
            })
            .await?;
            eprintln!();
            println!(
                "{}{report}",
                if dry_run {
                    "dry run (nothing changed): "
                } else {
                    ""
                }
            );
            for (what, users) in [
                ("created", &report.created),
                ("renamed", &report.renamed),
                ("removed", &report.removed),
                ("unlocked", &report.unlocked),
            ] {
                for u in users {
                    println!("  {what}: {u}");
                }
            }
            for line in &report.groups {
                println!("  group {line}");
            }
        }
        AdminCommand::Appservice { command } => match command {
            AppserviceCommand::Register { file } => {
                let origin = file.display().to_string();
                let text = std::fs::read_to_string(&file)
                    .map_err(|e| anyhow::anyhow!("{origin}: cannot read: {e}"))?;
                let registration = salon::service::appservice::parse_registration(&text, &origin)?;
                services.appservices.store(&registration)?;
                services.ensure_appservice_users().await?;
                println!("registered appservice {}", registration.id);
            }
            AppserviceCommand::List => {
                for a in services.appservices.all() {
                    println!(
                        "{}\t{}\t{}\t{}",
                        a.id(),
                        a.sender,
                        a.registration.url.as_deref().unwrap_or("(no url)"),
                        a.origin
                    );
                }
            }
            AppserviceCommand::Unregister { id } => {
                if !services.appservices.remove(&id)? {
                    anyhow::bail!(
                        "no appservice {id:?} was registered with `salon admin appservice register`"
                    );
                }
                println!("unregistered appservice {id}");
            }
        },
    }
    services.db.flush()?;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutting down");
}
