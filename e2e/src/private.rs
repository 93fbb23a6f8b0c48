//! Backing services private to one test, for fault injection: a tansu broker, a Redis, a
//! PostgreSQL cluster and a SecantusDB (MongoDB protocol) server of its own, each on a free
//! loopback port with its data under a temporary directory, so a test can kill, stop,
//! restart or wipe them without disturbing the shared services other tests use. Each is
//! stopped (and its directory removed) when dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{free_local_addr, unique_name};

/// How long a private service may take to accept connections.
const START_WAIT: Duration = Duration::from_secs(90);

/// A child process with the command that starts it again.
#[derive(Debug)]
struct Restartable {
    name: &'static str,
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    cwd: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Restartable {
    fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open private service log");
        let stderr = log.try_clone().expect("clone log handle");
        let child = Command::new(&self.program)
            .current_dir(&self.cwd)
            .args(&self.args)
            .envs(self.env.iter().map(|(key, value)| (key, value)))
            .env_remove("ADVERTISED_LISTENER_URL")
            .env_remove("SCHEMA_REGISTRY")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|error| panic!("start {} ({:?}): {error}", self.name, self.program));
        self.child = Some(child);
    }

    /// kill -9 and reap.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Restartable {
    fn drop(&mut self) {
        self.kill();
    }
}

fn private_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(unique_name(name));
    std::fs::create_dir_all(&dir).expect("create private service dir");
    dir
}

/// A failing test keeps the service's directory (its log) for the post-mortem.
fn remove_unless_panicking(dir: &Path) {
    if std::thread::panicking() {
        eprintln!("kept {} for the post-mortem", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Waits until `addr` accepts TCP connections, panicking with the log after [`START_WAIT`].
async fn wait_listening(name: &str, addr: SocketAddr, log: &Path) {
    let deadline = Instant::now() + START_WAIT;
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "{name} did not listen on {addr}; log {}:\n{}",
            log.display(),
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A tansu broker with SQLite storage (it keeps its topics, records and committed offsets
/// across a restart), listening and advertising on its own port.
#[derive(Debug)]
pub struct PrivateBroker {
    process: Restartable,
    pub addr: SocketAddr,
    dir: PathBuf,
}

impl PrivateBroker {
    pub async fn start() -> Self {
        let dir = private_dir("tansu");
        let addr = free_local_addr();
        let program = std::env::var("HOME")
            .map(|home| PathBuf::from(home).join(".cargo/bin/tansu"))
            .ok()
            .filter(|path| path.is_file())
            .unwrap_or_else(|| "tansu".into());
        let url = format!("tcp://{addr}");
        let mut process = Restartable {
            name: "tansu",
            program,
            args: [
                "broker",
                "--cluster-id",
                "private",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
                "--storage-engine",
                "sqlite://tansu.db",
            ]
            .map(str::to_owned)
            .to_vec(),
            env: vec![("RUST_LOG".into(), "warn".into())],
            cwd: dir.clone(),
            log: dir.join("tansu.log"),
            child: None,
        };
        process.start();
        wait_listening("tansu", addr, &process.log).await;
        Self { process, addr, dir }
    }

    pub fn bootstrap(&self) -> String {
        self.addr.to_string()
    }

    /// kill -9 (its SQLite file stays).
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Starts it again on the same port with the same data.
    pub async fn restart(&mut self) {
        self.process.start();
        wait_listening("tansu", self.addr, &self.process.log).await;
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        self.process.kill();
        remove_unless_panicking(&self.dir);
    }
}

/// A Redis without persistence: a restart comes back empty.
#[derive(Debug)]
pub struct PrivateRedis {
    process: Restartable,
    pub addr: SocketAddr,
    dir: PathBuf,
}

impl PrivateRedis {
    pub async fn start() -> Self {
        let dir = private_dir("redis");
        let addr = free_local_addr();
        let mut process = Restartable {
            name: "redis-server",
            program: "redis-server".into(),
            args: vec![
                "--bind".into(),
                "127.0.0.1".into(),
                "--port".into(),
                addr.port().to_string(),
                "--save".into(),
                String::new(),
                "--appendonly".into(),
                "no".into(),
                "--daemonize".into(),
                "no".into(),
                "--dir".into(),
                dir.display().to_string(),
            ],
            env: Vec::new(),
            cwd: dir.clone(),
            log: dir.join("redis.log"),
            child: None,
        };
        process.start();
        wait_listening("redis", addr, &process.log).await;
        Self { process, addr, dir }
    }

    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// kill -9 and start again: every key is gone.
    pub async fn restart_empty(&mut self) {
        self.process.kill();
        self.process.start();
        wait_listening("redis", self.addr, &self.process.log).await;
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.process.kill();
        remove_unless_panicking(&self.dir);
    }
}

/// A PostgreSQL cluster of its own (`initdb` + `pg_ctl` of the newest server installed
/// under `/usr/lib/postgresql`), trust auth on loopback TCP only, run as the `postgres` OS
/// user when the test runs as root (the server refuses root). `fsync` is off: the test
/// stops it cleanly, it never crashes the machine.
#[derive(Debug)]
pub struct PrivatePostgres {
    bin: PathBuf,
    data: PathBuf,
    dir: PathBuf,
    pub addr: SocketAddr,
    running: bool,
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
        .unwrap_or(false)
}

impl PrivatePostgres {
    pub async fn start() -> Self {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("postgresql server installed under /usr/lib/postgresql")
            .filter_map(Result::ok)
            .map(|entry| entry.path().join("bin"))
            .filter(|bin| bin.join("initdb").is_file())
            .max_by_key(|bin| {
                bin.parent()
                    .and_then(Path::file_name)
                    .and_then(|version| version.to_str())
                    .and_then(|version| version.parse::<u32>().ok())
                    .unwrap_or(0)
            })
            .expect("an initdb under /usr/lib/postgresql/*/bin");
        let dir = private_dir("postgres");
        let data = dir.join("data");
        let addr = free_local_addr();
        let postgres = Self {
            bin,
            data,
            dir,
            addr,
            running: false,
        };
        if running_as_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres:"])
                .arg(&postgres.dir)
                .status()
                .expect("chown");
            assert!(status.success(), "chown the postgres dir");
        }
        let initdb = postgres
            .as_postgres_user(&postgres.bin.join("initdb"))
            .arg("-D")
            .arg(&postgres.data)
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            ])
            .output()
            .expect("run initdb");
        assert!(
            initdb.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&initdb.stderr)
        );
        let settings = format!(
            "\nlisten_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = ''\n\
             fsync = off\nmax_connections = 200\n",
            addr.port()
        );
        let conf = postgres.data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).expect("read postgresql.conf");
        text.push_str(&settings);
        std::fs::write(&conf, text).expect("write postgresql.conf");
        let mut postgres = postgres;
        postgres.start_server().await;
        postgres
    }

    fn as_postgres_user(&self, program: &Path) -> Command {
        let mut command = if running_as_root() {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(program);
            command
        } else {
            Command::new(program)
        };
        command.current_dir("/");
        command
    }

    fn pg_ctl(&self, args: &[&str]) -> Command {
        let mut command = self.as_postgres_user(&self.bin.join("pg_ctl"));
        command
            .arg("-D")
            .arg(&self.data)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        command
    }

    /// `pg_ctl start -w` (in a blocking task).
    pub async fn start_server(&mut self) {
        let log = self.dir.join("postgres.log");
        let mut command = self.pg_ctl(&["-w", "-t", "90", "start"]);
        command.arg("-l").arg(&log);
        let output = tokio::task::spawn_blocking(move || command.output())
            .await
            .expect("pg_ctl task")
            .expect("run pg_ctl start");
        assert!(
            output.status.success(),
            "pg_ctl start: {}; log:\n{}",
            String::from_utf8_lossy(&output.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        self.running = true;
    }

    /// `pg_ctl stop -m fast`: sessions are cut, new connections refused until
    /// [`Self::start_server`].
    pub async fn stop_server(&mut self) {
        let mut command = self.pg_ctl(&["-m", "fast", "-w", "stop"]);
        let output = tokio::task::spawn_blocking(move || command.output())
            .await
            .expect("pg_ctl task")
            .expect("run pg_ctl stop");
        assert!(
            output.status.success(),
            "pg_ctl stop: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        self.running = false;
    }

    /// URL of `database` on this cluster.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@{}/{database}", self.addr)
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        if self.running {
            let _ = self.pg_ctl(&["-m", "immediate", "-w", "stop"]).status();
        }
        remove_unless_panicking(&self.dir);
    }
}

/// A SecantusDB server (MongoDB wire protocol) from the cached venv that
/// `scripts/services.sh` installs.
#[derive(Debug)]
pub struct PrivateMongo {
    process: Restartable,
    pub addr: SocketAddr,
    dir: PathBuf,
}

impl PrivateMongo {
    pub async fn start() -> Self {
        let dir = private_dir("secantus");
        let addr = free_local_addr();
        let cache = std::env::var("CHATIFY_CACHE_DIR")
            .map(PathBuf::from)
            .or_else(|_| {
                std::env::var("HOME").map(|home| PathBuf::from(home).join(".cache/chatify"))
            })
            .expect("HOME or CHATIFY_CACHE_DIR");
        let program = cache.join("venv/bin/secantusd-py");
        assert!(
            program.is_file(),
            "{} is missing: run scripts/services.sh up",
            program.display()
        );
        let mut process = Restartable {
            name: "secantusd-py",
            program,
            args: vec![
                "--host".into(),
                "127.0.0.1".into(),
                "--port".into(),
                addr.port().to_string(),
                "--storage-path".into(),
                dir.join("data").display().to_string(),
                "--log-level".into(),
                "WARNING".into(),
            ],
            env: Vec::new(),
            cwd: dir.clone(),
            log: dir.join("secantus.log"),
            child: None,
        };
        process.start();
        wait_listening("secantusd-py", addr, &process.log).await;
        Self { process, addr, dir }
    }

    pub fn url(&self) -> String {
        format!("mongodb://{}", self.addr)
    }
}

impl Drop for PrivateMongo {
    fn drop(&mut self) {
        self.process.kill();
        remove_unless_panicking(&self.dir);
    }
}
