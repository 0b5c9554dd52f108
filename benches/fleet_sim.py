#!/usr/bin/env python3
"""A simulated fleet against one real Mosquitto and one real MLflow server (issue 17).

`edgeflow fleet simulate` runs --devices devices in one process: each has the real registry
poller, cache (sled + blobs) and fleet link, and a stub instead of the engine. This script
starts a private Mosquitto (with $SYS counters every second) and an MLflow server (SQLite,
served artifacts, webhooks on), registers a small ONNX GenAI folder (version 1 at
@production), and measures, in one run:

1. enrolment: the devices start over --ramp and pull version 1;
2. `edgeflow fleet console devices --json`: time to list the whole fleet (3 runs);
3. `send sync --group all`: time until each device acknowledged (p50/p99), with a spread
   of --spread and without one (a storm: every device polls at once);
4. a push rollout: the webhook bridge runs, version 2 is registered and @production moved
   to it; time until every device serves it, registry requests and broker messages meanwhile;
5. a staged rollout back to version 1 with `console rollout --step 25%`, then `unpin`;
6. steady state for --steady seconds (default: one poll interval, so every device polls once
   in it) with one dashboard subscribed to every health report and event: registry
   requests/s, broker messages/s and bytes per minute per device, memory per device.
   Syncs and pins leave the devices' poll schedules alone.

The targets of issue 17 are the anchor: ratios printed are measured / target.

    python3 benches/fleet_sim.py --devices 1000 [--poll-interval 1h] [--steady SECONDS] [--binary target/release/edgeflow]

Results: .bench/fleet_sim.json. Needs `make system venv` (mosquitto, the test venv's mlflow).
"""
import argparse
import json
import os
import pathlib
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent
PY = ROOT / ".venv/test/bin/python"
MODEL = "sim-model"
PREFIX = "edgeflow"

TARGET_REQ_PER_S_PER_1000 = 0.5
TARGET_BYTES_PER_MIN_PER_DEVICE = 1024
TARGET_ACK_S = 30.0


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return True
        except OSError:
            time.sleep(0.2)
    return False


def parse_duration(text):
    units = {"s": 1, "m": 60, "h": 3600}
    return float(text[:-1]) * units[text[-1]]


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_model(d, version):
    """A small ONNX GenAI folder: the layout the devices check, 256 KiB of graph bytes."""
    d.mkdir(parents=True)
    (d / "genai_config.json").write_text(json.dumps({"model": {"type": "phi3", "decoder": {"filename": "model.onnx"}, "context_length": 128}}))
    (d / "model.onnx").write_bytes(os.urandom(256 * 1024))
    (d / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {}, "merges": []}, "sim_version": version}))
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    return d


class Stats:
    """The simulator's statistics lines, as they arrive."""

    def __init__(self, proc):
        self.lines = []
        self.lock = threading.Lock()
        threading.Thread(target=self._read, args=(proc,), daemon=True).start()

    def _read(self, proc):
        for line in proc.stdout:
            try:
                v = json.loads(line)
            except ValueError:
                continue
            v["wall"] = time.time()
            with self.lock:
                self.lines.append(v)

    def last(self):
        with self.lock:
            return dict(self.lines[-1]) if self.lines else None

    def wait(self, pred, timeout, what):
        end = time.time() + timeout
        while time.time() < end:
            s = self.last()
            if s and pred(s):
                return s
            time.sleep(0.5)
        raise SystemExit(f"timed out waiting for {what}; last stats: {self.last()}")

    def between(self, t0, t1):
        with self.lock:
            return [s for s in self.lines if t0 <= s["wall"] <= t1]


def sys_counters(port):
    """Mosquitto's $SYS totals: messages and bytes, received and sent."""
    topics = ["$SYS/broker/messages/received", "$SYS/broker/messages/sent", "$SYS/broker/bytes/received", "$SYS/broker/bytes/sent", "$SYS/broker/clients/connected"]
    args = ["mosquitto_sub", "-p", str(port), "-v", "-C", str(len(topics)), "-W", "10"]
    for t in topics:
        args += ["-t", t]
    out = subprocess.run(args, capture_output=True, text=True).stdout
    v = {}
    for line in out.splitlines():
        k, _, n = line.partition(" ")
        v[k.rsplit("/", 2)[-2] + "_" + k.rsplit("/", 1)[-1]] = int(n)
    v["t"] = time.time()
    return v


def tree_rss_mb(pid):
    """Resident memory of a process and its descendants, in MiB."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = pathlib.Path(f"/proc/{p}/status").read_text()
            total += int(next(l.split()[1] for l in status.splitlines() if l.startswith("VmRSS:")))
            for t in pathlib.Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (t / "children").read_text().split()]
        except (OSError, StopIteration):
            pass
    return round(total / 1024, 1)


def rates(a, b, devices):
    dt = b["t"] - a["t"]
    d = {k: b[k] - a[k] for k in ("messages_received", "messages_sent", "bytes_received", "bytes_sent")}
    return {
        "seconds": round(dt, 1),
        "msgs_in_per_s": round(d["messages_received"] / dt, 2),
        "msgs_out_per_s": round(d["messages_sent"] / dt, 2),
        "bytes_in_per_min_per_device": round(d["bytes_received"] / dt * 60 / devices, 1),
        "bytes_out_per_min_per_device": round(d["bytes_sent"] / dt * 60 / devices, 1),
        "bytes_per_min_per_device": round((d["bytes_received"] + d["bytes_sent"]) / dt * 60 / devices, 1),
    }


def pct(values, p):
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--steady", type=int, help="seconds of steady state (default: one poll interval)")
    ap.add_argument("--ramp", default="60s")
    ap.add_argument("--poll-interval", default="1h")
    ap.add_argument("--spread", default="20s", help="the sync broadcast's spread")
    ap.add_argument("--binary", default=str(ROOT / "target/release/edgeflow"))
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    a = ap.parse_args()
    if a.steady is None:
        a.steady = int(parse_duration(a.poll_interval))

    # SIGTERM unwinds like Ctrl-C, so the servers below are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    work = pathlib.Path(tempfile.mkdtemp(prefix="fleet-sim-"))
    procs = []
    env = dict(os.environ, NO_COLOR="1")
    results = {"devices": a.devices, "poll_interval": a.poll_interval, "machine": f"{os.cpu_count()} cores", "binary": a.binary}

    def edgeflow(*args, **kw):
        return subprocess.run([a.binary, *args], capture_output=True, text=True, env=env, **kw)

    try:
        # The broker.
        mport = free_port()
        conf = work / "mosquitto.conf"
        user = "user root\n" if os.geteuid() == 0 else ""
        conf.write_text(f"{user}listener {mport} 127.0.0.1\nallow_anonymous true\nsys_interval 1\nmax_connections -1\npersistence false\n"
                        f"max_queued_messages 100000\nlog_dest file {work}/mosquitto.log\nlog_type error\nlog_type warning\n")
        exe = "/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else "mosquitto"
        mosq = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(mosq)
        assert wait_port(mport, 10), "mosquitto did not listen"
        broker = f"mqtt://127.0.0.1:{mport}"

        # The registry.
        rport = free_port()
        (work / "mlflow").mkdir()
        mlflow = subprocess.Popen([str(PY), str(ROOT / "tests/mlflow/serve.py"), "--port", str(rport), "--dir", str(work / "mlflow"), "--webhooks"],
                                  stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
        procs.append(mlflow)
        registry = f"http://127.0.0.1:{rport}"
        end = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{registry}/health", timeout=2).read()
                break
            except OSError:
                assert time.time() < end, "mlflow did not come up"
                time.sleep(0.5)

        def log_model(version, alias=None):
            d = make_model(work / f"model-v{version}", version)
            cmd = [str(PY), str(ROOT / "tests/mlflow/log_model.py"), "--tracking-uri", registry, "--name", MODEL, "--model-dir", str(d), "--flavor", "pyfunc"]
            if alias:
                cmd += ["--alias", alias]
            out = subprocess.run(cmd, capture_output=True, text=True, env=dict(env, MLFLOW_ENABLE_ASYNC_LOGGING="false", GIT_PYTHON_REFRESH="quiet"))
            assert out.returncode == 0, out.stderr
            return json.loads([l for l in out.stdout.splitlines() if l.startswith("{")][-1])

        def mlflow_api(route, body):
            req = urllib.request.Request(f"{registry}/api/2.0/mlflow/{route}", data=json.dumps(body).encode(), headers={"content-type": "application/json"}, method="POST")
            return json.loads(urllib.request.urlopen(req, timeout=30).read() or b"{}")

        log_model(1, "production")
        key = work / "fleet.key"
        out = edgeflow("fleet", "keygen", "--out", str(key))
        assert out.returncode == 0, out.stderr
        public = out.stdout.strip()
        config = work / "sim.toml"
        config.write_text(f'[registry]\nurl = "{registry}"\nmodel = "{MODEL}"\nalias = "production"\npoll_interval = "{a.poll_interval}"\n\n'
                          f'[fleet]\nbroker = "{broker}"\ngroups = ["fleet"]\nsignature_public_key = "{public}"\n')

        # 1. Enrolment.
        log(f"starting {a.devices} simulated devices over {a.ramp}")
        t0 = time.time()
        before = sys_counters(mport)
        sim = subprocess.Popen([a.binary, "fleet", "simulate", "--config", str(config), "--devices", str(a.devices), "--dir", str(work / "devices"),
                                "--ramp", a.ramp, "--stats-every", "5s"], stdout=subprocess.PIPE, stderr=open(work / "simulate.log", "w"), text=True, env=env)
        procs.append(sim)
        stats = Stats(sim)
        s = stats.wait(lambda s: s["devices"] == a.devices and s["connected"] == a.devices and s["versions"].get("1") == a.devices, 900, "every device on version 1")
        enrolled = time.time() - t0
        results["enrolment"] = {"seconds": round(enrolled, 1), "registry_api": s["registry_api"], "registry_download": s["registry_download"],
                                "api_per_device": round(s["registry_api"] / a.devices, 2), "broker": rates(before, sys_counters(mport), a.devices)}
        log(f"enrolled in {enrolled:.0f} s: {results['enrolment']}")

        # 2. The console's view of the whole fleet.
        times = []
        for _ in range(3):
            t = time.time()
            out = edgeflow("fleet", "console", "--broker", broker, "devices", "--json", "--quiet", "500ms")
            times.append(time.time() - t)
            rows = [json.loads(l) for l in out.stdout.splitlines() if l.strip()]
            assert out.returncode == 0 and len(rows) == a.devices, (out.returncode, len(rows), out.stderr[-2000:])
        results["devices_command_s"] = {"runs": [round(t, 2) for t in times], "median": round(statistics.median(times), 2), "quiet_s": 0.5}
        log(f"console devices: {results['devices_command_s']}")

        # 3. sync broadcasts: spread, then a storm.
        for label, spread in (("spread", a.spread), ("storm", "0s")):
            r0, c0 = stats.last(), sys_counters(mport)
            t = time.time()
            out = edgeflow("fleet", "console", "--broker", broker, "send", "sync", "--group", "all", "--args", json.dumps({"spread": spread}),
                           "--key", str(key), "--wait", "120s", "--ttl", "5m", "--json")
            took = time.time() - t
            report = json.loads(out.stdout)
            ms = [v["ms"] / 1000 for v in report["answers"].values() if v["status"] == "succeeded"]
            time.sleep(6)
            r1, c1 = stats.last(), sys_counters(mport)
            within = sum(1 for x in ms if x <= TARGET_ACK_S) / a.devices
            results[f"sync_{label}"] = {"spread": spread, "succeeded": len(ms), "of": a.devices, "p50_s": pct(ms, 50), "p99_s": pct(ms, 99), "max_s": max(ms) if ms else None,
                                        "acked_within_30s": round(within, 4), "command_s": round(took, 1), "registry_api": r1["registry_api"] - r0["registry_api"],
                                        "broker": rates(c0, c1, a.devices)}
            log(f"sync {label}: {results[f'sync_{label}']}")

        # 4. Push rollout: bridge + webhook, version 2 at @production.
        bport = free_port()
        bridge = subprocess.Popen([a.binary, "--log", "info", "fleet", "console", "--broker", broker, "bridge", "--listen", f"127.0.0.1:{bport}", "--key", str(key),
                                   "--group", "all", "--model", MODEL, "--spread", a.spread], env=dict(env, EDGEFLOW_WEBHOOK_SECRET="sim-secret"),
                                  stdout=subprocess.DEVNULL, stderr=open(work / "bridge.log", "w"))
        procs.append(bridge)
        assert wait_port(bport, 10), "the bridge did not listen"
        mlflow_api("webhooks", {"name": "edgeflow-bridge", "url": f"http://127.0.0.1:{bport}/webhook", "secret": "sim-secret",
                                "events": [{"entity": "MODEL_VERSION_ALIAS", "action": "CREATED"}]})
        log_model(2)
        time.sleep(2)  # MLflow's webhook cache (1 s in serve.py)
        r0, c0 = stats.last(), sys_counters(mport)
        t = time.time()
        mlflow_api("registered-models/alias", {"name": MODEL, "alias": "production", "version": "2"})
        s = stats.wait(lambda s: s["versions"].get("2") == a.devices, 600, "every device on version 2")
        took = time.time() - t
        c1 = sys_counters(mport)
        window = stats.between(r0["wall"], s["wall"])
        peak = max(((y["registry_api"] + y["registry_download"] - x["registry_api"] - x["registry_download"]) / (y["wall"] - x["wall"])
                    for x, y in zip(window, window[1:]) if y["wall"] > x["wall"]), default=None)
        results["push_rollout"] = {"seconds_to_all": round(took, 1), "registry_api": s["registry_api"] - r0["registry_api"],
                                   "registry_download": s["registry_download"] - r0["registry_download"], "peak_registry_req_per_s_5s": round(peak, 1) if peak else None,
                                   "broker": rates(c0, c1, a.devices)}
        log(f"push rollout: {results['push_rollout']}")

        # 5. Staged rollout back to version 1 (pins), 25% a step.
        r0, c0 = stats.last(), sys_counters(mport)
        t = time.time()
        out = edgeflow("fleet", "console", "--broker", broker, "rollout", "--group", "all", "--version", "1", "--step", "25%", "--interval", "10s",
                       "--wait", "5m", "--key", str(key), "--json")
        took = time.time() - t
        o = json.loads(out.stdout)
        pin_ms = [v["ms"] / 1000 for st in o["steps"] for v in st["pins"].values() if v.get("ms") is not None]
        time.sleep(6)
        r1, c1 = stats.last(), sys_counters(mport)
        results["staged_rollout"] = {"completed": o["completed"], "steps": len(o["steps"]), "seconds": round(took, 1), "interval_s": 10,
                                     "pin_p50_s": pct(pin_ms, 50), "pin_p99_s": pct(pin_ms, 99), "registry_api": r1["registry_api"] - r0["registry_api"],
                                     "broker": rates(c0, c1, a.devices), "problems": o["problems"][:5]}
        log(f"staged rollout: {results['staged_rollout']}")
        assert o["completed"], out.stdout[-3000:]

        out = edgeflow("fleet", "console", "--broker", broker, "send", "unpin", "--group", "all", "--key", str(key), "--wait", "120s", "--json")
        assert out.returncode == 0, out.stdout[-2000:]

        # 6. Steady state over one poll interval (each device polls once in any such window), with
        #    one dashboard reading every health report and event.
        dash = subprocess.Popen(["mosquitto_sub", "-p", str(mport), "-t", f"{PREFIX}/+/health", "-t", f"{PREFIX}/+/events"], stdout=subprocess.DEVNULL)
        procs.append(dash)
        time.sleep(5)
        a0, c0 = stats.last(), sys_counters(mport)
        log(f"steady state for {a.steady} s")
        time.sleep(a.steady)
        a1, c1 = stats.last(), sys_counters(mport)
        dt = a1["wall"] - a0["wall"]
        api_rate = (a1["registry_api"] - a0["registry_api"]) / dt
        steady = {"seconds": round(dt, 1), "registry_req_per_s": round(api_rate, 3), "registry_req_per_s_per_1000": round(api_rate * 1000 / a.devices, 3),
                  "broker": rates(c0, c1, a.devices), "rss_mb": round(a1["rss_kb"] / 1024, 1), "rss_kb_per_device": round(a1["rss_kb"] / a.devices, 1),
                  "threads": a1["threads"], "mosquitto_rss_mb": tree_rss_mb(mosq.pid), "mlflow_rss_mb": tree_rss_mb(mlflow.pid)}
        steady["ratio_registry_to_target"] = round(steady["registry_req_per_s_per_1000"] / TARGET_REQ_PER_S_PER_1000, 3)
        steady["ratio_bytes_to_target"] = round(steady["broker"]["bytes_per_min_per_device"] / TARGET_BYTES_PER_MIN_PER_DEVICE, 3)
        results["steady"] = steady
        log(f"steady: {steady}")

        sim.send_signal(signal.SIGTERM)
        sim.wait(timeout=120)
        final = stats.last()
        results["stop"] = {"exit": sim.returncode, "last": final}
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                if p is procs[1]:
                    p.stdin.close()
                else:
                    p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work folder kept: {work}")

    out = ROOT / ".bench/fleet_sim.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    s, y = results["steady"], results["sync_spread"]
    print(f"\n{a.devices} devices, poll_interval {a.poll_interval} (targets of issue 17 are the anchor; ratio = measured / target)")
    print(f"  registry, steady:  {s['registry_req_per_s_per_1000']} req/s per 1000 devices   (target 0.5: ratio {s['ratio_registry_to_target']})")
    print(f"  broker, steady:    {s['broker']['bytes_per_min_per_device']} B/min per device      (target 1024: ratio {s['ratio_bytes_to_target']})")
    print(f"  sync ({y['spread']}):      p50 {y['p50_s']} s, p99 {y['p99_s']} s, {y['acked_within_30s'] * 100:.1f}% within 30 s (target 99%)")
    print(f"  memory:            {s['rss_kb_per_device']} KiB per device ({s['rss_mb']} MiB, {s['threads']} threads)")
    print(f"results: {out}")


if __name__ == "__main__":
    sys.exit(main())
