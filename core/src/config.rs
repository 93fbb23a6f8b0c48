//! Config plumbing: the clap argument groups every service shares (each flag also reads
//! the env var named in SPEC §6), start-up validation with errors that name the variable,
//! and the env file written by `scripts/services.sh`.
//!
//! All env vars a binary reads are declared on its clap `Config`; `e2e/tests/compose.rs`
//! checks docker-compose.yml against them.

use std::path::{Path, PathBuf};

use clap::{CommandFactory, Parser};

/// Env var that points at an env file to load before parsing (values already in the
/// environment win).
pub const ENV_FILE_VAR: &str = "CHATIFY_ENV_FILE";

/// A config value that parsed but is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {variable}: {reason}")]
pub struct ConfigError {
    /// The env var (or flag, if it has no env var) at fault.
    pub variable: &'static str,
    pub reason: String,
}

impl ConfigError {
    pub fn new(variable: &'static str, reason: impl Into<String>) -> Self {
        Self {
            variable,
            reason: reason.into(),
        }
    }
}

/// Loads `$CHATIFY_ENV_FILE` if set; the process environment wins over the file.
pub fn load_env_file() -> Result<Option<PathBuf>, ConfigError> {
    let Ok(path) = std::env::var(ENV_FILE_VAR) else {
        return Ok(None);
    };
    let path = PathBuf::from(path);
    dotenvy::from_path(&path)
        .map_err(|error| ConfigError::new(ENV_FILE_VAR, format!("{}: {error}", path.display())))?;
    Ok(Some(path))
}

/// Parses `C` from flags and env vars. On a bad value the error names the env var as well
/// as the flag, so an operator who only set env vars knows which one to fix.
pub fn parse<C: Parser>() -> Result<C, clap::Error> {
    parse_from::<C, _, _>(std::env::args_os())
}

/// [`parse`] from explicit arguments (tests).
pub fn parse_from<C, I, T>(args: I) -> Result<C, clap::Error>
where
    C: Parser,
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let mut command = C::command();
    let matches = command.try_get_matches_from_mut(args);
    let result = matches.and_then(|mut matches| C::from_arg_matches_mut(&mut matches));
    result.map_err(|error| name_env_var(&command, error))
}

fn name_env_var(command: &clap::Command, error: clap::Error) -> clap::Error {
    use clap::error::{ContextKind, ContextValue};
    let Some(ContextValue::String(arg)) = error.get(ContextKind::InvalidArg) else {
        return error;
    };
    let env = command.get_arguments().find_map(|candidate| {
        let long = candidate.get_long()?;
        let matches = arg.starts_with(&format!("--{long} ")) || arg == &format!("--{long}");
        matches.then(|| candidate.get_env())?
    });
    match env {
        Some(env) => {
            let message = format!(
                "{} (env {})",
                error.to_string().trim_end(),
                env.to_string_lossy()
            );
            command.clone().error(error.kind(), message)
        }
        None => error,
    }
}

/// Every env var a clap `Config` reads (for docs and the compose check).
pub fn env_vars_of<C: CommandFactory>() -> Vec<String> {
    let mut vars = Vec::new();
    collect_env_vars(&C::command(), &mut vars);
    vars.sort();
    vars.dedup();
    vars
}

fn collect_env_vars(command: &clap::Command, vars: &mut Vec<String>) {
    vars.extend(
        command
            .get_arguments()
            .filter_map(|arg| arg.get_env())
            .map(|env| env.to_string_lossy().into_owned()),
    );
    for sub in command.get_subcommands() {
        collect_env_vars(sub, vars);
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Logging flags shared by every binary.
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Log format: text for people, json for log pipelines.
    #[arg(long, env = "CHATIFY_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// tracing filter directives, e.g. `info,storage_writer=debug`.
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    pub log_filter: String,
}

/// Kafka connection and topic naming.
#[derive(Debug, Clone, clap::Args)]
pub struct KafkaArgs {
    /// Comma-separated host:port list of Kafka brokers.
    #[arg(
        long,
        env = "KAFKA_BOOTSTRAP_SERVERS",
        default_value = "127.0.0.1:9092"
    )]
    pub kafka_bootstrap_servers: String,
    /// Prefix of every topic name (`{prefix}.upstream`, ...).
    #[arg(long, env = "CHATIFY_TOPIC_PREFIX", default_value = crate::topics::DEFAULT_PREFIX)]
    pub topic_prefix: String,
    /// librdkafka debug contexts for every Kafka client of the process (e.g.
    /// `cgrp,eos,broker`); logged under the `librdkafka` tracing target.
    #[arg(long, env = "CHATIFY_KAFKA_DEBUG")]
    pub kafka_debug: Option<String>,
}

impl KafkaArgs {
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_bootstrap_servers(&self.kafka_bootstrap_servers)?;
        let prefix_ok = !self.topic_prefix.is_empty()
            && self.topic_prefix.len() <= 100
            && self
                .topic_prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !prefix_ok {
            return Err(ConfigError::new(
                "CHATIFY_TOPIC_PREFIX",
                "must be 1..=100 characters of [A-Za-z0-9._-]",
            ));
        }
        Ok(())
    }

    pub fn topics(&self) -> crate::Topics {
        crate::Topics::new(self.topic_prefix.clone())
    }

    /// A client config with the brokers, the client id and the debug contexts set.
    pub fn client_config(&self, client_id: &str) -> rdkafka::ClientConfig {
        client_config(
            &self.kafka_bootstrap_servers,
            client_id,
            self.kafka_debug.as_deref(),
        )
    }
}

/// A Kafka client config: brokers, client id, and librdkafka debug contexts when given.
pub fn client_config(
    bootstrap_servers: &str,
    client_id: &str,
    debug: Option<&str>,
) -> rdkafka::ClientConfig {
    let mut config = rdkafka::ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap_servers)
        .set("client.id", client_id);
    if let Some(debug) = debug.filter(|debug| !debug.is_empty()) {
        config.set("debug", debug);
    }
    config
}

fn validate_bootstrap_servers(servers: &str) -> Result<(), ConfigError> {
    const VAR: &str = "KAFKA_BOOTSTRAP_SERVERS";
    if servers.trim().is_empty() {
        return Err(ConfigError::new(VAR, "is empty"));
    }
    for server in servers.split(',') {
        let server = server.trim();
        let port = server
            .rsplit_once(':')
            .filter(|(host, _)| !host.is_empty())
            .map(|(_, port)| port);
        match port.map(str::parse::<u16>) {
            Some(Ok(port)) if port > 0 => {}
            _ => {
                return Err(ConfigError::new(
                    VAR,
                    format!("{server:?} is not host:port"),
                ));
            }
        }
    }
    Ok(())
}

/// Redis connection.
#[derive(Debug, Clone, clap::Args)]
pub struct RedisArgs {
    /// Redis URL, e.g. redis://127.0.0.1:6379/0.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
}

impl RedisArgs {
    pub fn validate(&self) -> Result<(), ConfigError> {
        redis::Client::open(self.redis_url.as_str())
            .map(drop)
            .map_err(|error| ConfigError::new("REDIS_URL", error.to_string()))
    }
}

/// PostgreSQL connection.
#[derive(Debug, Clone, clap::Args)]
pub struct PostgresArgs {
    /// PostgreSQL URL, e.g. postgres://postgres@127.0.0.1:5432/chatify.
    #[arg(
        long,
        env = "POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/chatify"
    )]
    pub postgres_url: String,
    /// Most connections in the pool.
    #[arg(long, env = "POSTGRES_CONNECTIONS_MAX", default_value_t = 16)]
    pub postgres_connections_max: u32,
}

impl PostgresArgs {
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_url_scheme(
            "POSTGRES_URL",
            &self.postgres_url,
            &["postgres", "postgresql"],
        )?;
        if self.postgres_connections_max == 0 {
            return Err(ConfigError::new(
                "POSTGRES_CONNECTIONS_MAX",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

/// MongoDB connection.
#[derive(Debug, Clone, clap::Args)]
pub struct MongoArgs {
    /// MongoDB URL, e.g. mongodb://127.0.0.1:27017.
    #[arg(long, env = "MONGO_URL", default_value = "mongodb://127.0.0.1:27017")]
    pub mongo_url: String,
    /// Database holding the realtime message store.
    #[arg(long, env = "MONGO_DATABASE", default_value = "chatify")]
    pub mongo_database: String,
}

impl MongoArgs {
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_url_scheme("MONGO_URL", &self.mongo_url, &["mongodb", "mongodb+srv"])?;
        if self.mongo_database.is_empty() || self.mongo_database.contains(['/', '.', ' ', '$']) {
            return Err(ConfigError::new(
                "MONGO_DATABASE",
                "must be a non-empty name without '/', '.', ' ' or '$'",
            ));
        }
        Ok(())
    }
}

fn validate_url_scheme(
    variable: &'static str,
    url: &str,
    schemes: &[&str],
) -> Result<(), ConfigError> {
    let scheme = url.split_once("://").map(|(scheme, _)| scheme);
    match scheme {
        Some(scheme) if schemes.contains(&scheme) => Ok(()),
        _ => Err(ConfigError::new(
            variable,
            format!("{url:?} must start with {}://", schemes.join(":// or ")),
        )),
    }
}

/// Checks that a node id can be part of a topic name and a route value.
pub fn validate_node_id(variable: &'static str, node_id: &str) -> Result<(), ConfigError> {
    let ok = !node_id.is_empty()
        && node_id.len() <= 64
        && node_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::new(
            variable,
            "must be 1..=64 characters of [A-Za-z0-9_-]",
        ))
    }
}

/// The repository's `.local/chatify.env`, as written by `scripts/services.sh up`.
pub fn repo_env_file(manifest_dir: &Path) -> Option<PathBuf> {
    manifest_dir
        .ancestors()
        .map(|dir| dir.join(".local/chatify.env"))
        .find(|path| path.is_file())
}

/// Loads the repository's `.local/chatify.env` (tests and tools run from inside the
/// repository); values already in the environment win.
pub fn load_repo_env(manifest_dir: &Path) -> Result<PathBuf, ConfigError> {
    let path = repo_env_file(manifest_dir).ok_or_else(|| {
        ConfigError::new(
            ENV_FILE_VAR,
            "no .local/chatify.env above this crate: run `scripts/services.sh up` first",
        )
    })?;
    dotenvy::from_path(&path)
        .map_err(|error| ConfigError::new(ENV_FILE_VAR, format!("{}: {error}", path.display())))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Parser)]
    struct TestConfig {
        #[command(flatten)]
        kafka: KafkaArgs,
        #[arg(long, env = "TEST_CHATIFY_PORT", default_value_t = 1)]
        port: u16,
    }

    #[test]
    fn bad_values_name_the_env_var() {
        let error =
            parse_from::<TestConfig, _, _>(["bin", "--port", "seventy"]).expect_err("not a number");
        assert!(error.to_string().contains("TEST_CHATIFY_PORT"), "{error}");
    }

    #[test]
    fn bootstrap_servers_must_be_host_port() {
        for bad in ["", "kafka", "kafka:", ":9092", "a:1,b", "a:0", "a:99999"] {
            let error = validate_bootstrap_servers(bad).expect_err(bad);
            assert_eq!(error.variable, "KAFKA_BOOTSTRAP_SERVERS");
        }
        validate_bootstrap_servers("127.0.0.1:9092, kafka-2:9092").expect("valid list");
    }

    #[test]
    fn urls_need_their_scheme() {
        let postgres = PostgresArgs {
            postgres_url: "mysql://x".into(),
            postgres_connections_max: 1,
        };
        assert_eq!(
            postgres.validate().expect_err("scheme").variable,
            "POSTGRES_URL"
        );
        let mongo = MongoArgs {
            mongo_url: "mongodb://127.0.0.1:27017".into(),
            mongo_database: "a.b".into(),
        };
        assert_eq!(
            mongo.validate().expect_err("name").variable,
            "MONGO_DATABASE"
        );
        let redis = RedisArgs {
            redis_url: "http://nope".into(),
        };
        assert_eq!(redis.validate().expect_err("scheme").variable, "REDIS_URL");
    }

    #[test]
    fn env_vars_are_listed() {
        let vars = env_vars_of::<TestConfig>();
        assert_eq!(
            vars,
            [
                "CHATIFY_KAFKA_DEBUG",
                "CHATIFY_TOPIC_PREFIX",
                "KAFKA_BOOTSTRAP_SERVERS",
                "TEST_CHATIFY_PORT"
            ]
        );
    }
}
