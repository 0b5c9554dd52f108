"""Run `mlflow server` for a test process and take it down when that process goes away.

    serve.py --port P --dir D [--basic-auth PASSWORD] [--tls CERT KEY] [--webhooks] [mlflow server args...]

The server runs in its own process group with a sqlite backend (D/mlflow.db) and served
artifacts (D/artifacts); --webhooks lets it deliver registry webhooks to loopback over http.
This wrapper reads its stdin: when the test process exits (or
crashes) the pipe closes, and the whole group is stopped, so no server outlives its tests.
"""
import argparse
import base64
import os
import signal
import subprocess
import sys


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", required=True)
    p.add_argument("--dir", required=True)
    p.add_argument("--basic-auth", metavar="ADMIN_PASSWORD")
    p.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"))
    p.add_argument("--webhooks", action="store_true")
    args, rest = p.parse_known_args()

    env = dict(os.environ)
    # No usage telemetry from the test server (see log_model.py).
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    env.setdefault("DO_NOT_TRACK", "true")
    cmd = [
        os.path.join(os.path.dirname(sys.executable), "mlflow"), "server",
        "--host", "127.0.0.1", "--port", args.port, "--workers", "2",
        "--backend-store-uri", f"sqlite:///{args.dir}/mlflow.db",
        "--artifacts-destination", f"{args.dir}/artifacts", "--serve-artifacts",
    ]
    if args.basic_auth:
        ini = os.path.join(args.dir, "basic_auth.ini")
        with open(ini, "w") as f:
            f.write("[mlflow]\ndefault_permission = READ\n"
                    f"database_uri = sqlite:///{args.dir}/basic_auth.db\n"
                    "admin_username = admin\n"
                    "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
        env["MLFLOW_AUTH_CONFIG_PATH"] = ini
        env["MLFLOW_AUTH_ADMIN_PASSWORD"] = args.basic_auth
        env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = os.urandom(16).hex()  # CSRF, required by the auth app
        cmd += ["--app-name", "basic-auth"]
    if args.webhooks:
        # MLflow refuses private addresses and plain http for webhook URLs by default, and
        # stores webhook secrets encrypted with this Fernet key.
        env["MLFLOW_WEBHOOK_ALLOWED_SCHEMES"] = "http,https"
        env["MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS"] = "true"
        env["MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY"] = base64.urlsafe_b64encode(os.urandom(32)).decode()
        # Each worker caches the webhooks of an event for 60 s by default: an alias set
        # before the test registered its webhook would hide the next one for a minute.
        env["MLFLOW_WEBHOOK_CACHE_TTL"] = "1"
    if args.tls:
        cmd += ["--uvicorn-opts", f"--ssl-certfile {args.tls[0]} --ssl-keyfile {args.tls[1]}"]
    cmd += rest
    log = open(os.path.join(args.dir, "server.log"), "ab")
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        sys.stdin.read()  # until the test process closes the pipe
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=10)
        except Exception:
            try:
                os.killpg(server.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


if __name__ == "__main__":
    main()
