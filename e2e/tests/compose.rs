//! docker-compose.yml cannot run on machines without Docker, so check what can be checked:
//! every env var set on a Chatify service is one its binary reads (a typo there would be
//! silently ignored in production), and the services point at each other consistently.

use std::collections::BTreeMap;

use chatify_core::config::env_vars_of;

#[derive(Debug, serde::Deserialize)]
struct Compose {
    services: BTreeMap<String, Service>,
}

#[derive(Debug, serde::Deserialize)]
struct Service {
    #[serde(default)]
    command: Option<Vec<String>>,
    #[serde(default)]
    environment: BTreeMap<String, serde_yaml::Value>,
    #[serde(default)]
    healthcheck: Option<serde_yaml::Value>,
}

fn compose() -> Compose {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docker-compose.yml");
    let text = std::fs::read_to_string(path).expect("docker-compose.yml is readable");
    serde_yaml::from_str(&text).expect("docker-compose.yml parses")
}

/// The env vars each of our binaries reads, by binary name.
fn binaries() -> BTreeMap<&'static str, Vec<String>> {
    BTreeMap::from([
        (
            "gateway-uring",
            env_vars_of::<gateway_uring::config::Config>(),
        ),
        (
            "storage-writer",
            env_vars_of::<storage_writer::config::Config>(),
        ),
        (
            "storage-reader",
            env_vars_of::<storage_reader::config::Config>(),
        ),
        (
            "chatify-migrate",
            env_vars_of::<chatify_migrations::Config>(),
        ),
    ])
}

#[test]
fn every_env_var_set_on_a_chatify_service_is_read_by_its_binary() {
    let compose = compose();
    let binaries = binaries();
    let mut seen = Vec::new();
    for (name, service) in &compose.services {
        let Some(binary) = service
            .command
            .as_ref()
            .and_then(|command| command.first())
            .filter(|program| binaries.contains_key(program.as_str()))
        else {
            continue;
        };
        seen.push(binary.clone());
        let known = &binaries[binary.as_str()];
        for variable in service.environment.keys() {
            assert!(
                known.contains(variable),
                "service {name} sets {variable}, which {binary} does not read (it reads {known:?})"
            );
        }
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            "chatify-migrate",
            "gateway-uring",
            "storage-reader",
            "storage-writer"
        ],
        "each binary runs as exactly one compose service"
    );
}

#[test]
fn backing_services_and_chatify_services_have_healthchecks() {
    let compose = compose();
    for name in [
        "kafka",
        "redis",
        "mongo",
        "timescaledb",
        "gateway",
        "storage-writer",
        "storage-reader",
    ] {
        let service = compose
            .services
            .get(name)
            .unwrap_or_else(|| panic!("compose has no service {name}"));
        assert!(service.healthcheck.is_some(), "{name} has no healthcheck");
    }
}

#[test]
fn storage_services_share_their_stores() {
    let compose = compose();
    let env = |service: &str, variable: &str| {
        compose.services[service].environment[variable]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("{service} {variable} is not a string"))
    };
    for variable in [
        "POSTGRES_URL",
        "REDIS_URL",
        "MONGO_URL",
        "KAFKA_BOOTSTRAP_SERVERS",
    ] {
        assert_eq!(
            env("storage-writer", variable),
            env("storage-reader", variable),
            "writer and reader disagree on {variable}"
        );
    }
    assert_eq!(
        env("migrate", "POSTGRES_URL"),
        env("storage-writer", "POSTGRES_URL")
    );
    assert_eq!(
        env("gateway", "KAFKA_BOOTSTRAP_SERVERS"),
        env("storage-writer", "KAFKA_BOOTSTRAP_SERVERS")
    );
}
