#!/usr/bin/env python3
"""Idle cost of the fleet link (issue 5): CPU and bytes on the wire per device.

Runs `edgeflow fleet run` with the default intervals (health every 2m, keep-alive 60s)
against a private Mosquitto through a byte-counting TCP relay, for --minutes, then prints
the agent's CPU time (utime+stime from /proc/<pid>/stat, as % of one core) and the TCP
payload bytes each way per minute. TCP/IP headers are not counted (see BENCHMARKS.md).

    python3 benches/fleet_link.py --minutes 16 [--tls]
"""
import argparse
import asyncio
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid):
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def make_certs(d):
    script = """
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out ca.key
openssl req -x509 -new -key ca.key -out ca.pem -days 2 -subj /CN=bench-ca -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out server.key
openssl req -new -key server.key -out server.csr -subj /CN=localhost
printf 'subjectAltName=IP:127.0.0.1\\nextendedKeyUsage=serverAuth\\n' > server.ext
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 2 -extfile server.ext
"""
    subprocess.run(["bash", "-ec", script], cwd=d, check=True, capture_output=True)


async def relay(reader, writer, counter, key):
    try:
        while data := await reader.read(65536):
            counter[key] += len(data)
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=16.0)
    ap.add_argument("--tls", action="store_true")
    ap.add_argument("--binary", default=str(ROOT / "target/release/edgeflow"))
    args = ap.parse_args()

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="fleet-bench-"))
    broker_port, proxy_port = free_port(), free_port()
    conf = [f"listener {broker_port} 127.0.0.1", "allow_anonymous true"]
    if os.geteuid() == 0:
        conf.insert(0, "user root")
    if args.tls:
        make_certs(tmp)
        conf += [f"cafile {tmp}/ca.pem", f"certfile {tmp}/server.pem", f"keyfile {tmp}/server.key"]
    (tmp / "mosquitto.conf").write_text("\n".join(conf) + "\n")
    broker = subprocess.Popen(["mosquitto", "-c", str(tmp / "mosquitto.conf")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    counter = {"up": 0, "down": 0}

    async def on_client(cr, cw):
        for _ in range(100):
            try:
                sr, sw = await asyncio.open_connection("127.0.0.1", broker_port)
                break
            except OSError:
                await asyncio.sleep(0.05)
        else:
            cw.close()
            return
        try:
            await asyncio.gather(relay(cr, sw, counter, "up"), relay(sr, cw, counter, "down"))
        except asyncio.CancelledError:
            pass

    server = await asyncio.start_server(on_client, "127.0.0.1", proxy_port)
    scheme = "mqtts" if args.tls else "mqtt"
    fleet = [f'broker = "{scheme}://127.0.0.1:{proxy_port}"', 'device_id = "bench-device"', f'spool_dir = "{tmp}/spool"']
    fleet.append('require_signatures = false')  # no key in this benchmark; the link measures the same
    if args.tls:
        fleet.append(f'ca_file = "{tmp}/ca.pem"')
    (tmp / "edgeflow.toml").write_text("[fleet]\n" + "\n".join(fleet) + "\n")
    agent = subprocess.Popen([args.binary, "fleet", "run", "--config", str(tmp / "edgeflow.toml")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    # Skip the connection setup (TLS handshake, birth, subscription, first health).
    await asyncio.sleep(15)
    c0, b0, t0 = cpu_seconds(agent.pid), dict(counter), time.monotonic()
    await asyncio.sleep(args.minutes * 60)
    c1, b1, t1 = cpu_seconds(agent.pid), dict(counter), time.monotonic()
    minutes = (t1 - t0) / 60
    up = (b1["up"] - b0["up"]) / minutes
    down = (b1["down"] - b0["down"]) / minutes
    print(f"transport: {'TLS 1.3' if args.tls else 'plain TCP'}; measured {minutes:.1f} min after a 15 s warm-up")
    print(f"agent CPU: {c1 - c0:.2f} s over {t1 - t0:.0f} s = {100 * (c1 - c0) / (t1 - t0):.3f} % of one core")
    print(f"wire (TCP payload): {up:.0f} B/min device->broker, {down:.0f} B/min broker->device, {up + down:.0f} B/min total")
    print(f"load average at the end: {os.getloadavg()}")

    agent.send_signal(signal.SIGTERM)
    agent.wait(timeout=15)
    server.close()
    broker.terminate()
    broker.wait()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
