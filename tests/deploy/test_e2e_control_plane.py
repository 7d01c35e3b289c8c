"""The locked control plane and the site gate, with real processes on loopback.

* Someone holding only the consortium's CA certificate reaches the public port: every
  ``flwr`` command that would submit, list, stop or (un)register gets 403, and so does a
  Runtime call that would take a ServerApp's task; on the loopback port itself that call
  needs the daemon's SuperExec secret.
* A rogue app submitted with plain ``flwr run`` on the coordinator's own Control port (an
  operator's mistake, or a compromised operator): its ClientApp would write a marker file at
  import; the marker never appears, and every site's reply is ``task-not-approved: ...``,
  also in the site's activity log.
* A second key registered under a real site's name comes online: it takes no part
  (:func:`impostor_online`, used by the approved runs of
  ``test_e2e_processes.py::test_pause_and_resume_a_deployed_run``).
"""

from __future__ import annotations

import json
import textwrap
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cleanroom.coordinator.flower_cli import FlowerCli
from cleanroom.pki import generate_node_key
from cleanroom.process import FLOWER_ENV, Supervisor
from tests.deploy.conftest import Federation

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROGUE_SERVER = '''
"""A rogue ServerApp: asks every node for its data, writes what came back."""
import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    deadline = time.monotonic() + 90
    nodes = []
    while len(nodes) < int(context.run_config["nodes"]) and time.monotonic() < deadline:
        nodes = list(grid.get_node_ids())
        time.sleep(0.2)
    messages = [Message(RecordDict({"q": ConfigRecord({"rows": 5})}), dst_node_id=node,
                        message_type="query.steal") for node in nodes]
    pending = set(grid.push_messages(messages))
    replies = []
    while pending and time.monotonic() < deadline:
        got = list(grid.pull_messages(pending))
        replies += got
        pending -= {m.metadata.reply_to_message_id for m in got}
        time.sleep(0.1)
    Path(context.run_config["result"]).write_text(json.dumps([
        {"node": m.metadata.src_node_id, "error": m.has_error(),
         "code": m.error.code if m.has_error() else None,
         "reason": m.error.reason if m.has_error() else None} for m in replies]))
'''

ROGUE_CLIENT = '''
"""A rogue ClientApp: leaves a marker the moment it is imported."""
import os
from pathlib import Path

Path({marker!r}, f"imported-{{os.getpid()}}").write_text("rogue code ran at a site")

from flwr.app import ConfigRecord, Message, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

app = ClientApp()


@app.query("steal")
def steal(msg, ctx):
    return Message(RecordDict({{"loot": ConfigRecord({{"cfg": str(ctx.node_config)}})}}),
                   reply_to=msg)
'''

ROGUE_PYPROJECT = '''
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "rogue"
version = "1.0.0"
description = "not approved anywhere"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "mallory"

[tool.flwr.app.components]
serverapp = "server_app:app"
clientapp = "client_app:app"

[tool.flwr.app.config]
result = ""
nodes = 2
'''


def flwr_cli(home: Path, address: str, fed: Federation) -> FlowerCli:
    return FlowerCli(home, address, fed.ca, {**Supervisor(home / "logs").env(), **FLOWER_ENV})


def test_public_port_serves_only_fleet(coordinator, tmp_path):
    """With only the CA certificate, nothing but Fleet answers on the public port."""
    fed = coordinator
    outsider = flwr_cli(tmp_path / "outsider", f"127.0.0.1:{fed.link}", fed)
    key = generate_node_key(tmp_path / "mallory")
    assert key.openssh
    task = Path(__file__).resolve().parents[2] / "models" / "heart_disease"
    attempts = {
        "run": ("run", str(task), "cleanroom"),
        "ls": ("ls", "cleanroom"),
        "stop": ("stop", "1", "cleanroom"),
        "supernode list": ("supernode", "list", "cleanroom"),
        "supernode register": ("supernode", "register", str(tmp_path / "mallory" /
                                                           "node_auth.pub"), "cleanroom",
                               "--name", "cleveland"),
        "supernode unregister": ("supernode", "unregister", "1", "cleanroom"),
    }
    with ThreadPoolExecutor(len(attempts)) as pool:
        results = dict(zip(attempts, pool.map(lambda a: outsider._run(*a, timeout=90),
                                              attempts.values()), strict=True))
    for what, (code, out) in results.items():
        assert code != 0, f"flwr {what} succeeded through the public port:\n{out}"
        assert "403" in out, f"flwr {what}: expected a 403 refusal, got:\n{out[-1500:]}"

    import ssl

    tls = ssl.create_default_context(cafile=str(fed.ca))

    def post(path: str) -> tuple[int, dict]:
        request = urllib.request.Request(f"https://127.0.0.1:{fed.link}{path}", data=b"",
                                         method="POST")
        try:
            with urllib.request.urlopen(request, context=tls, timeout=10) as response:
                return response.status, {}
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    # the ServerApp's task token cannot be taken through the public port...
    status, body = post("/v1/runtime/acquire-task")
    assert status == 403 and "Runtime API is not exposed" in body["reason"]
    for path in ("/v1/control/start-run", "/v1/fleet/register-node", "/docs"):
        assert post(path)[0] == 403, path
    with urllib.request.urlopen(f"https://127.0.0.1:{fed.link}/health", context=tls,
                                timeout=10) as response:
        assert response.status == 200


def test_serverapp_task_needs_the_superexec_secret(coordinator):
    """...nor on the loopback port itself without the daemon's SuperExec secret."""
    import httpx
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import RetryInvoker, constant
    from flwr.supercore.runtime import RuntimeHttpClient

    client = RuntimeHttpClient.from_server_address(
        server_address=f"127.0.0.1:{coordinator.control}", insecure=False,
        root_certificates=coordinator.ca.read_bytes(),
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=RetryInvoker(lambda: constant(0.1), httpx.TransportError, max_tries=2,
                                   max_time=5.0, jitter=None))
    with pytest.raises(httpx.HTTPStatusError) as info:
        client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.SERVER_APP]))
    client.close()
    assert info.value.response.status_code == 401
    assert "Authentication failed" in info.value.response.text  # code 1008: SuperExec auth
    secret = coordinator.out / "coordinator" / "state" / "superexec.secret"
    assert secret.stat().st_mode & 0o077 == 0


def wait_run(cli: FlowerCli, run_id: int, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = cli.status(run_id)
        if str(info.get("status", "")).startswith("finished"):
            return info
        time.sleep(1.0)
    raise AssertionError(f"run {run_id} did not finish")


def test_rogue_app_never_runs_at_a_site(sites, tmp_path):
    fed = sites
    app, markers = tmp_path / "rogue", tmp_path / "markers"
    app.mkdir()
    markers.mkdir()
    (app / "pyproject.toml").write_text(ROGUE_PYPROJECT)
    (app / "server_app.py").write_text(ROGUE_SERVER)
    (app / "client_app.py").write_text(textwrap.dedent(ROGUE_CLIENT.format(marker=str(markers))))
    operator = flwr_cli(tmp_path / "operator", f"127.0.0.1:{fed.control}", fed)
    result = tmp_path / "replies.json"
    run_id = operator.submit(app, {"result": str(result)})
    info = wait_run(operator, run_id)
    assert info["status"] == "finished:completed", info
    replies = json.loads(result.read_text())
    assert len(replies) == 2, replies
    for reply in replies:
        assert reply["error"] and reply["code"] == 403, reply
        assert reply["reason"].startswith("task-not-approved: task mallory/rogue 1.0.0"), reply
        assert "nothing of it was installed or imported" in reply["reason"]
    assert list(markers.iterdir()) == [], "the rogue ClientApp was imported at a site"
    for name, port in fed.site_api.items():
        token = (fed.out / "sites" / name / "operator.token").read_text().strip()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/status",
                                         headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            recent = json.loads(response.read())["recent"]
        refused = [e for e in recent if e["event"] == "task-refused"
                   and e["run_id"] == str(run_id)]
        assert refused and refused[0]["reason"].startswith("task-not-approved:"), recent
        installed = fed.out / "sites" / name / "state" / "flwr-home"
        assert not list(installed.rglob("client_app.py")), "a FAB was left installed"
