//! Credentials and TLS against a real `mlflow server --app-name basic-auth` behind uvicorn
//! TLS, with a throwaway CA (tests/mlflow/make_certs.py): basic auth from the environment,
//! a custom CA bundle, verification always on, refused credentials reported, not retried.

mod common;

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::mlflow::{digests, Mlflow};
use common::{python, repo};
use edgeflow::cache::Store;
use edgeflow::config::{Config, Target};
use edgeflow::fetch::Progress;
use edgeflow::pipeline::{PullError, Puller};
use edgeflow::registry::{Auth, Client, RegistryError};

const ADMIN_PASSWORD: &str = "edgeflow-test-admin-1234";

struct TlsServer {
    mlflow: Mlflow,
    certs: tempfile::TempDir,
}

impl TlsServer {
    fn cert(&self, name: &str) -> PathBuf {
        self.certs.path().join(name)
    }
}

fn server() -> &'static TlsServer {
    static SERVER: OnceLock<TlsServer> = OnceLock::new();
    SERVER.get_or_init(|| {
        let certs = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new(python()).arg(repo().join("tests/mlflow/make_certs.py")).arg(certs.path()).status().unwrap();
        assert!(ok.success(), "make_certs.py failed");
        let (cert, key) = (certs.path().join("server.pem"), certs.path().join("server.key"));
        let mlflow = Mlflow::start(&["--basic-auth", ADMIN_PASSWORD, "--tls", cert.to_str().unwrap(), key.to_str().unwrap()]);
        TlsServer { mlflow, certs }
    })
}

fn log_model(name: &str) {
    let s = server();
    let ca = s.cert("ca.pem");
    s.mlflow.log_model_env(
        name,
        &common::fixture_model("phi3-tiny-gqa"),
        "pyfunc",
        None,
        Some("champion"),
        &[("MLFLOW_TRACKING_USERNAME", "admin"), ("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD), ("MLFLOW_TRACKING_SERVER_CERT_PATH", ca.to_str().unwrap())],
    );
}

fn puller(cache: &std::path::Path, ca_bundle: Option<PathBuf>, auth: Auth) -> Result<Puller, RegistryError> {
    let c: Config = toml::from_str("[registry]\nattempts = 4\nbackoff_initial = \"50ms\"\nbackoff_max = \"200ms\"\n").unwrap();
    let mut reg = c.registry.resolve().unwrap();
    reg.ca_bundle = ca_bundle;
    let mut cs = c.cache.resolve().unwrap();
    cs.dir = cache.to_path_buf();
    let client = Client::new(&server().mlflow.url, &reg, auth)?;
    Ok(Puller::new(client, Store::open(&cs).unwrap(), 4, None, common::load_options()))
}

async fn pull(p: &Puller, name: &str) -> Result<edgeflow::pipeline::PullOutcome, PullError> {
    p.pull(name, &Target::Alias("champion".into()), std::sync::Arc::new(|_| {}), std::sync::Arc::new(Progress::default()), false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_over_tls_with_the_ca_bundle_pulls_and_wrong_trust_or_credentials_fail_fast() {
    let name = "tls-basic";
    log_model(name);
    let s = server();
    assert!(s.mlflow.url.starts_with("https://127.0.0.1:"));
    let basic = |password: &str| Auth::Basic { username: "admin".into(), password: password.into() };

    let cache = tempfile::tempdir().unwrap();
    let p = puller(cache.path(), Some(s.cert("ca.pem")), basic(ADMIN_PASSWORD)).unwrap();
    let o = pull(&p, name).await.unwrap_or_else(|e| panic!("{}", edgeflow::util::chain(&e)));
    assert_eq!(digests(&o.dir), digests(&common::fixture_model("phi3-tiny-gqa")));
    drop(p);

    // A wrong password: 401, reported as refused credentials, not retried.
    let cache = tempfile::tempdir().unwrap();
    let p = puller(cache.path(), Some(s.cert("ca.pem")), basic("not-the-password")).unwrap();
    let started = Instant::now();
    let e = pull(&p, name).await.unwrap_err();
    assert!(matches!(&e, PullError::Resolve { source: RegistryError::Unauthorized { status: 401, .. }, .. }), "{}", edgeflow::util::chain(&e));
    assert!(edgeflow::util::chain(&e).contains("MLFLOW_TRACKING_USERNAME"));
    drop(p);
    // No credentials at all: refused the same way.
    let p = puller(cache.path(), Some(s.cert("ca.pem")), Auth::None);
    let e = pull(&p.unwrap(), name).await.unwrap_err();
    assert!(matches!(&e, PullError::Resolve { source: RegistryError::Unauthorized { .. }, .. }), "{}", edgeflow::util::chain(&e));

    // The system store does not know the test CA, and an unrelated CA is no better:
    // verification fails, and is not retried.
    for bundle in [None, Some(s.cert("other-ca.pem"))] {
        let cache = tempfile::tempdir().unwrap();
        let p = puller(cache.path(), bundle.clone(), basic(ADMIN_PASSWORD)).unwrap();
        let e = pull(&p, name).await.unwrap_err();
        let text = edgeflow::util::chain(&e);
        assert!(matches!(&e, PullError::Resolve { source, .. } if !source.is_retryable()), "{bundle:?}: {text}");
        assert!(text.contains("certificate") || text.contains("UnknownIssuer"), "{bundle:?}: {text}");
        assert!(edgeflow::cache::active_dir(cache.path(), name).is_none());
    }
    assert!(started.elapsed() < Duration::from_secs(20), "refusals must not sit in retries: {:?}", started.elapsed());

    // A bundle file that is not PEM is a setup error.
    let junk = cache.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate").unwrap();
    let e = puller(cache.path(), Some(junk), Auth::None).err().expect("junk bundle refused");
    assert!(matches!(e, RegistryError::Setup { .. }), "{e}");
}

#[test]
fn the_cli_takes_credentials_and_the_ca_from_the_environment() {
    let name = "tls-cli";
    log_model(name);
    let s = server();
    let cache = tempfile::tempdir().unwrap();
    let run = |password: &str| {
        common::edgeflow()
            .env("MLFLOW_TRACKING_URI", &s.mlflow.url)
            .env("MLFLOW_TRACKING_USERNAME", "admin")
            .env("MLFLOW_TRACKING_PASSWORD", password)
            .env("MLFLOW_TRACKING_SERVER_CERT_PATH", s.cert("ca.pem"))
            .args(["pull", "--model", name, "--alias", "champion", "--cache-dir", cache.path().to_str().unwrap()])
            .output()
            .unwrap()
    };
    let out = run("wrong-password-123");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("refused the credentials (401"), "{stderr}");
    let out = run(ADMIN_PASSWORD);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert_eq!(digests(&dir), digests(&common::fixture_model("phi3-tiny-gqa")));
}
