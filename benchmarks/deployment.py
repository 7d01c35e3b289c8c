"""Round wall time on Flower's deployment engine: Cleanroom FL vs plain Flower, same run.

Two deployments of the same training, each as separate OS processes on 127.0.0.1 with TLS and
node authentication, run alternately ``--repeats`` times:

* **cleanroom**: ``cleanroom deploy-local --sites N --rounds R`` (coordinator daemon: loopback
  SuperLink, Fleet proxy, our SuperExec; site daemons: SuperNode in process isolation + the
  warm, gated executor; attestation, encryption, site-owned DP-SGD, audit log);
* **plain Flower**: stock ``flower-superlink`` + N stock ``flower-supernode`` (each message a
  fresh ``flwr-clientapp``) running ``benchmarks/plain_flower``: the same logistic regression,
  the same rows of each site, Opacus DP-SGD with the same noise, clip, learning rate and steps,
  Flower's FedAdam (eta 0.3), and the same 50 ms reply polling as the coordinator. No Cleanroom
  FL code on its path (the benchmark only writes its certificates, keys and data files).

Both get the same Flower-allowed tuning: ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` (plain: 0.1 s on
the SuperNodes' SuperExec, the same interval our executor polls at; 0.2 s for the ServerApp's).
Flower's hard-coded 3 s idle poll of every SuperNode and its 0.5 s reply wait stay in both.

Reported (rounds 2..R; round 1 also pays start-up): seconds per round, from one round's end to
the next (cleanroom: the signed round receipts in its audit log; plain: the ServerApp's
clock); the coordinator's own ``seconds`` per round record (which starts when the previous
round's evaluation carries this round's attestation, so it spans 1.5 rounds: the figure of the
earlier docs); and **our share of each message** at a site, from the executor's per-task
timing: gate (digest the FAB, check approvals) + installing the FAB + loading the ClientApp +
our handler (attestation, decryption, DP training, encryption), i.e. everything but Flower's
polls, pulls and pushes and process start. Run: ``python -m benchmarks deployment [--sites 4]
[--rounds 3] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PLAIN_APP = Path(__file__).resolve().parent / "plain_flower"
HEART = ("cleveland", "hungary", "switzerland", "va")
EPSILON, DELTA, LR, ETA, CLIP, LOCAL_STEPS = 1.0, 1e-5, 0.3, 0.3, 0.5, 1  # the task defaults


def _cleanroom(out: Path, sites: int, rounds: int) -> dict[str, Any]:
    """One ``deploy-local`` run: per-round wall times, record seconds, executor timings."""
    proc = subprocess.run([sys.executable, "-m", "cleanroom", "deploy-local", "--sites",
                           str(sites), "--rounds", str(rounds), "--out", str(out),
                           "--no-progress"], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"deploy-local failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n"
                         f"{proc.stderr[-2000:]}\nlogs: {out / 'logs'}")
    audit = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
    ends = [e["time"] for e in audit if e["kind"] == "round-receipt"]
    report = json.loads((out / "report.json").read_text())
    parts: dict[str, list[float]] = {"share": [], "gate": [], "install": [], "pull": [],
                                     "reply": []}
    for log in out.glob("sites/*/state/logs/executor.log"):
        for line in log.read_text().splitlines():
            if " timing {" in line:
                t = json.loads(line.split(" timing ", 1)[1])
                if t.get("type") in ("train", "evaluate") and "app" in t:
                    parts["share"].append(t["gate"] + t["app"])
                    for key in ("gate", "install", "pull", "reply"):
                        parts[key].append(t.get(key, 0.0))
    return {"round_wall": [b - a for a, b in itertools.pairwise(ends)],
            "record_seconds": [r["seconds"] for r in report["rounds"][1:]],
            **parts, "accuracy": report["final"].get("accuracy_mean")}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what}")


def _prepare_plain(root: Path, sites: int, rounds: int) -> dict[str, Any]:
    """Certificates, node keys and each site's rows as .npz (setup, outside the timing)."""
    import numpy as np
    from opacus.accountants.utils import get_noise_multiplier

    from cleanroom.pki import cert_pem, generate_node_key, make_ca, make_server_cert, private_pem
    from cleanroom.site_agent.data import load_heart_disease_site

    root.mkdir(parents=True)
    ca_key, ca = make_ca("plain benchmark CA")
    key, cert = make_server_cert(ca_key, ca, ["127.0.0.1", "localhost"])
    (root / "ca.pem").write_bytes(cert_pem(ca))
    (root / "link.pem").write_bytes(cert_pem(cert))
    (root / "link.key").write_bytes(private_pem(key))
    for name in HEART[:sites]:
        generate_node_key(root / name)
        data = load_heart_disease_site(name)
        np.savez(root / name / "data.npz", train_x=data.train_x, train_y=data.train_y,
                 test_x=data.test_x, test_y=data.test_y)
    sigma = get_noise_multiplier(target_epsilon=EPSILON, target_delta=DELTA, sample_rate=1.0,
                                 steps=rounds * LOCAL_STEPS, accountant="rdp")
    return {"noise": float(sigma)}


def _plain(root: Path, sites: int, rounds: int, noise: float) -> dict[str, Any]:
    """One plain Flower deployment run (stock processes, ``benchmarks/plain_flower``)."""
    import ssl
    import urllib.request

    bin_dir = str(Path(sys.executable).parent)
    base = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
            "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    port = _free_port()
    ca = root / "ca.pem"
    cli_home = root / "home-cli"
    cli_home.mkdir(exist_ok=True)
    (cli_home / "config.toml").write_text(
        f'[superlink]\ndefault = "plain"\n\n[superlink.plain]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{ca}"\n')
    procs: list[subprocess.Popen[bytes]] = []
    logs = root / "logs"
    logs.mkdir(exist_ok=True)

    def start(name: str, args: list[str], home: str, extra: dict[str, str]) -> None:
        with open(logs / f"{name}.log", "ab") as log:
            procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                          env={**base, "FLWR_HOME": str(root / home),
                                               **extra}, start_new_session=True))

    def flwr(*args: str) -> dict[str, Any]:
        out = subprocess.run(["flwr", *args, "--format", "json"], capture_output=True,
                             text=True, env={**base, "FLWR_HOME": str(cli_home)}).stdout
        return json.loads(out[out.index("{"):]) if "{" in out else {}

    try:
        start("superlink", ["flower-superlink", "--ssl-ca-certfile", str(ca), "--ssl-certfile",
                            str(root / "link.pem"), "--ssl-keyfile", str(root / "link.key"),
                            "--enable-supernode-auth",
                            "--disable-runtime-dependency-installation", "--host",
                            "127.0.0.1", "--port", str(port)], "home-link",
              {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2"})
        tls = ssl.create_default_context(cafile=str(ca))

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"https://127.0.0.1:{port}/health", context=tls,
                                            timeout=2) as response:
                    return int(response.status) == 200
            except OSError:
                return False

        _wait(healthy, 60, "the plain SuperLink")
        for name in HEART[:sites]:
            if not flwr("supernode", "register", str(root / name / "node_auth.pub"), "plain",
                        "--name", name).get("success"):
                raise SystemExit(f"could not register {name}")
            start(f"supernode-{name}", [
                "flower-supernode", "--superlink", f"127.0.0.1:{port}", "--root-certificates",
                str(ca), "--auth-supernode-private-key", str(root / name / "node_auth.key"),
                "--port", str(_free_port()),
                "--node-config", f"data='{root / name / 'data.npz'}'"], f"home-{name}",
                {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"})
        result = root / "result.json"
        overrides = (f"rounds={rounds} min-nodes={sites} lr={LR} eta={ETA} "
                     f"noise-multiplier={noise} max-grad-norm={CLIP} local-steps={LOCAL_STEPS} "
                     f"result='{result}'")
        started = flwr("run", str(PLAIN_APP), "plain", "--run-config", overrides)
        if "run-id" not in started:
            raise SystemExit(f"plain flwr run failed: {started}")
        _wait(result.exists, 1800, "the plain run")
        doc = json.loads(result.read_text())
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        time.sleep(1)
    ends = doc["round_ends"]
    return {"round_wall": [b - a for a, b in itertools.pairwise(ends)],
            "accuracy": doc.get("accuracy")}


def _stats(values: list[float]) -> str:
    if not values:
        return f"{'-':>8s} {'-':>8s} {'-':>8s}"
    digits = 3 if max(values) < 1 else 2
    return " ".join(f"{v:8.{digits}f}" for v in (min(values), statistics.median(values),
                                                  max(values)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks deployment", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, default=4, choices=range(1, 5))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the run folders")
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error("--rounds must be >= 2 (round 1 pays start-up and is reported apart)")
    tmp = Path(tempfile.mkdtemp(prefix="bench-deploy-"))
    plain_setup = _prepare_plain(tmp / "plain-setup", args.sites, args.rounds)
    runs: dict[str, list[dict[str, Any]]] = {"cleanroom": [], "plain": []}
    try:
        for i in range(args.repeats):
            runs["cleanroom"].append(_cleanroom(tmp / f"cleanroom-{i}", args.sites, args.rounds))
            plain_root = tmp / f"plain-{i}"
            shutil.copytree(tmp / "plain-setup", plain_root)
            runs["plain"].append(_plain(plain_root, args.sites, args.rounds,
                                        plain_setup["noise"]))
            print(f"repeat {i + 1}/{args.repeats}: cleanroom "
                  f"{statistics.median(runs['cleanroom'][-1]['round_wall']):.2f} s/round, "
                  f"plain Flower {statistics.median(runs['plain'][-1]['round_wall']):.2f} "
                  "s/round", file=sys.stderr, flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    def per_repeat(kind: str, key: str) -> list[float]:
        return [statistics.median(r[key]) for r in runs[kind] if r[key]]

    clean, plain = per_repeat("cleanroom", "round_wall"), per_repeat("plain", "round_wall")
    ratios = [c / p for c, p in zip(clean, plain, strict=True)]
    def messages(key: str) -> list[float]:
        return [v for r in runs["cleanroom"] for v in r[key]]

    print(f"{args.sites} site(s), {args.rounds} rounds, DP-SGD eps={EPSILON}; median of rounds "
          f"2..{args.rounds} per repeat; {args.repeats} repeats, alternating; load "
          f"{os.getloadavg()[0]:.1f}")
    print(f"{'':46s} {'min':>8s} {'median':>8s} {'max':>8s}")
    print(f"{'cleanroom s/round (receipt to receipt)':46s} {_stats(clean)}")
    print(f"{'plain Flower s/round (same training)':46s} {_stats(plain)}")
    print(f"{'ratio cleanroom / plain Flower':46s} {_stats(ratios)}")
    print(f"{'cleanroom round record seconds (1.5 rounds)':46s} "
          f"{_stats(per_repeat('cleanroom', 'record_seconds'))}")
    print(f"{'our share per message at a site, s':46s} {_stats(messages('share'))}")
    print(f"{'  of which the gate (digest, approvals)':46s} {_stats(messages('gate'))}")
    print(f"{'  of which installing the FAB':46s} {_stats(messages('install'))}")
    print(f"{'Flower: pulling the task inputs, s':46s} {_stats(messages('pull'))}")
    print(f"{'Flower: pushing the reply, s':46s} {_stats(messages('reply'))}")
    accuracy = [r["accuracy"] for k in runs for r in runs[k] if r["accuracy"] is not None]
    print(f"final client-average accuracy: cleanroom "
          f"{[round(r['accuracy'], 3) for r in runs['cleanroom']]}, plain "
          f"{[round(r['accuracy'], 3) for r in runs['plain'] if r['accuracy'] is not None]}"
          if accuracy else "")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
